"""Exact neuron patching: `discover.patch.patch_neurons` (batched, from the cached residual
stream) against one full forward pass per neuron (`patch_loop`: a hook overwrites the neuron's
activation, as the "an" neuron notebook and TransformerLens' patching utilities do), same
prompts, same layer, every neuron of that layer.

Models: the embedded default, and a GPT-2-small-shaped model with random weights and GPT-2's
real tokenizer. Prompts: the "an" study's (clean "... apple tree and picked", corrupted
"lemon"), target " an", contrast " a". Reported per model and position mode: seconds of each,
the speed-up (target >= 20x) and the largest difference between the two, in recovery and in
logits: recovery divides m_patched - m_corrupted by m_clean - m_corrupted, so when the prompts
barely move m (0.03 logits on the embedded model) float32 rounding is magnified in it; the target
(<= 1e-4) is on m_patched, in logits.

    python benchmarks/bench_patch.py                    # both models, layer 0, positions last and all
    python benchmarks/bench_patch.py --models default --layer 1 --positions last
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

CLEAN = "I climbed up the pear tree and picked a pear. I climbed up the apple tree and picked"
CORRUPT = CLEAN.replace("apple", "lemon")
TARGET_SPEEDUP, TARGET_DIFF = 20.0, 1e-4


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", choices=("default", "gpt2-small"), default=["default", "gpt2-small"])
    ap.add_argument("--layer", type=int, default=0, help="the layer patched (0: the most blocks to rerun)")
    ap.add_argument("--positions", nargs="+", choices=("last", "all"), default=["last", "all"])
    ap.add_argument("--loop-neurons", type=int, default=None,
                    help="time the per-neuron loop on the first K neurons only and scale to the layer "
                         "(default: every neuron)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    import numpy as np

    from discover.adapter import load_model
    from discover.patch import PatchConfig, patch_loop, patch_neurons
    from discover.scan import default_model_spec

    rows, out = [], {"machine": C.machine(), "code": C.code_version(), "results": []}
    with tempfile.TemporaryDirectory(prefix="bench_patch_") as tmp:
        for name in args.models:
            if name == "default":
                mdir = default_model_spec()
            else:
                sys.path.insert(0, str(Path(__file__).resolve().parent))
                from bench_activations import build_gpt2_small

                C.log("building a GPT-2-small-shaped model", quiet=args.json)
                mdir = str(build_gpt2_small(Path(tmp) / "gpt2-small"))
            view = load_model(mdir)
            N = view.d_mlp
            K = min(N, args.loop_neurons or N)
            for pos in args.positions:
                cfg = PatchConfig(layers=(args.layer,), positions=pos)
                patch_neurons(view, CLEAN, CORRUPT, " an", " a", cfg, attribution=False)  # warm-up
                C.log(f"{name}, positions {pos}: batched, all {N} neurons of layer {args.layer}", quiet=args.json)
                with C.Timer() as tb:
                    res = patch_neurons(view, CLEAN, CORRUPT, " an", " a", cfg, attribution=False)
                C.log(f"{name}, positions {pos}: one forward pass per neuron, {K} neurons", quiet=args.json)
                with C.Timer() as tl:
                    ref = patch_loop(view, CLEAN, CORRUPT, " an", " a", args.layer, range(K), cfg)
                loop_s = tl.s * N / K
                diff = float(np.abs(res.recovery[args.layer][:K] - ref).max())
                gap = abs(res.m_clean - res.m_corrupted)
                diff_m = diff * gap  # the same difference in m_patched, in logits
                r = {"model": name, "positions": pos, "layer": args.layer, "neurons": N, "loop_neurons": K,
                     "prompt_tokens": len(res.corrupted_tokens), "batched_s": tb.s, "loop_s": loop_s,
                     "speedup": loop_s / tb.s, "max_abs_diff": diff, "m_gap": gap, "max_abs_diff_logits": diff_m,
                     "max_abs_recovery": float(np.abs(ref).max())}
                out["results"].append(r)
                rows.append([name, pos, f"L{args.layer} x {N}", f"{tb.s:.2f}",
                             f"{loop_s:.1f}" + ("" if K == N else f" ({K} timed)"), f"{r['speedup']:.0f}x",
                             f"{gap:.3f}", f"{diff:.1e}", f"{diff_m:.1e}"])
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"exact neuron patching, batched vs one forward pass per neuron (targets: >= {TARGET_SPEEDUP:.0f}x, "
              f"<= {TARGET_DIFF:g} logits); machine: {out['machine']}")
        print(C.table(rows, ["model", "positions", "neurons", "batched s", "loop s", "speed-up", "m_clean - m_corr",
                                   "max |diff| recovery", "max |diff| logits"]))
    ok = all(r["speedup"] >= TARGET_SPEEDUP and r["max_abs_diff_logits"] <= TARGET_DIFF
             for r in out["results"] if r["positions"] == "last")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
