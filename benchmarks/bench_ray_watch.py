"""`discover watch --ray`: checkpoints as parallel jobs against a serial watch, side by side.

A run directory holds N checkpoints (`checkpoint-1` is the embedded default model; each next one
perturbs every MLP weight of the one before by 1% noise, like a night's training). In turn, each
in a fresh process and a fresh store:

  serial  `discover watch RUN --once` (one checkpoint after another, torch on every core)
  ray2    `discover watch RUN --once --ray local:2` (two 1-core jobs at once, committed here)

Reported: the wall time of each watch (Python start-up, the local cluster's start included), the
speedup serial / ray2, each job's seconds on its worker, and the driver's commit time (moving
a job's files in, inserting its rows, tracking, status, report) as a share of the ray2 watch.
The script checks that ray2's catalog has serial's rows (pass statistics, verdicts, tracking).

    python benchmarks/bench_ray_watch.py                          # 4 checkpoints, about 4 minutes on 2 cores
    python benchmarks/bench_ray_watch.py --checkpoints 2 --tokens 5000 --verify-tokens 2000 --json
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

CHECKED = (
    "SELECT * EXCLUDE (pass_id) FROM neuron_activations ORDER BY ALL",
    "SELECT * EXCLUDE (verify_id) FROM hypotheses ORDER BY ALL",
    "SELECT checkpoint_id, prev_checkpoint_id, layer, neuron, prev_neuron, change, subject, score "
    "FROM neuron_changes ORDER BY ALL",
    "SELECT path, step, checkpoint_id, prev_checkpoint_id, status FROM watch_checkpoints ORDER BY ALL",
)


def rows(store: Path, sql: str) -> list:
    import duckdb

    con = duckdb.connect(str(store / "catalog.duckdb"), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoints", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=20_000)
    ap.add_argument("--verify-tokens", type=int, default=5_000)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run = C.checkpoint_series(tmp, a.checkpoints)
        common = ["--once", "--tokens", str(a.tokens), "--verify-tokens", str(a.verify_tokens), "--json"]
        out = {}
        for name, extra in (("serial", []), ("ray2", ["--ray", "local:2"])):
            store = tmp / name
            C.log(f"{name}: watch over {a.checkpoints} checkpoints")
            t = time.perf_counter()
            p = subprocess.run([sys.executable, "-m", "discover", "watch", str(run), *common, "--store", str(store),
                                *extra], capture_output=True, text=True, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
            wall = time.perf_counter() - t
            assert p.returncode == 0, p.stderr[-3000:]
            s = json.loads(p.stdout)
            assert s["processed"] == a.checkpoints, s
            res = {"wall_s": wall, "watch_s": s["seconds"]}
            if name == "ray2":
                jobs = [r["stages"]["job"] for r in s["results"]]
                res["job_s"] = [round(j["seconds"], 1) for j in jobs]
                # a result's seconds are its job's time on the worker plus its commit here
                res["commit_s"] = (sum(r for (r,) in rows(store, "SELECT seconds FROM watch_results"))
                                   - sum(j["seconds"] for j in jobs))
                res["workers"] = len({j["pid"] for j in jobs})
                spans = sorted((j["started"], j["ended"]) for j in jobs)
                res["overlapping_jobs"] = sum(b[0] < a_[1] for a_, b in zip(spans, spans[1:]))
            else:
                res["checkpoint_s"] = [round(r[0], 1) for r in rows(store, "SELECT seconds FROM watch_results "
                                                                           "ORDER BY step")]
            out[name] = res
        same = all(rows(tmp / "serial", q) == rows(tmp / "ray2", q) for q in CHECKED)
    res = {"checkpoints": a.checkpoints, "tokens": a.tokens, "verify_tokens": a.verify_tokens, **out,
           "speedup": out["serial"]["wall_s"] / out["ray2"]["wall_s"],
           "commit_share": out["ray2"]["commit_s"] / out["ray2"]["wall_s"], "identical": same,
           "machine": C.machine(), "code": C.code_version()}
    if a.json:
        print(json.dumps(res, indent=1))
        return
    print(C.table([
        ["serial watch", f"{out['serial']['wall_s']:.1f} s", "per checkpoint " + ", ".join(
            f"{x:g}" for x in out["serial"]["checkpoint_s"])],
        ["--ray local:2 watch", f"{out['ray2']['wall_s']:.1f} s", "jobs on workers " + ", ".join(
            f"{x:g}" for x in out["ray2"]["job_s"]) + f" ({out['ray2']['workers']} workers)"],
        ["speedup serial / ray2", f"{res['speedup']:.2f}x", ""],
        ["driver's commits", f"{out['ray2']['commit_s']:.1f} s", f"{100 * res['commit_share']:.1f}% of the ray2 watch"],
        ["same rows as serial", str(same), ""],
    ], ["measure", "value", ""]))


if __name__ == "__main__":
    main()
