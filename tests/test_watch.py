"""`discover watch` over a tiny `discover train` checkpoint series: each checkpoint processed exactly
once, nothing new on the next look, kill -9 at several points resumes to the same catalog as an
uninterrupted run, the lock holds, a corrupt checkpoint is recorded and the run goes on; tracking
follows permuted neurons; `query changes`, `query neuron --history` and the report's changes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch
from test_train import TINY, write_corpus

from discover.cli import main
from discover.watch import WatchConfig, find_checkpoints, store_lock, watch_loop

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """A tiny training run with 4 checkpoints (steps 10, 20, 30, 40) and its corpus."""
    from discover.train import TrainConfig, train

    base = tmp_path_factory.mktemp("series")
    corpus = write_corpus(base / "corpus")
    train(TrainConfig(out=str(base / "run"), corpus=str(corpus), **{**TINY, "keep_checkpoints": 10}), progress=False)
    return base / "run", corpus


def args_for(corpus) -> list[str]:
    return ["--tokens", "3000", "--verify-tokens", "3000", "--verify-split", "all", "--corpus", str(corpus),
            "--candidates", "5", "--settle", "0"]


def watch_json(capsys, run, store, corpus, *extra) -> tuple[int, dict]:
    capsys.readouterr()
    rc = main(["watch", str(run), "--once", *args_for(corpus), "--store", str(store), "--json", *extra])
    return rc, json.loads(capsys.readouterr().out)


def q(store, sql, params=()):
    con = duckdb.connect(str(Path(store) / "catalog.duckdb"), read_only=True)
    try:
        return con.execute(sql, list(params)).fetchall()
    finally:
        con.close()


@pytest.fixture(scope="module")
def watched(series, tmp_path_factory):
    """One uninterrupted `watch --once` over the series, then a second look."""
    run, corpus = series
    store = tmp_path_factory.mktemp("watched") / "store"
    from discover.watch import watch_once

    cfg = WatchConfig(tokens=3000, verify_tokens=3000, verify_split="all", corpus=str(corpus), candidates=5, settle=0)
    first = watch_once(run, store, cfg, progress=False)
    second = watch_once(run, store, cfg, progress=False)
    return store, first, second


def test_each_checkpoint_processed_once_then_nothing_new(series, watched):
    run, _ = series
    store, first, second = watched
    assert (first.found, first.new, first.processed, first.failed, first.exit_code) == (4, 4, 4, 0, 0)
    assert (second.found, second.new, second.processed, second.exit_code) == (4, 0, 0, 0)
    rows = q(store, "SELECT step, status, prev_checkpoint_id IS NULL FROM watch_checkpoints ORDER BY step")
    assert rows == [(10, "done", True), (20, "done", False), (30, "done", False), (40, "done", False)]
    # every stage's rows exist once per checkpoint
    for table in ("checkpoints", "activation_passes", "verify_runs"):
        assert q(store, f"SELECT count(*), count(DISTINCT checkpoint_id) FROM {table}") == [(4, 4)], table
    assert q(store, "SELECT count(*) FROM watch_results WHERE status = 'done'") == [(4,)]
    assert q(store, "SELECT status, processed FROM watch_runs ORDER BY started_at") == [("ok", 4), ("ok", 0)]
    # tracking: 3 consecutive pairs, every neuron matched once (1 layer x 64 neurons)
    assert q(store, "SELECT count(*), count(DISTINCT checkpoint_id) FROM neuron_matches") == [(3 * 64, 3)]
    # consecutive checkpoints of one run: each neuron's best match is itself, and ever more similar
    sims = q(store, "SELECT w.step, avg((m.neuron = m.prev_neuron)::INT), median(m.similarity) FROM neuron_matches m "
                    "JOIN watch_checkpoints w USING (checkpoint_id) GROUP BY w.step ORDER BY w.step")
    assert all(same > 0.95 for _, same, _ in sims)
    assert [s for _, _, s in sims] == sorted(s for _, _, s in sims)
    for step in (10, 20, 30, 40):
        assert (Path(store) / "reports" / f"run-checkpoint-{step}.html").is_file()


def test_no_new_look_imports_no_torch(series, watched):
    """The nothing-new path lists directories and reads the catalog only (the 2 s budget)."""
    run, _ = series
    store, _, _ = watched
    code = ("import sys; from discover.cli import main; rc = main(['watch', sys.argv[1], '--once', '--store', "
            "sys.argv[2]]); print('torch' in sys.modules, 'transformers' in sys.modules); sys.exit(rc)")
    p = subprocess.run([sys.executable, "-c", code, str(run), str(store)], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == "False False"
    assert "nothing new" in p.stderr


def _table(store, sql):
    return sorted(q(store, sql), key=repr)


def test_kill9_at_any_stage_resumes_to_the_same_catalog(series, watched, tmp_path):
    run, corpus = series
    clean, _, _ = watched
    store = tmp_path / "store"
    cmd = [sys.executable, "-m", "discover", "watch", str(run), "--once", *args_for(corpus), "--store", str(store)]
    # killed: while the 2nd checkpoint's stages finish; inside its completion transaction; just after it commits
    for at in ("pipeline:2", "commit:1", "done:1"):
        p = subprocess.run(cmd, env={**os.environ, "DISCOVER_WATCH_KILL_AT": at}, capture_output=True, text=True,
                           cwd=ROOT)
        assert p.returncode == -9, (at, p.returncode, p.stderr[-2000:])
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    assert q(store, "SELECT status FROM watch_runs ORDER BY started_at") == [
        ("interrupted",), ("interrupted",), ("interrupted",), ("ok",)]
    assert q(store, "SELECT path, count(*) FROM watch_results WHERE status = 'done' GROUP BY path HAVING count(*) > 1") == []
    assert q(store, "SELECT count(*) FROM watch_results WHERE status = 'done'") == [(4,)]
    # the same rows as the uninterrupted run, none duplicated or half-written
    for sql in ("SELECT checkpoint_id, count(*) FROM neurons GROUP BY ALL",
                "SELECT checkpoint_id, count(*), sum(tokens) FROM activation_passes GROUP BY ALL",
                "SELECT checkpoint_id, count(*) FROM neuron_activations GROUP BY ALL",
                "SELECT checkpoint_id, layer, neuron, kind, subject, verdict FROM hypotheses",
                "SELECT checkpoint_id, prev_checkpoint_id, layer, neuron, prev_neuron, round(similarity, 9) "
                "FROM neuron_matches",
                "SELECT checkpoint_id, prev_checkpoint_id, layer, neuron, prev_neuron, change, subject, "
                "round(score, 9) FROM neuron_changes",
                "SELECT path, step, checkpoint_id, prev_checkpoint_id, status FROM watch_checkpoints"):
        assert _table(store, sql) == _table(clean, sql), sql


def test_lock_keeps_a_second_watch_out(series, tmp_path, capsys):
    run, corpus = series
    store = tmp_path / "store"
    store.mkdir()
    with store_lock(store):
        rc = main(["watch", str(run), "--once", *args_for(corpus), "--store", str(store)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 4
    assert len(err) == 1 and "another `discover watch`" in err[0] and f"pid {os.getpid()}" in err[0]
    assert not (store / "catalog.duckdb").exists()


def test_corrupt_checkpoint_is_recorded_and_the_run_goes_on(series, tmp_path, capsys):
    run, corpus = series
    run2 = tmp_path / "run2"
    for step in (10, 20):
        shutil.copytree(run / f"checkpoint-{step}", run2 / f"checkpoint-{step}")
    bad = run2 / "checkpoint-10" / "model.safetensors"
    good = bad.read_bytes()
    bad.write_bytes(good[: len(good) // 2])
    store = tmp_path / "store"
    # just written: left for a later look, nothing recorded
    rc, s = watch_json(capsys, run2, store, corpus, "--settle", "3600")
    assert rc == 0 and (s["new"], s["settling"]) == (0, 2)
    assert q(store, "SELECT count(*) FROM watch_checkpoints") == [(0,)]
    rc, s = watch_json(capsys, run2, store, corpus)
    assert rc == 3 and (s["processed"], s["failed"]) == (1, 1)
    [(status, error)] = q(store, "SELECT status, error FROM watch_checkpoints WHERE step = 10")
    assert status == "failed" and "corrupt" in error
    assert q(store, "SELECT status FROM watch_checkpoints WHERE step = 20") == [("done",)]
    assert q(store, "SELECT status FROM watch_runs ORDER BY started_at") == [("ok",), ("failed",)]
    # not retried while its files are unchanged
    rc, s = watch_json(capsys, run2, store, corpus)
    assert rc == 0 and s["new"] == 0
    # repaired: processed on the next look
    bad.write_bytes(good)
    rc, s = watch_json(capsys, run2, store, corpus)
    assert rc == 0 and (s["new"], s["processed"]) == (1, 1)
    assert q(store, "SELECT status, error FROM watch_checkpoints WHERE step = 10") == [("done", None)]
    # processed after step 20: step 20 is now tracked against it, and a neuron's history spans both
    [(id10,)] = q(store, "SELECT checkpoint_id FROM watch_checkpoints WHERE step = 10")
    assert q(store, "SELECT prev_checkpoint_id FROM watch_checkpoints WHERE step = 20") == [(id10,)]
    assert q(store, "SELECT count(*) FROM neuron_matches WHERE prev_checkpoint_id = ?", [id10]) == [(64,)]
    assert main(["query", "neuron", "L0.N3", "--history", "--model", str(run2), "--store", str(store), "--json"]) == 0
    h = json.loads(capsys.readouterr().out)
    assert [p["step"] for p in h["history"]] == [10, 20] and h["complete"]
    # new file times, same content: not processed again
    os.utime(run2 / "checkpoint-20" / "model.safetensors", ns=(1, 1))
    rc, s = watch_json(capsys, run2, store, corpus)
    assert rc == 0 and (s["new"], s["unchanged"], s["processed"]) == (1, 1, 0)
    assert q(store, "SELECT count(*) FROM verify_runs") == [(2,)]


def _permuted_copy(src: Path, dst: Path, seed: int = 0) -> np.ndarray:
    """dst = src with every layer's MLP neurons permuted (the same function): new neuron i = old perm[i]."""
    from transformers import AutoModelForCausalLM

    shutil.copytree(src, dst)
    model = AutoModelForCausalLM.from_pretrained(str(src))
    perm = np.random.default_rng(seed).permutation(model.config.n_inner)
    idx = torch.as_tensor(perm)
    with torch.no_grad():
        for block in model.transformer.h:
            block.mlp.c_fc.weight.copy_(block.mlp.c_fc.weight[:, idx])
            block.mlp.c_fc.bias.copy_(block.mlp.c_fc.bias[idx])
            block.mlp.c_proj.weight.copy_(block.mlp.c_proj.weight[idx, :])
    model.save_pretrained(str(dst))
    return perm


def test_tracking_follows_permuted_neurons(series, tmp_path, capsys):
    run, corpus = series
    perm_run = tmp_path / "perm"
    shutil.copytree(run / "checkpoint-40", perm_run / "checkpoint-1")
    perm = _permuted_copy(run / "checkpoint-40", perm_run / "checkpoint-2")
    store = tmp_path / "store"
    rc, s = watch_json(capsys, perm_run, store, corpus)
    assert rc == 0 and s["processed"] == 2
    rows = q(store, "SELECT m.neuron, m.prev_neuron, m.similarity, m.cos_in, m.mutual FROM neuron_matches m "
                    "ORDER BY m.neuron")
    assert [r[1] for r in rows] == perm.tolist()
    assert all(r[2] > 1 - 1e-4 and r[3] > 1 - 1e-4 and r[4] for r in rows)
    # the same neurons under new indices: no role gained or lost, no statistic moved
    assert q(store, "SELECT count(*) FROM neuron_changes WHERE change IN ('role_gained', 'role_lost', 'moved')") == [(0,)]
    # the history follows neuron i back to perm[i]
    i = 7
    assert main(["query", "neuron", f"L0.N{i}", "--history", "--model", str(perm_run), "--store", str(store),
                 "--json"]) == 0
    h = json.loads(capsys.readouterr().out)
    assert [p["neuron"] for p in h["history"]] == [f"L0.N{perm[i]}", f"L0.N{i}"] and h["complete"]
    assert h["history"][1]["similarity_to_previous"] > 1 - 1e-4
    # and forward from the first checkpoint
    assert main(["query", "neuron", f"L0.N{perm[i]}", "--history", "--at", "1", "--model", str(perm_run),
                 "--store", str(store), "--json"]) == 0
    assert [p["neuron"] for p in json.loads(capsys.readouterr().out)["history"]] == [f"L0.N{perm[i]}", f"L0.N{i}"]


def test_query_changes_and_the_report_section(series, watched, capsys):
    run, _ = series
    store, _, _ = watched
    assert main(["query", "changes", "--model", str(run), "--store", str(store), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    steps = [c["step"] for c in res["checkpoints"]]
    assert steps == [10, 20, 30, 40]
    first, *rest = res["checkpoints"]
    assert first["prev_checkpoint_id"] is None and all(c["prev_checkpoint_id"] for c in rest)
    db = {(r[0], r[1]): r[2] for r in q(store, "SELECT checkpoint_id, change, count(*) FROM neuron_changes GROUP BY ALL")}
    for c in rest:
        assert {k: v for k, v in c["counts"].items() if v} == {ch: n for (cid, ch), n in db.items()
                                                                if cid == c["checkpoint_id"]}
        assert c["match"]["similarity_median"] > 0.9
    assert main(["query", "changes", "--model", str(run), "--store", str(store)]) == 0
    out = capsys.readouterr().out
    assert "roles +/-" in out and "checkpoint-40" in out
    html = (Path(store) / "reports" / "run-checkpoint-40.html").read_text()
    data = json.loads(html.split('id="data">', 1)[1].split("</script>", 1)[0])
    assert data["changes"]["step"] == 40 and data["changes"]["prev_step"] == 30
    assert data["changes"]["along_run"]["steps"] == [10, 20, 30, 40]
    node = shutil.which("node")
    if node is not None:  # the page's script draws the changes panel and the plot along the run
        res = subprocess.run([node, str(ROOT / "tests" / "js" / "fake_dom.js"),
                              str(Path(store) / "reports" / "run-checkpoint-40.html")], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-2000:]
        dom = json.loads(res.stdout)
        assert dom["ok"] and dom["changesShown"] and dom["changes"] >= 2 and dom["along"] == 1
        assert dom["counts"].get("polyline", 0) >= 1
    first_html = (Path(store) / "reports" / "run-checkpoint-10.html").read_text()
    assert '"prev_checkpoint_id": null' in first_html or '"prev_checkpoint_id":null' in first_html


def test_bad_inputs_one_line_and_store_untouched(series, tmp_path, capsys):
    run, corpus = series
    store = tmp_path / "store"
    cases = [
        (["watch", str(tmp_path / "nope"), "--once"], "does not exist"),
        (["watch", str(run / "log.jsonl"), "--once"], "is a file"),
        (["watch", str(run), "--once", "--tokens", "0"], "tokens"),
        (["watch", str(run), "--interval", "0"], "--interval"),
        (["query", "changes", "--model", str(run)], "catalog"),
    ]
    for argv, words in cases:
        capsys.readouterr()
        assert main([*argv, "--store", str(store)]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], (argv, err)
        assert not store.exists() or not (store / "catalog.duckdb").exists()


def test_bad_corpus_is_a_settings_error_not_a_failed_checkpoint(series, tmp_path, capsys):
    run, corpus = series
    store = tmp_path / "store"
    argv = ["watch", str(run), "--once", *args_for(corpus), "--store", str(store)]
    argv[argv.index("--corpus") + 1] = str(tmp_path / "no-such-corpus")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no-such-corpus" in err[0]
    assert q(store, "SELECT count(*) FROM watch_checkpoints") == [(0,)]
    assert q(store, "SELECT count(*) FROM watch_runs") == [(0,)]


def test_find_checkpoints_layouts(tmp_path):
    def ckpt(d: Path, weights="model.safetensors", state=None):
        d.mkdir(parents=True)
        (d / "config.json").write_text("{}")
        if weights:
            (d / weights).write_bytes(b"x")
        if state is not None:
            (d / "trainer_state.json").write_text(json.dumps({"global_step": state}))

    ckpt(tmp_path / "a" / "checkpoint-10")
    ckpt(tmp_path / "a" / "checkpoint-2")
    ckpt(tmp_path / "a" / ".tmp-checkpoint-20")  # a trainer's half-written save
    ckpt(tmp_path / "a" / "tmp-checkpoint-30")  # transformers 4.36-4.38 staging directory
    ckpt(tmp_path / "a" / "no-weights", weights=None)
    ckpt(tmp_path / "a" / "final", state=50)
    ckpt(tmp_path / "a" / "exported")
    ckpt(tmp_path / "b" / "seed1" / "step-7")
    ckpt(tmp_path / "hf" / "out", state=1000)  # HF Trainer: the final model saved beside its checkpoints
    ckpt(tmp_path / "hf" / "out" / "checkpoint-1000")
    ckpt(tmp_path / "hf" / "out" / "checkpoint-500")
    ckpt(tmp_path / "c" / "pickled", weights="pytorch_model.bin")
    found = find_checkpoints(tmp_path)
    assert [(f.path.relative_to(tmp_path).as_posix(), f.step) for f in found] == [
        ("a/checkpoint-2", 2), ("a/checkpoint-10", 10), ("a/final", 50), ("a/exported", None),
        ("b/seed1/step-7", 7), ("hf/out/checkpoint-500", 500), ("hf/out/checkpoint-1000", 1000), ("hf/out", None)]
    assert {f.series for f in found} == {str(tmp_path / "a"), str(tmp_path / "b" / "seed1"), str(tmp_path / "hf" / "out")}
    assert "c/pickled" in [f.path.relative_to(tmp_path).as_posix() for f in find_checkpoints(tmp_path, allow_pickle=True)]
    # the signature follows the weight files' size and time
    before = {f.path: f.signature for f in found}
    os.utime(tmp_path / "a" / "checkpoint-2" / "model.safetensors", ns=(5, 5))
    after = {f.path: f.signature for f in find_checkpoints(tmp_path)}
    assert [p.name for p in after if after[p] != before[p]] == ["checkpoint-2"]


def test_loop_mode_runs_passes_and_stops(series, watched):
    run, _ = series
    store, _, _ = watched
    seen = []
    watch_loop(run, store, WatchConfig(), interval=0.01, progress=False,
               on_pass=lambda s: seen.append(s.new) or len(seen) < 2)
    assert seen == [0, 0]


def test_a_checkpoint_jobs_scratch_store_is_held_alone(tmp_path):
    """A job waits while another process (a killed watch's worker) still holds its scratch store,
    takes it when that one lets go, and gives up in one line after its wait."""
    import fcntl
    import threading
    import time

    from discover.errors import ClusterError
    from discover.watch_jobs import scratch_lock

    d = tmp_path / "job"
    d.mkdir()
    other = open(d / ".lock", "a")  # another open file: flock treats it as another holder
    fcntl.flock(other, fcntl.LOCK_EX)
    with pytest.raises(ClusterError, match="held the job's scratch store"):
        with scratch_lock(d, wait=0.6):
            pass
    threading.Timer(0.7, lambda: fcntl.flock(other, fcntl.LOCK_UN)).start()
    t = time.monotonic()
    with scratch_lock(d, wait=10):
        waited = time.monotonic() - t
        with pytest.raises(BlockingIOError):  # now this job holds it
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert 0.6 < waited < 5
    other.close()
