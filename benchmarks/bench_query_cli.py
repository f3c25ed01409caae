"""A query as a user runs it: a fresh `discover query token " an"` process against a fresh
interpreter that only imports what the query needs (duckdb, numpy, faiss, tokenizers).

Stores: the embedded default model (2,048 tokens) and a GPT-2-shaped model with GPT-2's real
50,257-token vocabulary (2 layers of 3,072 neurons, random weights: the query reads the same
per-token arrays whatever the weights), both scanned once into a temporary store. Then, per
repetition and side by side (alternating, so a slow moment hits both):

- `bare`: `python -c "import duckdb, numpy, faiss, tokenizers"`;
- `query`: `python -m discover query token " an" --store S --model M` (text in, table out: the
  store opened read-only, the stored tokenizer read through `tokenizers`, the answer printed).

Reported: median wall seconds of each and `query / bare` (goal <= 1.5, issue 16), and whether the
query process imported torch or transformers (it must not).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from bench_scan import build_model  # noqa: E402 (GPT-2-small shape, GPT-2's real tokenizer)

TARGET = 1.5
BARE = "import duckdb, numpy, faiss, tokenizers"
HEAVY = ("import json, runpy, sys; sys.argv = ['discover'] + json.loads(sys.argv[1]); "
         "rc = 0\ntry:\n    runpy.run_module('discover', run_name='__main__')\nexcept SystemExit as e:\n    rc = e.code\n"
         "print('HEAVY ' + json.dumps(sorted(m for m in ('torch', 'transformers') if m in sys.modules)), file=sys.stderr)\n"
         "sys.exit(rc)")


def timed(argv: list[str]) -> float:
    t = time.perf_counter()
    out = subprocess.run(argv, capture_output=True, text=True)
    s = time.perf_counter() - t
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:4])} failed:\n{out.stderr[-2000:]}")
    return s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=15, help="fresh processes per side and model (15)")
    ap.add_argument("--text", default=" an", help='the token queried (" an")')
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    res = {"machine": C.machine(), "code": C.code_version(), "repeats": args.repeats, "models": {}}
    with tempfile.TemporaryDirectory(prefix="bench_query_cli_") as tmp:
        tmp = Path(tmp)
        from discover.defaults import default_model_spec

        specs = {"default": default_model_spec(), "gpt2-vocab": None}
        for name in specs:
            C.log(f"{name}: scanning into a fresh store", quiet=args.json)
            if specs[name] is None:
                specs[name] = str(build_model(tmp / "gpt2", 2))
            store = tmp / f"store-{name}"
            subprocess.run([sys.executable, "-m", "discover", "scan", specs[name], "--store", str(store)],
                           check=True, capture_output=True)
            q = ["query", "token", args.text, "--store", str(store), "--model", specs[name]]
            check = subprocess.run([sys.executable, "-c", HEAVY, json.dumps(q)], capture_output=True, text=True)
            heavy = json.loads(check.stderr.strip().splitlines()[-1].split("HEAVY ", 1)[1])
            timed([sys.executable, "-c", BARE])  # warm the page cache for both sides
            timed([sys.executable, "-m", "discover", *q])
            bare, query = [], []
            for _ in range(args.repeats):
                bare.append(timed([sys.executable, "-c", BARE]))
                query.append(timed([sys.executable, "-m", "discover", *q]))
            res["models"][name] = {"bare_s": C.median(bare), "query_s": C.median(query),
                                   "ratio": C.median(query) / C.median(bare), "imports_heavy": heavy,
                                   "query_p90_s": C.percentile(query, 90), "bare_p90_s": C.percentile(bare, 90)}
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(C.table([[n, f"{r['bare_s'] * 1000:.0f}", f"{r['query_s'] * 1000:.0f}", f"{r['ratio']:.2f}",
                        ", ".join(r["imports_heavy"]) or "none"] for n, r in res["models"].items()],
                      ["store", "bare import ms", "query ms", "query/bare", "torch/transformers imported"]))
        print(f"goal: query/bare <= {TARGET}, medians of {args.repeats} fresh processes each")
    ok = all(r["ratio"] <= TARGET and not r["imports_heavy"] for r in res["models"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
