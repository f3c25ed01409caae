"""`discover watch` costs: a look with nothing new, and one new checkpoint against a plain
scan + activations pass of the same checkpoint, measured side by side in one run.

A run directory holds `checkpoint-1` (the embedded default model) and `checkpoint-2` (the same
weights with every MLP weight perturbed by 1% noise, standing in for the next night's checkpoint).

- `no-new look`: `discover watch RUN --once` as a fresh process (Python start-up, imports, catalog,
  directory listing, run record) after both checkpoints were processed; median of `--repeats`.
- `new checkpoint`: the wall time `watch` spends on checkpoint-2 (checkpoint-1 already processed):
  scan, corpus pass (`--tokens`), verify (`--verify-tokens`), tracking against checkpoint-1, report.
- `plain`: `discover scan` + `discover activations --tokens N` of checkpoint-2 into a fresh store,
  in-process, the same settings; `watch / plain` is the price of verify + tracking + report.

    python benchmarks/bench_watch.py                  # about 4 minutes on 2 cores
    python benchmarks/bench_watch.py --tokens 50000 --verify-tokens 10000
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

BUDGET_S = 2.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--verify-tokens", type=int, default=20_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    from discover.activations import ActivationConfig, run_activations
    from discover.scan import scan_model
    from discover.store import Store
    from discover.watch import WatchConfig, watch_once

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run = C.checkpoint_series(tmp, 2)
        store = tmp / "store"
        cfg = WatchConfig(tokens=a.tokens, verify_tokens=a.verify_tokens, settle=0)
        # checkpoint-1 alone first (warms numba, spaCy, the corpus reader), then checkpoint-2 arrives
        aside = tmp / "aside"
        shutil.move(str(run / "checkpoint-2"), aside)
        C.log("watch: checkpoint-1 (warm-up)")
        watch_once(run, store, cfg, progress=False)
        shutil.move(str(aside), run / "checkpoint-2")

        C.log("plain: scan + activations of checkpoint-2")
        t = time.perf_counter()
        with Store(tmp / "plain") as st:
            scan_model(str(run / "checkpoint-2"), st, progress=False)
            t_scan = time.perf_counter() - t
            run_activations(str(run / "checkpoint-2"), st, ActivationConfig(tokens=a.tokens), progress=False)
        plain = time.perf_counter() - t

        C.log("watch: checkpoint-2 (new)")
        t = time.perf_counter()
        s = watch_once(run, store, cfg, progress=False)
        new = time.perf_counter() - t
        assert s.processed == 1 and s.results[0]["path"].endswith("checkpoint-2"), s
        stages = {k: round(v.get("seconds", 0.0), 2) for k, v in s.results[0]["stages"].items()}

        C.log("watch: nothing new, fresh processes")
        looks = []
        for _ in range(a.repeats):
            t = time.perf_counter()
            p = subprocess.run([sys.executable, "-m", "discover", "watch", str(run), "--once", "--store", str(store)],
                               capture_output=True, text=True)
            looks.append(time.perf_counter() - t)
            assert p.returncode == 0 and "0 new" in p.stdout, p.stdout + p.stderr
        res = {
            "tokens": a.tokens, "verify_tokens": a.verify_tokens,
            "no_new_look_s": C.median(looks), "no_new_look_max_s": max(looks), "budget_s": BUDGET_S,
            "new_checkpoint_s": new, "plain_scan_activations_s": plain, "plain_scan_s": t_scan,
            "watch_over_plain": new / plain, "stages_s": stages,
            "machine": C.machine(), "code": C.code_version(),
        }
    if a.json:
        print(json.dumps(res, indent=1))
        return
    print(C.table([
        ["no-new look (fresh process, median)", f"{res['no_new_look_s']:.2f} s", f"budget {BUDGET_S:.0f} s",
         "ok" if res["no_new_look_s"] <= BUDGET_S else "OVER"],
        ["new checkpoint through watch", f"{new:.1f} s", "", ""],
        ["plain scan + activations", f"{plain:.1f} s", f"watch / plain = {res['watch_over_plain']:.2f}", ""],
    ], ["measure", "time", "", ""]))
    print("watch stages (s): " + ", ".join(f"{k} {v}" for k, v in stages.items()))


if __name__ == "__main__":
    main()
