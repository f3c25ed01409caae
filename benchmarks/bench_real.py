"""The main stages on a real model: SmolLM2-135M-Instruct (GGUF Q4_1; 30 layers x 1,536 neurons,
d_model 576, vocabulary 49,152), fetched by `tools/fetch_smollm2.sh`. Timed in one run, side by
side:

  identify   header check + sha256 of the 98 MB file (the checkpoint id)
  load       transformers' GGUF reader: dequantize to float32, build the tokenizer
  matmul     the bare fp32 `W_out @ U` of every layer in the scanner's chunks (inputs precomputed)
  scan       `discover.scan.scan(view)`: every statistic of every neuron over the whole vocabulary
  patch      exact patching of all 46,080 neurons on the "an" study's prompts (positions last)
  loop       one hooked forward pass per neuron, for 64 neurons, scaled to 46,080

and prints the ratios scan / matmul, scan / (load + matmul) and loop / patch, and the neurons
with the largest recovery (with what they write: their top tokens by congruence).

    tools/fetch_smollm2.sh && python benchmarks/bench_real.py [--json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CLEAN = "I climbed up the pear tree and picked a pear. I climbed up the apple tree and picked"
CORRUPT = "I climbed up the pear tree and picked a pear. I climbed up the lemon tree and picked"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print the results as one JSON document")
    args = ap.parse_args()
    import numpy as np
    import torch

    from discover.adapter import identify, load_model
    from discover.patch import PatchConfig, patch_loop, patch_neurons
    from discover.scan import ScanConfig, scan

    path = subprocess.run(["bash", str(ROOT / "tools" / "fetch_smollm2.sh")], capture_output=True, text=True,
                          check=True).stdout.strip()
    out = {"machine": C.machine(), "code": C.code_version(), "model": path}
    with C.Timer() as t:
        identity = identify(path)
    out["identify_s"] = t.s
    with C.Timer() as t:
        view = load_model(path, identity=identity)
    out["load_s"] = t.s
    cfg = ScanConfig()
    with torch.inference_mode():
        U = view.processed_unembed()
        Ws = [view.processed_W_out(l) for l in range(view.n_layers)]
        buf = torch.empty(cfg.chunk_rows, U.shape[1])
        with C.Timer() as t:
            for W in Ws:
                for c0 in range(0, W.shape[0], cfg.chunk_rows):
                    c1 = min(W.shape[0], c0 + cfg.chunk_rows)
                    torch.mm(W[c0:c1], U, out=buf[: c1 - c0])
        out["matmul_s"] = t.s
        del buf, Ws
    with C.Timer() as t:
        result = scan(view, cfg, progress=False)
    out["scan_s"] = t.s
    with C.Timer() as t:
        res = patch_neurons(view, CLEAN, CORRUPT, " an", " a", PatchConfig(), attribution=False)
    out["patch_s"] = t.s
    rec = np.stack([res.recovery[l] for l in range(view.n_layers)])
    sample = list(range(0, view.d_mlp, 24))[:64]
    with C.Timer() as t:
        patch_loop(view, CLEAN, CORRUPT, " an", " a", view.n_layers - 1, sample, PatchConfig())
    out["loop_s_all"] = t.s / len(sample) * rec.size
    strings = view.token_strings()
    top = []
    for flat in np.argsort(-rec.ravel())[:8]:
        layer, n = divmod(int(flat), view.d_mlp)
        lr = result.layers[layer]
        top.append({"neuron": f"L{layer}.N{n}", "recovery": round(float(rec[layer, n]), 4),
                    "writes": [strings[int(i)] for i in lr.top_ids[n][:5]],
                    "against": [strings[int(i)] for i in lr.bottom_ids[n][:5]]})
    out["top_neurons"] = top
    out["ratios"] = {"scan/matmul": out["scan_s"] / out["matmul_s"],
                     "scan/(load+matmul)": out["scan_s"] / (out["load_s"] + out["matmul_s"]),
                     "loop/patch": out["loop_s_all"] / out["patch_s"]}
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(C.table([[k, f"{out[k]:.1f}"] for k in ("identify_s", "load_s", "matmul_s", "scan_s", "patch_s", "loop_s_all")],
                  ["stage", "seconds"]))
    for k, v in out["ratios"].items():
        print(f"{k:>20}: {v:.2f}")
    for row in top:
        print(f"{row['neuron']:>10}  recovery {row['recovery']:+.3f}  writes {row['writes']}  against {row['against']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
