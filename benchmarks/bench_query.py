"""Token-query latency over a GPT-2-XL-shaped catalog, against brute force numpy.

The catalog: a real Hugging Face GPT-2 XL-shaped model with random weights (48 layers x 6400
neurons = 307,200 neurons, d_model 1600) is scanned once into a temporary store (timed). Then,
for `--queries` random token ids (fixed seed), with the store open as a long-lived process
would keep it:

  query   `discover.query.query_token(store, model, token_id=t, top=20)`: the catalog lookup,
          with each neuron's role, statistics and top/bottom tokens
  brute   numpy on the same weights: W_all (307,200 x 1600 float32, the processed W_out of all
          layers stacked) @ U[:, t], then `np.argpartition` top-20 and a sort

timed one token after the other (interleaved), reported as p50 / p99 in ms (target: query
p50 <= 20 ms) with the ratio brute / query. Every timed query is checked against brute force:
the same 20 (layer, neuron) in the same order, congruences equal to rtol 1e-4 (a different
neuron is accepted only where the two congruences tie to that tolerance).

The vocabulary: scanning 307,200 neurons against GPT-2's 50,257 tokens is ~49 TFLOP, far past
10 minutes on 2 CPU cores, so the default is `--vocab 4096`: GPT-2's first 4095 BPE tokens plus
`<|endoftext|>` (see _common.gpt2_tokenizer). Its catalog has 4096 rows per token table
instead of 50,257 (token_neurons: 4096 x 50 x 2 rows); the per-neuron tables (neurons,
neuron_tokens: 307,200 x 40 rows) have their full size. `--vocab 50257` runs the real thing.

    python benchmarks/bench_query.py                      # 48 layers, vocab 4096, 200 queries
    python benchmarks/bench_query.py --negative           # also the most negative neurons
    python benchmarks/bench_query.py --layers 4 --queries 50   # a quick small version
    python benchmarks/bench_query.py --vocab 50257        # GPT-2's full vocabulary (long scan)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

TARGET_P50_MS = 20.0
TOP = 20
RTOL = 1e-4
SPEC = "bench/gpt2-xl-shape"  # a hub-id-shaped name: the store keys the scan under it


# ---------------------------------------------------------------------------- model
def build_model(n_layer: int, vocab: int, *, seed: int = 0):
    """A GPT-2 XL-shaped GPT2LMHeadModel with random weights (Hugging Face's own init)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=n_layer, n_embd=1600, n_head=25, n_inner=6400, vocab_size=vocab,
                     bos_token_id=vocab - 1, eos_token_id=vocab - 1)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # a non-trivial final-norm gain, so that folding it in is real work
        model.transformer.ln_f.weight.copy_(1.0 + 0.1 * torch.randn(cfg.n_embd))
    return model


# ----------------------------------------------------------------- SQL instrumentation
class _TimedCursor:
    def __init__(self, cur, key, t0, sink):
        self._cur, self._key, self._t0, self._sink = cur, key, t0, sink

    def _done(self, out):
        self._sink.setdefault(self._key, []).append(time.perf_counter() - self._t0)
        return out

    def fetchall(self):
        return self._done(self._cur.fetchall())

    def fetchone(self):
        return self._done(self._cur.fetchone())

    def __getattr__(self, name):
        return getattr(self._cur, name)


class _TimedConnection:
    """Wraps a DuckDB connection: seconds per statement (execute through fetch), keyed by its SQL."""

    def __init__(self, con, sink: dict):
        self._con, self._sink = con, sink

    def execute(self, sql, params=None):
        key = " ".join(sql.split())
        if "FROM neuron_tokens" in key and params:
            key = f"[neuron_tokens side={params[1]}] " + key
        t0 = time.perf_counter()
        cur = self._con.execute(sql) if params is None else self._con.execute(sql, params)
        return _TimedCursor(cur, key, t0, self._sink)

    def __getattr__(self, name):
        return getattr(self._con, name)


def sql_breakdown(store, tokens, negative: bool) -> tuple[list[dict], float]:
    """Per-statement time of query_token over `tokens` (store.con temporarily wrapped), and the
    time outside SQL; back to back, without brute force in between."""
    from discover.query import query_token

    sink: dict = {}
    real = store.con
    store.con = _TimedConnection(real, sink)
    try:
        with C.Timer() as t:
            for tok in tokens:
                query_token(store, SPEC, token_id=int(tok), top=TOP, negative=negative)
    finally:
        store.con = real
    per_query_ms = 1000 * t.s / len(tokens)
    sql_ms = 1000 * sum(sum(v) for v in sink.values()) / len(tokens)
    rows = [{"sql": k[:110], "calls_per_query": len(v) / len(tokens),
             "median_ms": 1000 * C.median(v), "ms_per_query": 1000 * sum(v) / len(tokens)}
            for k, v in sink.items()]
    rows.sort(key=lambda r: -r["ms_per_query"])
    rows.append({"sql": "(everything else: arrays, Python)", "calls_per_query": float("nan"),
                 "median_ms": float("nan"), "ms_per_query": per_query_ms - sql_ms})
    return rows, per_query_ms


# ----------------------------------------------------------------------------- bench
def brute_top(W_all, UT, t: int, negative: bool):
    """(global ids, congruences) of the top-20 neurons of token t, best first."""
    import numpy as np

    s = W_all @ UT[t]  # (neuron,)
    if negative:
        idx = np.argpartition(s, TOP)[:TOP]
        idx = idx[np.argsort(s[idx], kind="stable")]
    else:
        idx = np.argpartition(-s, TOP)[:TOP]
        idx = idx[np.argsort(-s[idx], kind="stable")]
    return idx, s[idx], s


def check_exact(out: dict, ids, vals, s_all, d_mlp: int) -> tuple[bool, int, str]:
    """The query's 20 neurons against brute force's: (ok, rank-wise id swaps between ties, why not).

    Exact up to ties: 20 distinct neurons whose true congruences (from `s_all`) are the stored
    ones, and rank by rank equal to brute force's top-20 values (rtol 1e-4). A different neuron
    at a rank then necessarily ties with brute force's neuron there.
    """
    import numpy as np

    res = out["results"]
    if len(res) != TOP:
        return False, 0, f"{len(res)} results"
    q_ids = np.array([r["layer"] * d_mlp + r["neuron_index"] for r in res])
    q_vals = np.array([r["congruence"] for r in res])
    if len(set(q_ids.tolist())) != TOP:
        return False, 0, "a neuron is listed twice"
    if not np.allclose(q_vals, s_all[q_ids], rtol=RTOL, atol=0):
        return False, 0, "stored congruence differs from w_out . U[:, t]"
    if not np.allclose(q_vals, vals, rtol=RTOL, atol=0):
        return False, 0, "ranked congruences differ from brute force's top-20"
    return True, int((q_ids != ids).sum()), ""


def _settle(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def run_sides(store, W_all, UT, tokens, d_mlp: int, sides: tuple[bool, ...], settle: float,
              quiet: bool) -> dict:
    """Interleaved query / brute force timings over `tokens` (token by token, side by side),
    with the exactness check of every query.

    `settle` seconds of busy-waiting precede every timed call (outside the timing): numpy's
    OpenBLAS threads spin for ~0.1 s after the brute-force matvec and would otherwise steal the
    2 cores from the DuckDB query timed right after it (measured: +15-18 ms on the query's p50).
    A busy wait, not a sleep: after a sleep this VM's next query ran ~30% slower (cold wake-up),
    while a busy wait measured the same as back-to-back queries.
    """
    from discover.query import query_token

    acc = {neg: {"q": [], "b": [], "fail": [], "ties": 0} for neg in sides}
    for i, tok in enumerate(tokens):
        tok = int(tok)
        for negative in sides:
            a = acc[negative]
            _settle(settle)
            t0 = time.perf_counter()
            out = query_token(store, SPEC, token_id=tok, top=TOP, negative=negative)
            t1 = time.perf_counter()
            _settle(settle)
            t2 = time.perf_counter()
            ids, vals, s_all = brute_top(W_all, UT, tok, negative)
            t3 = time.perf_counter()
            a["q"].append(1000 * (t1 - t0))
            a["b"].append(1000 * (t3 - t2))
            ok, n_ties, why = check_exact(out, ids, vals, s_all, d_mlp)
            a["ties"] += n_ties
            if not ok:
                a["fail"].append({"token_id": tok, "why": why})
        if (i + 1) % 50 == 0:
            C.log(f"  {i + 1}/{len(tokens)} tokens", quiet=quiet)
    res = {}
    for negative, a in acc.items():
        q_ms, b_ms = a["q"], a["b"]
        qp50, bp50 = C.percentile(q_ms, 50), C.percentile(b_ms, 50)
        res["negative" if negative else "positive"] = {
            "query_ms": {"p50": qp50, "p99": C.percentile(q_ms, 99), "mean": sum(q_ms) / len(q_ms),
                         "max": max(q_ms)},
            "brute_ms": {"p50": bp50, "p99": C.percentile(b_ms, 99), "mean": sum(b_ms) / len(b_ms),
                         "max": max(b_ms)},
            "ratio_brute_over_query_p50": bp50 / qp50,
            "exact": not a["fail"],
            "n_checked": len(q_ms),
            "failures": a["fail"][:10],
            "n_failures": len(a["fail"]),
            "tie_swaps": a["ties"],
            "meets_target": qp50 <= TARGET_P50_MS,
        }
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=4096,
                    help="vocabulary size: 50257 = GPT-2's tokenizer, fewer = its first ids (default 4096)")
    ap.add_argument("--queries", type=int, default=200, help="random token ids to time (default 200)")
    ap.add_argument("--layers", type=int, default=48, help="layers of 6400 neurons (default 48, GPT-2 XL)")
    ap.add_argument("--negative", action="store_true", help="also time the most-negative query (--negative)")
    ap.add_argument("--settle", type=float, default=0.15,
                    help="seconds of busy-wait before each timed call, so that one side's spinning BLAS "
                         "threads do not slow the other (default 0.15)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the weights and of the token ids")
    ap.add_argument("--no-breakdown", action="store_true", help="skip the per-SQL-statement breakdown")
    ap.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    args = ap.parse_args(argv)
    if args.layers < 1 or args.queries < 1:
        ap.error("--layers and --queries must be >= 1")

    import numpy as np
    import torch

    # every library module imported now: one consistent snapshot of the code for the whole run
    from discover.adapter import from_model
    from discover.query import query_token
    from discover.scan import ScanConfig, scan
    from discover.store import Store

    quiet = False
    info = C.machine()
    config = ScanConfig()
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench_query_") as tmp:
        tmp = Path(tmp)
        C.log(f"building a GPT-2 XL-shaped model: {args.layers} layers x 6400 neurons x d_model 1600, "
              f"vocab {args.vocab}", quiet=quiet)
        with C.Timer() as t:
            model = build_model(args.layers, args.vocab, seed=args.seed)
        timings["build_model_s"] = t.s
        tok = C.save_tokenizer(C.gpt2_tokenizer(args.vocab), tmp / "tokenizer", args.vocab)
        with C.Timer() as t:
            view = from_model(model, tok, spec=SPEC)  # identity: sha256 over the tensors
        timings["identity_hash_s"] = t.s
        n_params = sum(p.numel() for p in model.parameters())
        C.log(f"model built in {timings['build_model_s']:.1f}s ({n_params / 1e9:.2f}B parameters); "
              f"scanning {view.n_layers * view.d_mlp:,} neurons", quiet=quiet)

        with C.Timer() as t:
            result = scan(view, config, progress=False)
        timings["scan_s"] = t.s
        C.log(f"scan {t.s:.1f}s; writing the store", quiet=quiet)
        root = tmp / "store"
        with C.Timer() as t, Store(root) as store:
            store.write_scan(view, result, config, spec=SPEC)
        timings["write_store_s"] = t.s
        del result
        gc.collect()

        # brute force's data: the same processed weights the scanner read
        with torch.inference_mode():
            UT = np.ascontiguousarray(view.processed_unembed().numpy().T)  # (vocab, d_model)
            W_all = np.concatenate([view.processed_W_out(layer).numpy() for layer in range(view.n_layers)])
        d_mlp = view.d_mlp
        del view, model
        gc.collect()
        C.log(f"store written in {timings['write_store_s']:.1f}s; W_all {W_all.shape} "
              f"({W_all.nbytes / 2**30:.2f} GiB)", quiet=quiet)

        rng = np.random.default_rng(args.seed)
        tokens = rng.choice(args.vocab, size=min(args.queries, args.vocab), replace=False)
        warm = rng.choice(np.setdiff1d(np.arange(args.vocab), tokens), size=5, replace=False)

        with Store(root, read_only=True) as store:  # open once, as a long-lived process would
            with C.Timer() as t:
                query_token(store, SPEC, token_id=int(warm[0]), top=TOP)
            timings["first_query_ms"] = 1000 * t.s
            for w in warm[1:]:
                query_token(store, SPEC, token_id=int(w), top=TOP)
                brute_top(W_all, UT, int(w), False)
            C.log(f"timing {len(tokens)} tokens (query and brute force interleaved"
                  f"{', positive and negative' if args.negative else ''})", quiet=quiet)
            sides = run_sides(store, W_all, UT, tokens, d_mlp, (False, True) if args.negative else (False,),
                              args.settle, quiet)
            breakdown = None
            if not args.no_breakdown:
                C.log("per-statement breakdown of query_token", quiet=quiet)
                rows, per_q = sql_breakdown(store, tokens[: min(50, len(tokens))], False)
                breakdown = {"ms_per_query_instrumented": per_q, "statements": rows}
        catalog_mb = (root / "catalog.duckdb").stat().st_size / 2**20

    info["code"] = C.code_version()
    info["load_avg_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    res = {
        "benchmark": "bench_query",
        "shape": {"n_layers": args.layers, "d_mlp": 6400, "d_model": 1600, "d_vocab": args.vocab,
                  "n_neurons": args.layers * 6400},
        "queries": len(tokens),
        "settle_s": args.settle,
        "top": TOP,
        "machine": info,
        "timings": timings,
        "catalog_mb": catalog_mb,
        "sides": sides,
        "target_p50_ms": TARGET_P50_MS,
        "breakdown": breakdown,
    }
    if args.json:
        print(json.dumps(res, indent=2, default=float))
    else:
        print(report(res))
    return 0 if all(s["exact"] for s in sides.values()) else 1


def report(res: dict) -> str:
    sh, tm = res["shape"], res["timings"]
    out = [
        f"bench_query: {sh['n_layers']} layers x {sh['d_mlp']} = {sh['n_neurons']:,} neurons, d_model "
        f"{sh['d_model']}, vocab {sh['d_vocab']}; {res['queries']} random tokens, top {res['top']}; "
        f"{res['machine']['cpus']} CPUs",
        "",
        f"build model {tm['build_model_s']:.1f}s, identity hash {tm['identity_hash_s']:.1f}s, "
        f"scan {tm['scan_s']:.1f}s, write store {tm['write_store_s']:.1f}s (catalog {res['catalog_mb']:.0f} MiB); "
        f"first (cold) query {tm['first_query_ms']:.1f} ms",
        "",
    ]
    rows = []
    for side, s in res["sides"].items():
        rows.append([side, f"{s['query_ms']['p50']:.1f}", f"{s['query_ms']['p99']:.1f}",
                     f"{s['brute_ms']['p50']:.1f}", f"{s['brute_ms']['p99']:.1f}",
                     f"{s['ratio_brute_over_query_p50']:.2f}",
                     "yes" if s["exact"] else f"NO ({s['n_failures']})", s["tie_swaps"]])
    out.append(C.table(rows, ["side", "query p50 ms", "query p99 ms", "brute p50 ms", "brute p99 ms",
                              "brute/query", "exact", "tie swaps"]))
    for side, s in res["sides"].items():
        out.append(f"{side}: query p50 {s['query_ms']['p50']:.1f} ms (target <= {res['target_p50_ms']:.0f}: "
                   f"{'met' if s['meets_target'] else 'NOT met'})"
                   + ("" if s["exact"] else f"; mismatches: {s['failures']}"))
    if res["breakdown"]:
        b = res["breakdown"]
        out += ["", f"where query_token's time goes (instrumented, {b['ms_per_query_instrumented']:.1f} ms/query):"]
        out.append(C.table([[r["sql"], "-" if r["calls_per_query"] != r["calls_per_query"] else f"{r['calls_per_query']:.0f}",
                             "-" if r["median_ms"] != r["median_ms"] else f"{r['median_ms']:.2f}",
                             f"{r['ms_per_query']:.2f}"] for r in b["statements"]],
                           ["statement", "calls/query", "median ms", "ms/query"]))
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
