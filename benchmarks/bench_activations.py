"""Corpus-pass throughput: the full pass against a bare forward pass, side by side.

For each model (the embedded default; a GPT-2-small-shaped model with random weights and GPT-2's
real 50,257-token tokenizer), the same batches of default-corpus text go through

- `bare`: `model(input_ids)` under `torch.inference_mode()`, no hooks (full logits);
- `pass`: `discover.activations.PassRunner.fold`: hooks on every layer and the final norm, the
  forward pass, top predictions, and every statistic of every neuron (float64 moments,
  frequency, histogram, top-20 examples by activation and by DLA with their windows), plus
  activation-vs-prediction curves for `--pairs` neuron-token pairs.

The two alternate batch by batch (after one warm-up batch each), so a slow moment of the machine
hits both. Reported: tokens/s of each, `pass / bare` (target >= 0.7), and the peak memory of each
phase measured in a fresh process (RSS high-water mark above the RSS after loading the model).

    python benchmarks/bench_activations.py            # both models, about 6 minutes on 2 cores
    python benchmarks/bench_activations.py --models default --batches 4
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

TARGET = 0.7
MODELS = ("default", "gpt2-small")


def build_gpt2_small(model_dir: Path, n_layer: int = 12) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=n_layer, n_embd=768, n_head=12, n_inner=3072, vocab_size=C.GPT2_VOCAB,
                     bos_token_id=C.GPT2_VOCAB - 1, eos_token_id=C.GPT2_VOCAB - 1)
    GPT2LMHeadModel(cfg).eval().save_pretrained(str(model_dir), safe_serialization=True)
    C.save_tokenizer(C.gpt2_tokenizer(C.GPT2_VOCAB), model_dir, C.GPT2_VOCAB)
    return model_dir


def setup(model_dir: str, args):
    """(view, runner, batches) for one model: fixed batches of default-corpus text."""
    import numpy as np

    import discover.activations as A
    from discover.adapter import load_model
    from discover.corpus import open_corpus

    view = load_model(model_dir)
    context = min(A.model_context(view), args.context)
    batch = args.batch_size or A.auto_batch_size(view, context)
    rng = np.random.default_rng(0)
    pairs = [(int(rng.integers(view.n_layers)), int(rng.integers(view.d_mlp)), int(rng.integers(view.d_vocab)),
              "bench") for _ in range(args.pairs)]
    cfg = A.ActivationConfig(tokens=10**12, batch_size=batch, context=context)
    runner = A.PassRunner(view, cfg, pairs, context, batch)
    seqs = A.sequences(open_corpus(None), "all", view.tokenizer, context, A.bos_id(view.tokenizer))
    batches = []
    for _ in range(args.batches + 1):  # + the warm-up batch
        batches.append([next(seqs) for _ in range(batch)])
    return view, runner, batches


def bare_forward(view, batch):
    import torch

    T = max(len(s[3]) for s in batch)
    ids = torch.tensor([s[3] + [s[3][0]] * (T - len(s[3])) for s in batch])
    with torch.inference_mode():
        view.model(input_ids=ids)


def tokens_of(batch) -> int:
    return sum(len(s[3]) - 1 for s in batch)  # the BOS is not counted by either side


def measure(model_dir: str, args) -> dict:
    view, runner, batches = setup(model_dir, args)
    state = runner.new_state()
    bare_forward(view, batches[0])  # warm-up: allocator, numba compilation
    runner.fold(state, batches[0])
    t_bare = t_pass = 0.0
    n_tok = 0
    per = []
    for b in batches[1:]:
        with C.Timer() as tb:
            bare_forward(view, b)
        with C.Timer() as tp:
            runner.fold(state, b)
        t_bare += tb.s
        t_pass += tp.s
        n_tok += tokens_of(b)
        per.append(round(tb.s / tp.s, 3))
    return {"layers": view.n_layers, "d_mlp": view.d_mlp, "d_model": view.d_model, "vocab": view.d_vocab,
            "context": runner.context, "batch_size": runner.batch_size, "batches": len(batches) - 1,
            "tokens": n_tok, "pairs": len(runner.pairs), "bare_tok_s": n_tok / t_bare, "pass_tok_s": n_tok / t_pass,
            "ratio": t_bare / t_pass, "ratio_per_batch": per}


def phase_child(phase: str, model_dir: str, args) -> dict:
    view, runner, batches = setup(model_dir, args)
    base = C.rss_mb()
    reset = C.reset_peak_rss()
    state = runner.new_state() if phase == "pass" else None
    for b in batches:
        if phase == "bare":
            bare_forward(view, b)
        else:
            runner.fold(state, b)
    return {"phase": phase, "rss_after_load_mb": base,
            "peak_extra_mb": (C.peak_rss_mb() if reset else C.maxrss_mb()) - base, "hwm_reset": reset}


def run_child(argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    ap.add_argument("--batches", type=int, default=6, help="timed batches per model (6)")
    ap.add_argument("--batch-size", type=int, default=None, help="sequences per batch (default: the pass's own)")
    ap.add_argument("--context", type=int, default=256, help="tokens per sequence (256)")
    ap.add_argument("--pairs", type=int, default=256, help="neuron-token pairs with curves (256)")
    ap.add_argument("--layers", type=int, default=12, help="layers of the GPT-2-small-shaped model (12)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory children")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--phase", choices=("bare", "pass"), help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.phase:
        print(json.dumps(phase_child(args.phase, args.model_dir, args)))
        return 0
    from discover.scan import default_model_spec

    quiet = args.json
    res = {"machine": C.machine(), "code": C.code_version(), "models": {}}
    with tempfile.TemporaryDirectory(prefix="bench_act_") as tmp:
        for name in args.models:
            if name == "default":
                model_dir = default_model_spec()
            else:
                C.log(f"building a GPT-2-small-shaped model ({args.layers} layers)", quiet=quiet)
                model_dir = str(build_gpt2_small(Path(tmp) / "gpt2-small", args.layers))
            child = ["--model-dir", model_dir, "--batches", "2", "--context", str(args.context),
                     "--pairs", str(args.pairs)] + (["--batch-size", str(args.batch_size)] if args.batch_size else [])
            mem = {}
            if not args.no_memory:
                for phase in ("bare", "pass"):
                    C.log(f"{name}: peak memory of {phase} in a fresh process", quiet=quiet)
                    mem[phase] = run_child(["--phase", phase, *child])
            C.log(f"{name}: timing {args.batches} batches, bare and pass alternating", quiet=quiet)
            r = measure(model_dir, args)
            r["memory"] = mem
            res["models"][name] = r
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(report(res))
    return 0 if all(r["ratio"] >= TARGET for r in res["models"].values()) else 1


def report(res: dict) -> str:
    rows = []
    for name, r in res["models"].items():
        m = r["memory"]
        rows.append([name, f"{r['layers']}x{r['d_mlp']}", f"{r['batch_size']}x{r['context']}", f"{r['tokens']:,}",
                     f"{r['bare_tok_s']:,.0f}", f"{r['pass_tok_s']:,.0f}", f"{r['ratio']:.2f}",
                     f"{m['bare']['peak_extra_mb']:.0f}" if m else "-", f"{m['pass']['peak_extra_mb']:.0f}" if m else "-"])
    return "\n".join([
        f"corpus pass vs bare forward (target pass / bare >= {TARGET}); machine: {res['machine']}",
        C.table(rows, ["model", "neurons", "batch", "tokens", "bare tok/s", "pass tok/s", "pass/bare",
                       "bare peak MiB", "pass peak MiB"]),
        "pass/bare per batch: " + "; ".join(f"{n}: {r['ratio_per_batch']}" for n, r in res["models"].items()),
    ])


if __name__ == "__main__":
    raise SystemExit(main())
