"""The main job against the forward-pass floor: `discover run` end to end (fresh process: identify,
load, scan, corpus pass, verify, report) against the bare forward passes over the tokens it reads.

Per model and repetition, side by side:
- `run`: `python -m discover run MODEL --tokens N --verify-tokens M` into a fresh store, in a
  child process: its wall time, the seconds of each stage (from its --json summary) and its peak
  RSS (`wait4`'s ru_maxrss of that child alone);
- `bare`: another child loads the same model, cuts the same corpus into the pass's own sequences
  (the pass's context and batch size) and runs the model (`view.model(input_ids=...)`, logits
  included: the pass needs the top prediction) under inference_mode over N + M tokens, no hooks;
  its forward seconds alone are the floor (loading and tokenising are reported beside them).

Reported: `run / bare` (goal <= 2.0, issue 15) and the peak RSS of the run (goal <= 4 GB on
SmolLM2 at --tokens 100000 --verify-tokens 20000). Models: `default` (the embedded model) and
`smollm2` (SmolLM2-135M GGUF, `tools/fetch_smollm2.sh`), or a path.
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

RUN_TARGET = 2.0
RSS_TARGET_MB = 4096


def model_spec(name: str) -> str:
    if name == "default":
        from discover.scan import default_model_spec

        return default_model_spec()
    if name == "smollm2":
        out = subprocess.run(["bash", str(Path(__file__).resolve().parents[1] / "tools" / "fetch_smollm2.sh")],
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"SmolLM2 could not be fetched: {out.stderr[-500:]}")
        return out.stdout.strip().splitlines()[-1]
    return name


def child(argv: list[str], env=None) -> tuple[float, int, str, str, float]:
    """(wall seconds, exit status, stdout, stderr, peak RSS MB) of one child process."""
    t = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(argv, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t
        out.seek(0)
        err.seek(0)
        return wall, os.waitstatus_to_exitcode(status), out.read(), err.read(), usage.ru_maxrss / 1024


def bare_child(spec: str, corpus: str | None, tokens: int) -> dict:
    """Load, cut the corpus like the pass, and time the bare forward passes over `tokens` tokens."""
    import torch

    from discover import activations as A
    from discover.adapter import load_model
    from discover.corpus import open_corpus

    t = time.perf_counter()
    view = load_model(spec)
    load = time.perf_counter() - t
    context = min(A.model_context(view), 256)
    batch = A.auto_batch_size(view, context)
    t = time.perf_counter()
    batches, cur, n = [], [], 0
    for s in A.sequences(open_corpus(corpus), "all", view.tokenizer, context, A.bos_id(view.tokenizer)):
        cur.append(s[3])
        n += len(s[3]) - 1
        if len(cur) == batch:
            batches.append(cur)
            cur = []
        if n >= tokens:
            break
    if cur:
        batches.append(cur)
    tokenise = time.perf_counter() - t
    t = time.perf_counter()
    with torch.inference_mode():
        for b in batches:
            T = max(len(s) for s in b)
            view.model(input_ids=torch.tensor([s + [s[0]] * (T - len(s)) for s in b]))
    forward = time.perf_counter() - t
    return {"load_s": load, "tokenise_s": tokenise, "forward_s": forward, "tokens": n, "context": context,
            "batch_size": batch}


def measure(name: str, spec: str, args, tmp: Path, rep: int) -> dict:
    store = tmp / f"{name}-{rep}"
    argv = [sys.executable, "-m", "discover", "run", spec, "--tokens", str(args.tokens), "--verify-tokens",
            str(args.verify_tokens), "--verify-split", args.verify_split, "--candidates", str(args.candidates),
            "--store", str(store), "--out", str(tmp / f"{name}-{rep}.html"), "--json"]
    if args.corpus:
        argv += ["--corpus", args.corpus]
    C.log(f"{name} #{rep}: discover run", quiet=args.json)
    wall, rc, out, err, rss = child(argv)
    if rc != 0:
        raise SystemExit(f"discover run failed ({rc}):\n{err[-3000:]}")
    summary = json.loads(out)
    C.log(f"{name} #{rep}: bare forward passes", quiet=args.json)
    bare_argv = [sys.executable, str(Path(__file__).resolve()), "--phase", "bare", "--spec", spec,
                 "--tokens", str(args.tokens + args.verify_tokens)] + (["--corpus", args.corpus] if args.corpus else [])
    bwall, brc, bout, berr, brss = child(bare_argv)
    if brc != 0:
        raise SystemExit(f"bare forward failed ({brc}):\n{berr[-3000:]}")
    bare = json.loads(bout.strip().splitlines()[-1])
    stages = {k: round(v.get("seconds", 0.0), 2) for k, v in summary["stages"].items()}
    peaks = {k: v.get("peak_rss_mb") for k, v in summary["stages"].items()}
    return {"run_s": wall, "stages_s": stages, "stage_peak_rss_mb": peaks, "run_peak_rss_mb": rss, "bare": bare, "bare_peak_rss_mb": brss,
            "ratio": wall / bare["forward_s"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["default"], help="default, smollm2 or paths (default)")
    ap.add_argument("--tokens", type=int, default=100_000, help="corpus-pass tokens (100000)")
    ap.add_argument("--verify-tokens", type=int, default=20_000, help="verify's held-out tokens (20000)")
    ap.add_argument("--verify-split", default="heldout", choices=("heldout", "all"))
    ap.add_argument("--candidates", type=int, default=20, help="prediction candidates verified (20)")
    ap.add_argument("--corpus", default=None, help="corpus spec (default: the built-in corpus)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--phase", choices=("bare",), help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.phase:
        print(json.dumps(bare_child(args.spec, args.corpus, args.tokens)))
        return 0
    res = {"machine": C.machine(), "code": C.code_version(), "settings": {
        "tokens": args.tokens, "verify_tokens": args.verify_tokens, "candidates": args.candidates,
        "corpus": args.corpus or "default"}, "models": {}}
    with tempfile.TemporaryDirectory(prefix="bench_run_") as tmp:
        for name in args.models:
            spec = model_spec(name)
            reps = [measure(name, spec, args, Path(tmp), r) for r in range(args.repeats)]
            best = min(reps, key=lambda r: r["ratio"])
            res["models"][name] = {"repeats": reps, "ratio": C.median([r["ratio"] for r in reps]),
                                   "run_peak_rss_mb": max(r["run_peak_rss_mb"] for r in reps), "best": best}
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        rows = []
        for name, r in res["models"].items():
            b = r["best"]
            rows.append([name, f"{b['run_s']:.1f}", " ".join(f"{k} {v}" for k, v in b["stages_s"].items()),
                         f"{b['bare']['forward_s']:.1f}", f"{b['bare']['load_s']:.1f}", f"{r['ratio']:.2f}",
                         f"{r['run_peak_rss_mb']:.0f}"])
        print(C.table(rows, ["model", "run s", "stages s", "bare fwd s", "load s", "run/bare", "peak RSS MB"]))
        print(f"goals: run/bare <= {RUN_TARGET}, peak RSS <= {RSS_TARGET_MB} MB (SmolLM2 at 100k + 20k tokens)")
    ok = all(r["ratio"] <= RUN_TARGET for r in res["models"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
