"""Universal neurons (`discover universality`): the streamed, blocked float64 computation against
np.corrcoef on stored activations, and the whole run on the embedded default model.

1. Small case, side by side (alternating repetitions, medians): one layer of N neurons per
   "model", n positions of correlated non-Gaussian activations, held in memory. `streamed`:
   `discover.universality.block_maxima` (chunks of `--chunk` rows folded into float64
   co-moments, then maxima, partners and the rotated baselines from C R^T and diag(R S R^T));
   `corrcoef`: np.corrcoef of the stored arrays, and of the arrays rotated explicitly, for the
   same maxima. Reported: seconds of each, their ratio and the largest difference.
2. The embedded default model against a copy of itself with its MLP neurons permuted within
   each layer (the same function): `universality()` over `--tokens` tokens of the built-in
   corpus. Reported: tokens/s of the computation (forward passes + accumulation +
   finalisation), wall seconds with loading, passes, peak RSS, and the share of neurons found
   universal (every neuron should find its permuted partner at correlation 1).

    python benchmarks/bench_universality.py
    python benchmarks/bench_universality.py --positions 50000 --neurons 1024 --tokens 50000 --json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C


def _activations(n: int, N: int, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 64))
    A = np.maximum(z @ rng.standard_normal((64, N)), 0) + 0.1 * rng.standard_normal((n, N))
    B = np.tanh(z @ rng.standard_normal((64, N))) + 0.1 * rng.standard_normal((n, N)) + 3.0
    return A.astype(np.float32).astype(np.float64), B.astype(np.float32).astype(np.float64)


def small_case(args, out: dict) -> list:
    import numpy as np

    from discover.universality import block_maxima, haar_rotation

    A, B = _activations(args.positions, args.neurons, 0)
    Ra, Rb = haar_rotation(args.neurons, 0, "a" * 16, 0), haar_rotation(args.neurons, 0, "b" * 16, 0)
    N = args.neurons

    def streamed():
        chunks = ((A[i:i + args.chunk], B[i:i + args.chunk]) for i in range(0, len(A), args.chunk))
        m = block_maxima(chunks, Ra, Rb)
        return m["a"]["max_corr"], m["a"]["baseline"], m["b"]["baseline"]

    def reference():
        cross = lambda X, Y: np.corrcoef(X.T, Y.T)[:N, N:]
        return cross(A, B).max(1), cross(A, B @ Rb.T).max(1), cross(A @ Ra.T, B).max(0)

    times: dict = {"streamed": [], "corrcoef": []}
    got = ref = None
    for r in range(args.reps):
        for name, f in (("streamed", streamed), ("corrcoef", reference)):
            with C.Timer() as t:
                res = f()
            times[name].append(t.s)
            got, ref = (res, ref) if name == "streamed" else (got, res)
        C.log(f"small case rep {r + 1}/{args.reps}: streamed {times['streamed'][-1]:.2f} s, "
              f"corrcoef {times['corrcoef'][-1]:.2f} s", quiet=args.json)
    diff = max(float(np.abs(g - e).max()) for g, e in zip(got, ref))
    s, c = C.median(times["streamed"]), C.median(times["corrcoef"])
    out["small_case"] = {"positions": args.positions, "neurons": N, "chunk": args.chunk, "streamed_s": s,
                         "corrcoef_s": c, "ratio": s / c, "max_abs_diff": diff, "reps": args.reps}
    return [["small case: streamed (chunks)", f"{s:.2f} s", f"corrcoef {c:.2f} s", f"ratio {s / c:.2f}",
             f"max |diff| {diff:.1e}"]]


def default_pair(args, out: dict, tmp: Path) -> list:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from discover.scan import default_model_spec
    from discover.store import Store
    from discover.universality import universality

    spec = default_model_spec()
    model = AutoModelForCausalLM.from_pretrained(spec)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a copy with permuted neurons: c_fc columns and bias, c_proj rows
        for blk in model.transformer.h:
            p = torch.randperm(blk.mlp.c_fc.weight.shape[1], generator=g)
            blk.mlp.c_fc.weight.copy_(blk.mlp.c_fc.weight[:, p])
            blk.mlp.c_fc.bias.copy_(blk.mlp.c_fc.bias[p])
            blk.mlp.c_proj.weight.copy_(blk.mlp.c_proj.weight[p, :])
    copy_dir = tmp / "permuted"
    model.save_pretrained(str(copy_dir), safe_serialization=True)
    AutoTokenizer.from_pretrained(spec).save_pretrained(str(copy_dir))
    del model
    C.reset_peak_rss()
    base_rss = C.rss_mb()
    with C.Timer() as wall, Store(tmp / "store") as st:
        s = universality([spec, str(copy_dir)], st, tokens=args.tokens, memory_gb=args.memory_gb,
                         progress=not args.json)
        excess = np.asarray(st.con.execute("SELECT excess FROM neuron_correlations WHERE universality_id = ?",
                                           [s.universality_id]).fetchnumpy()["excess"])
    peak = C.peak_rss_mb()
    frac = float(np.mean([m["fraction"] for m in s.models]))
    out["default_pair"] = {"tokens": s.tokens, "seconds": s.seconds, "tokens_per_s": s.tokens / s.seconds,
                           "wall_s": wall.s, "passes": s.passes, "batch_size": s.batch_size,
                           "peak_rss_mb": peak, "rss_before_mb": base_rss, "memory_gb": args.memory_gb,
                           "universal_fraction": frac, "median_excess": float(np.median(excess))}
    return [["default model vs permuted copy", f"{s.tokens / s.seconds:,.0f} tokens/s",
             f"{s.tokens:,} tokens in {s.seconds:.1f} s ({wall.s:.1f} s with loading), {s.passes} pass(es)",
             f"peak RSS {peak:.0f} MiB (before {base_rss:.0f})", f"universal {100 * frac:.1f}%"]]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--positions", type=int, default=20_000, help="positions of the small case (20000)")
    ap.add_argument("--neurons", type=int, default=1024, help="neurons per model in the small case (1024)")
    ap.add_argument("--chunk", type=int, default=2048, help="rows per streamed chunk (2048)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of the small case (3)")
    ap.add_argument("--tokens", type=int, default=20_000, help="tokens of the default-model run (20000)")
    ap.add_argument("--memory-gb", type=float, default=2.0, help="budget of the default-model run (2)")
    ap.add_argument("--skip-small", action="store_true")
    ap.add_argument("--skip-default", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    out = {"machine": C.machine(), "code": C.code_version()}
    rows = []
    if not args.skip_small:
        rows += small_case(args, out)
    if not args.skip_default:
        with tempfile.TemporaryDirectory(prefix="bench_universality_") as tmp:
            rows += default_pair(args, out, Path(tmp))
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for r in rows:
            print("  |  ".join(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
