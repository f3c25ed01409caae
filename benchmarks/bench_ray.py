"""The corpus pass on a local Ray cluster: throughput with 1 and 2 workers, and the driver's merges.

On the embedded default model and the built-in corpus, the same pass (same tokens, batches and
shards) runs, each in a fresh process, in turn:

  single  `run_activations` in one process (torch on every core)
  ray1    `--ray local:1`: one worker of one core
  ray2    `--ray local:2`: two workers of one core each

Reported per variant: the pass's seconds (from the first batch planned to the last state merged,
workers' model loads included), tokens/s, and for the cluster variants where the driver's time
went (planning the pieces, starting the workers, fetching and merging shard states, saving).
Scaling efficiency = tokens/s of ray2 / (2 x tokens/s of ray1), both measured after the workers
started; merge overhead = the driver's fetch + merge + save seconds as a share of the pass (an
upper bound: the driver merges while the workers compute). The script also checks that ray2's
results equal single's, row for row.

    python benchmarks/bench_ray.py                    # 200,000 tokens, about 4 minutes on 2 cores
    python benchmarks/bench_ray.py --tokens 50000 --repeats 1 --json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

VARIANTS = ("single", "ray1", "ray2")
TABLES = ("neuron_activations", "activation_histograms", "activation_examples", "prediction_curves")


def variant_child(name: str, store: Path, tokens: int, shard_batches: int) -> dict:
    """One variant in this (fresh) process; its timings as a dict."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from discover.activations import ActivationConfig, run_activations
    from discover.store import Store

    cfg = ActivationConfig(tokens=tokens, shard_batches=shard_batches, save_every=1e9)
    out = {"variant": name}
    with Store(store) as st:
        from discover.scan import scan_model

        scan_model(None, st, progress=False)  # outside the timing: every variant scans alike
        if name == "single":
            t = time.perf_counter()
            s = run_activations(None, st, cfg, progress=False)
            out["wall_s"] = time.perf_counter() - t
        else:
            from discover.cluster import Cluster, ClusterStream, parse_address

            t = time.perf_counter()
            with Cluster(parse_address("local:1" if name == "ray1" else "local:2")) as cl:
                out["cluster_start_s"] = time.perf_counter() - t
                stream = ClusterStream(cl)
                t = time.perf_counter()
                s = run_activations(None, st, cfg, progress=False, stream=stream)
                out["wall_s"] = time.perf_counter() - t
            out["driver"] = stream.stats
    out.update(tokens=s.tokens, sequences=s.sequences, pass_s=s.seconds)
    return out


def results(store: Path) -> dict:
    import duckdb

    con = duckdb.connect(str(store / "catalog.duckdb"), read_only=True)
    try:
        return {t: con.execute(f"SELECT * EXCLUDE (pass_id) FROM {t} ORDER BY ALL").fetchall() for t in TABLES}
    finally:
        con.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=200_000, help="corpus-pass tokens (200000)")
    ap.add_argument("--shard-batches", type=int, default=4, help="batches per shard (4)")
    ap.add_argument("--repeats", type=int, default=2, help="rounds of the three variants (2)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    ap.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: one variant, fresh process
    ap.add_argument("--store", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.variant:
        print(json.dumps(variant_child(args.variant, args.store, args.tokens, args.shard_batches)))
        return 0

    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    identical = None
    with tempfile.TemporaryDirectory(prefix="bench_ray_") as tmp:
        for r in range(args.repeats):
            for v in VARIANTS:
                C.log(f"round {r + 1}/{args.repeats}: {v}", quiet=False)
                store = Path(tmp) / f"{v}-{r}"
                out = subprocess.run([sys.executable, __file__, "--variant", v, "--store", str(store), "--tokens",
                                      str(args.tokens), "--shard-batches", str(args.shard_batches)],
                                     capture_output=True, text=True, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
                if out.returncode != 0:
                    raise SystemExit(f"variant {v} failed:\n{out.stderr[-3000:]}")
                runs[v].append(json.loads(out.stdout.strip().splitlines()[-1]))
                C.log(f"  {v}: {runs[v][-1]['wall_s']:.1f} s", quiet=False)
            if r == 0:
                identical = results(Path(tmp) / "single-0") == results(Path(tmp) / "ray2-0")

    def med(v, key):
        return C.median([x[key] for x in runs[v]])

    def med_driver(v, key):
        return C.median([x["driver"][key] for x in runs[v]])

    tokens = runs["single"][0]["tokens"]
    summary = {}
    for v in VARIANTS:
        row = {"wall_s": med(v, "wall_s"), "tokens_per_s": tokens / med(v, "wall_s")}
        if v != "single":
            busy = [x["wall_s"] - x["driver"]["start_s"] - x["driver"]["plan_s"] for x in runs[v]]
            row.update({k: med_driver(v, k) for k in ("plan_s", "start_s", "fetch_s", "merge_s", "save_s")},
                       cluster_start_s=med(v, "cluster_start_s"), pieces=runs[v][0]["driver"]["pieces"],
                       workers=runs[v][0]["driver"]["workers"], steady_tokens_per_s=tokens / C.median(busy))
            row["merge_share"] = (row["fetch_s"] + row["merge_s"] + row["save_s"]) / row["wall_s"]
        summary[v] = row
    eff = summary["ray2"]["steady_tokens_per_s"] / (2 * summary["ray1"]["steady_tokens_per_s"])
    res = {"benchmark": "bench_ray", "model": "embedded default", "tokens": tokens,
           "shard_batches": args.shard_batches, "repeats": args.repeats, "machine": C.machine(),
           "code": C.code_version(), "runs": runs, "summary": summary, "scaling_efficiency": eff,
           "ray2_equals_single": identical}
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    rows = []
    for v in VARIANTS:
        s = summary[v]
        rows.append([v, f"{s['wall_s']:.1f}", f"{s['tokens_per_s']:,.0f}",
                     "-" if v == "single" else f"{s['steady_tokens_per_s']:,.0f}",
                     "-" if v == "single" else f"{s['plan_s']:.1f} / {s['start_s']:.1f} / {s['fetch_s']:.1f} / "
                                               f"{s['merge_s']:.1f} / {s['save_s']:.1f}",
                     "-" if v == "single" else f"{100 * s['merge_share']:.1f}%"])
    print(f"bench_ray: {tokens:,} tokens of the built-in corpus on the embedded default model, shards of "
          f"{args.shard_batches} batches ({summary['ray2']['pieces']} pieces), medians of {args.repeats}; "
          f"{res['machine']['cpus']} CPUs\n")
    print(C.table(rows, ["variant", "pass s", "tok/s", "tok/s after start",
                         "driver: plan / start / fetch / merge / save s", "merge share"]))
    print(f"\nscaling efficiency (ray2 vs 2 x ray1, after the workers started): {eff:.2f}")
    print(f"ray2 results equal single's row for row: {'yes' if identical else 'NO'}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
