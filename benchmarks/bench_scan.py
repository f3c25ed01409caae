"""Scanner throughput on a GPT-2-small-shaped model, against the bare matmul it is built on.

The scan's unavoidable work is `G = W_out @ U` for every layer: (3072 x 768) @ (768 x 50257)
per layer, ~2.85 TFLOP for the 12 layers of GPT-2 small. This benchmark times, interleaved
in one run (so that other load on the machine hits all of them alike), repetition by repetition:

  matmul     the bare fp32 matmul, in the scanner's chunking: ScanConfig().chunk_rows rows per
             `torch.mm(..., out=buffer)` into one reused buffer (inputs precomputed)
  matmul_big the same product as one (3072 x 50257) matmul per layer (reference only)
  scan       `discover.scan.scan(view, ScanConfig(), progress=False)`: every statistic
  scan_model `discover.scan.scan_model` into a fresh store: hash + load + scan + DuckDB/FAISS writes
  cli        a fresh `discover scan DIR --store NEW` process, end to end (imports, hash, load, scan,
             writes), against
  bare_cli   a fresh Python process that imports torch and transformers, loads the model with
             `from_pretrained` and runs the bare chunked matmul: loading plus the matmul

and reports medians and the ratios scan / matmul (target <= 1.5), scan_model / matmul and
cli / bare_cli (target <= 1.5: the scan end to end against loading plus the bare matmul).
Peak memory: each of matmul / scan / scan_model runs once more in a fresh subprocess
(`--phase NAME`) that reports its RSS high-water mark minus its RSS after the model is loaded.

    python benchmarks/bench_scan.py                 # full: 12 layers, 2 repeats (~13 min on 2 cores)
    python benchmarks/bench_scan.py --layers 2      # quick check
    python benchmarks/bench_scan.py --json          # machine-readable results on stdout
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

TARGET = 1.5
PHASES = ("matmul", "scan", "scan_model")


# ---------------------------------------------------------------------------- model
def build_model(model_dir: Path, n_layer: int, *, seed: int = 0) -> Path:
    """A GPT-2-small-shaped model with random weights, saved with GPT-2's real tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=n_layer, n_embd=768, n_head=12, n_inner=3072, vocab_size=C.GPT2_VOCAB,
                     bos_token_id=C.GPT2_VOCAB - 1, eos_token_id=C.GPT2_VOCAB - 1)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # non-trivial final-norm gain, so that folding it in is real work
        model.transformer.ln_f.weight.copy_(1.0 + 0.1 * torch.randn(768))
    model_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(model_dir), safe_serialization=True)
    C.save_tokenizer(C.gpt2_tokenizer(C.GPT2_VOCAB), model_dir, C.GPT2_VOCAB)
    return model_dir


# --------------------------------------------------------------------------- phases
def matmul_chunked(Ws, U, chunk_rows: int, buf) -> float:
    """Every layer's W_out @ U in the scanner's chunks, into one reused buffer; seconds."""
    import torch

    with C.Timer() as t, torch.inference_mode():
        for W in Ws:
            for c0 in range(0, W.shape[0], chunk_rows):
                c1 = min(W.shape[0], c0 + chunk_rows)
                torch.mm(W[c0:c1], U, out=buf[: c1 - c0])
    return t.s


def matmul_big(Ws, U, buf) -> float:
    """Every layer's W_out @ U as one matmul per layer, into one reused buffer; seconds."""
    import torch

    with C.Timer() as t, torch.inference_mode():
        for W in Ws:
            torch.mm(W, U, out=buf)
    return t.s


def run_scan(view, config) -> float:
    from discover.scan import scan

    with C.Timer() as t:
        result = scan(view, config, progress=False)
    del result
    return t.s


def run_scan_model(model_dir: Path, store_root: Path, config) -> tuple[float, float]:
    """(wall seconds of scan_model into a fresh store, seconds of its inner scan)."""
    from discover.scan import scan_model
    from discover.store import Store

    with C.Timer() as t, Store(store_root) as store:
        summary = scan_model(str(model_dir), store, config, progress=False, force=True)
        inner = store.checkpoint(summary.checkpoint_id)["scan_seconds"]
    assert summary.status == "scanned"
    return t.s, float(inner)


def make_config(args):
    """ScanConfig() with the --chunk-rows / --backend overrides."""
    from discover.scan import ScanConfig

    kw = {}
    if args.chunk_rows is not None:
        kw["chunk_rows"] = args.chunk_rows
    if args.backend is not None:
        kw["backend"] = args.backend
    return ScanConfig(**kw)


def config_args(args) -> list[str]:
    out = []
    if args.chunk_rows is not None:
        out += ["--chunk-rows", str(args.chunk_rows)]
    if args.backend is not None:
        out += ["--backend", args.backend]
    return out


def phase_child(phase: str, model_dir: Path, config) -> dict:
    """One phase in this (fresh) process; its peak RSS above the RSS after the model is loaded."""
    import torch

    from discover.adapter import load_model
    from discover.scan import scan, scan_model
    from discover.store import Store

    view = None
    if phase != "scan_model":  # scan_model loads the model itself
        view = load_model(str(model_dir))
    base = C.rss_mb()
    reset = C.reset_peak_rss()
    with C.Timer() as t:
        if phase == "matmul":
            # the bare baseline, streamed as the scanner streams: U, one layer's W, one buffer
            with torch.inference_mode():
                U = view.processed_unembed()
                buf = torch.empty(config.chunk_rows, U.shape[1])
                for layer in range(view.n_layers):
                    W = view.processed_W_out(layer)
                    for c0 in range(0, W.shape[0], config.chunk_rows):
                        c1 = min(W.shape[0], c0 + config.chunk_rows)
                        torch.mm(W[c0:c1], U, out=buf[: c1 - c0])
        elif phase == "scan":
            result = scan(view, config, progress=False)  # noqa: F841 (kept alive: its arrays count)
        else:
            with tempfile.TemporaryDirectory(prefix="bench_scan_store_") as d, Store(d) as store:
                scan_model(str(model_dir), store, config, progress=False)
    return {
        "phase": phase,
        "seconds": t.s,
        "rss_after_load_mb": base,
        "peak_extra_mb_hwm": C.peak_rss_mb() - base if reset else None,
        "peak_extra_mb_ru_maxrss": C.maxrss_mb() - base,
        "hwm_reset": reset,
    }


BARE_CLI = r"""
import sys, time
import torch, transformers
with torch.inference_mode():
    m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])
    U = (m.lm_head.weight * m.transformer.ln_f.weight).T.contiguous()  # the final norm's gain folded in
    rows = int(sys.argv[2])
    buf = torch.empty(rows, U.shape[1])
    for block in m.transformer.h:
        W = block.mlp.c_proj.weight.contiguous()  # (neuron, d_model)
        for c in range(0, W.shape[0], rows):
            n = min(rows, W.shape[0] - c)
            torch.mm(W[c:c + n], U, out=buf[:n])
"""


def run_fresh(argv: list[str]) -> float:
    """Wall seconds of a fresh process running `argv` (its start and imports included)."""
    t = time.perf_counter()
    out = subprocess.run(argv, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{out.stderr[-3000:]}")
    return time.perf_counter() - t


def run_child(args: list[str]) -> str:
    """Run this script with `args` in a fresh Python process; its stdout."""
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return out.stdout


# ---------------------------------------------------------------------------- profile
def profile_scan(view, config, top: int = 15) -> list[dict]:
    """cProfile of one scan: the functions (torch ops included) with the most own time."""
    import cProfile
    import pstats

    from discover.scan import scan

    prof = cProfile.Profile()
    prof.enable()
    scan(view, config, progress=False)
    prof.disable()
    st = pstats.Stats(prof)
    total = st.total_tt
    rows = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:top]
    out = []
    for (file, line, name), (cc, nc, tt, ct, _) in rows:
        where = name if file == "~" else f"{Path(file).name}:{line}({name})"
        out.append({"function": where, "calls": nc, "own_s": tt, "share": tt / total})
    return out


# ------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12, help="layers of the GPT-2-small-shaped model (default 12)")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved repetitions (default 2)")
    ap.add_argument("--chunk-rows", type=int, default=None,
                    help="ScanConfig.chunk_rows for both the scan and the chunked matmul (default: the library's)")
    ap.add_argument("--backend", default=None,
                    help="ScanConfig.backend: auto (default), numba or torch")
    ap.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--no-big", action="store_true", help="skip the one-matmul-per-layer reference")
    ap.add_argument("--no-fresh", action="store_true",
                    help="skip the fresh-process pair (discover scan end to end against loading plus the matmul)")
    ap.add_argument("--profile", action="store_true", help="also cProfile one scan and print the top functions")
    ap.add_argument("--phase", choices=PHASES + ("build",), help=argparse.SUPPRESS)  # internal: one phase, fresh process
    ap.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.phase == "build":
        build_model(args.model_dir, args.layers)
        return 0
    if args.phase:
        print(json.dumps(phase_child(args.phase, args.model_dir, make_config(args))))
        return 0
    if args.layers < 1 or args.repeats < 1:
        ap.error("--layers and --repeats must be >= 1")

    quiet = False
    with tempfile.TemporaryDirectory(prefix="bench_scan_") as tmp:
        tmp = Path(tmp)
        model_dir = tmp / "model"
        # The model is built, and the memory phases run, in child processes while this one is
        # still small: a child's ru_maxrss starts from its parent's high-water mark (fork + exec).
        C.log(f"building a GPT-2-small-shaped model ({args.layers} layers, vocab {C.GPT2_VOCAB})", quiet=quiet)
        run_child(["--phase", "build", "--layers", str(args.layers), "--model-dir", str(model_dir)])
        memory = {}
        if not args.no_memory:
            for phase in PHASES:
                C.log(f"peak memory: phase {phase} in a fresh process", quiet=quiet)
                memory[phase] = json.loads(
                    run_child(["--phase", phase, "--model-dir", str(model_dir), *config_args(args)]).strip().splitlines()[-1])

        import torch

        from discover.adapter import load_model

        info = C.machine()
        config = make_config(args)
        view = load_model(str(model_dir))
        assert len(view.tokenizer) == C.GPT2_VOCAB == view.d_vocab
        with torch.inference_mode():
            U = view.processed_unembed()
            Ws = [view.processed_W_out(layer) for layer in range(view.n_layers)]
        flop = 2.0 * view.n_layers * view.d_mlp * view.d_model * view.d_vocab
        buf = torch.empty(config.chunk_rows, view.d_vocab)
        big = None if args.no_big else torch.empty(view.d_mlp, view.d_vocab)
        with torch.inference_mode():  # warm up MKL's threads and the buffers' pages
            torch.mm(Ws[0][: config.chunk_rows], U, out=buf)
            if big is not None:
                torch.mm(Ws[0], U, out=big)

        times: dict[str, list[float]] = {k: [] for k in ("matmul", "matmul_big", "scan", "scan_model", "bare_cli",
                                                         "cli")}
        inner: list[float] = []
        for r in range(args.repeats):
            C.log(f"repeat {r + 1}/{args.repeats}: matmul", quiet=quiet)
            times["matmul"].append(matmul_chunked(Ws, U, config.chunk_rows, buf))
            if big is not None:
                C.log(f"repeat {r + 1}/{args.repeats}: matmul_big", quiet=quiet)
                times["matmul_big"].append(matmul_big(Ws, U, big))
            C.log(f"repeat {r + 1}/{args.repeats}: scan", quiet=quiet)
            times["scan"].append(run_scan(view, config))
            C.log(f"repeat {r + 1}/{args.repeats}: scan_model", quiet=quiet)
            t, s = run_scan_model(model_dir, tmp / f"store{r}", config)
            times["scan_model"].append(t)
            inner.append(s)
            if not args.no_fresh:
                C.log(f"repeat {r + 1}/{args.repeats}: fresh processes (bare_cli, cli)", quiet=quiet)
                times["bare_cli"].append(run_fresh([sys.executable, "-c", BARE_CLI, str(model_dir),
                                                    str(config.chunk_rows)]))
                times["cli"].append(run_fresh([sys.executable, "-m", "discover", "scan", str(model_dir), "--store",
                                               str(tmp / f"cli{r}"), "--chunk-rows", str(config.chunk_rows)]))
            C.log("  " + ", ".join(f"{k} {v[-1]:.1f}s" for k, v in times.items() if v), quiet=quiet)
        del big, buf

        profile = None
        if args.profile:
            C.log("profiling one scan (cProfile)", quiet=quiet)
            profile = profile_scan(view, config)

    med = {k: C.median(v) for k, v in times.items() if v}
    info["code"] = C.code_version()
    info["load_avg_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    res = {
        "benchmark": "bench_scan",
        "shape": {"n_layers": args.layers, "d_mlp": 3072, "d_model": 768, "d_vocab": C.GPT2_VOCAB},
        "scan_config": {"chunk_rows": config.chunk_rows, "block_rows": config.block_rows,
                        "backend": getattr(config, "backend", None),
                        "top_k": config.top_k, "token_top_k": config.token_top_k},
        "repeats": args.repeats,
        "machine": info,
        "seconds": times,
        "median_s": med,
        "matmul_gflops": flop / med["matmul"] / 1e9,
        "scan_model_inner_scan_s": inner,
        "ratio_scan_over_matmul": med["scan"] / med["matmul"],
        "ratio_scan_model_over_matmul": med["scan_model"] / med["matmul"],
        "ratio_cli_over_bare_cli": med["cli"] / med["bare_cli"] if "cli" in med else None,
        "target_scan_over_matmul": TARGET,
        "meets_target": med["scan"] / med["matmul"] <= TARGET,
        "memory": memory,
        "profile": profile,
    }
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(report(res))
    return 0


def report(res: dict) -> str:
    med, sec = res["median_s"], res["seconds"]
    m = med["matmul"]
    rows = []
    for k, label in (("matmul", "bare matmul, chunked (baseline)"), ("matmul_big", "bare matmul, 1 per layer (ref)"),
                     ("scan", "scan() (all statistics)"), ("scan_model", "scan_model() (+hash/load/DuckDB/FAISS)"),
                     ("bare_cli", "fresh process: load + bare matmul"), ("cli", "fresh `discover scan` end to end")):
        if k in med:
            rows.append([label, f"{med[k]:.2f}", " ".join(f"{x:.2f}" for x in sec[k]), f"{med[k] / m:.2f}"])
    sh = res["shape"]
    out = [
        f"bench_scan: {sh['n_layers']} layers x {sh['d_mlp']} neurons x d_model {sh['d_model']} x vocab "
        f"{sh['d_vocab']}; chunk_rows {res['scan_config']['chunk_rows']}, backend {res['scan_config']['backend']}; "
        f"{res['repeats']} interleaved repeats; "
        f"{res['machine']['cpus']} CPUs, torch {res['machine']['torch_threads']} threads",
        "",
        C.table(rows, ["phase", "median s", "each s", "x matmul"]),
        "",
        f"bare matmul throughput: {res['matmul_gflops']:.1f} GFLOP/s",
        f"scan_model's inner scan: {' '.join(f'{x:.2f}' for x in res['scan_model_inner_scan_s'])} s "
        f"(the rest is hashing, loading and writing the store)",
        f"ratio scan / matmul       = {res['ratio_scan_over_matmul']:.2f}   (target <= {res['target_scan_over_matmul']}: "
        f"{'met' if res['meets_target'] else 'NOT met'})",
        f"ratio scan_model / matmul = {res['ratio_scan_model_over_matmul']:.2f}",
    ]
    if res["ratio_cli_over_bare_cli"] is not None:
        r = res["ratio_cli_over_bare_cli"]
        out.append(f"ratio fresh discover scan / fresh load + matmul = {r:.2f}   (target <= {TARGET}: "
                   f"{'met' if r <= TARGET else 'NOT met'})")
    if res["memory"]:
        out += ["", "peak extra memory, each phase in a fresh process (MiB above RSS after the model is loaded;",
                "scan_model: above RSS after imports, since it loads the model itself):"]
        mrows = [[p, f"{v['rss_after_load_mb']:.0f}",
                  "-" if v["peak_extra_mb_hwm"] is None else f"{v['peak_extra_mb_hwm']:.0f}",
                  f"{v['peak_extra_mb_ru_maxrss']:.0f}", f"{v['seconds']:.1f}"]
                 for p, v in res["memory"].items()]
        out.append(C.table(mrows, ["phase", "RSS after load", "peak extra (VmHWM reset)",
                                   "peak extra (ru_maxrss)", "s"]))
    if res["profile"]:
        out += ["", "cProfile of one scan (own time):"]
        out.append(C.table([[p["function"], p["calls"], f"{p['own_s']:.2f}", f"{100 * p['share']:.1f}%"]
                            for p in res["profile"]], ["function", "calls", "own s", "share"]))
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
