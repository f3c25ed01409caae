"""The corpus pass on a Ray cluster equals the same pass in one process.

One local cluster of 2 CPUs is started for the module (a real Ray Core cluster: raylet, GCS,
worker processes); passes run on 2 one-CPU workers (and on 1 two-CPU worker), with shards of two
batches, so that every pass merges several shards per worker. Faults: a worker killed mid-pass,
a driver killed with `kill -9` and rerun. Bad addresses and clusters where no worker fits give
one line and exit 2 with the store untouched.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest

ray = pytest.importorskip("ray")

import discover.activations as A  # noqa: E402
from conftest import make_model, save  # noqa: E402
from discover import cluster as C  # noqa: E402
from discover.store import Store  # noqa: E402
from test_activations import BATCH, CONTEXT, _corpus, _results  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster of 2 CPUs for the module; its GCS address for driver subprocesses."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=2, logging_level="ERROR", log_to_driver=False, include_dashboard=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    import torch

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("ray")
    model = save(make_model("gpt2"), d / "gpt2")
    corpus = _corpus(d / "corpus")
    cfg = A.ActivationConfig(tokens=300, batch_size=BATCH, context=CONTEXT, top_k=5, before=4, after=2,
                             shard_batches=2, pairs=('L1.N3:"an"', "L0.N7:the"), save_every=0)
    return d, model, corpus, cfg


def _single(env, cfg, name):
    d, model, corpus, _ = env
    store = d / name
    with Store(store) as st:
        s = A.run_activations(str(model), st, cfg, corpus=str(corpus), progress=False)
    return s, _results(store)


def _on_cluster(env, cfg, store, address="local:2", cpus=1.0):
    _, model, corpus, _ = env
    with C.Cluster(C.parse_address(address, cpus=cpus)) as cl, Store(store) as st:
        stream = C.ClusterStream(cl)
        s = A.run_activations(str(model), st, cfg, corpus=str(corpus), progress=False, stream=stream)
    return s, stream


@pytest.fixture(scope="module")
def single(env):
    """The budgeted pass (300 tokens) and the whole corpus (partial last batch), in this process."""
    cfg = env[3]
    return {"budget": _single(env, cfg, "single_budget"),
            "whole": _single(env, replace(cfg, tokens=10**9), "single_whole")}


@pytest.mark.parametrize("which", ["budget", "whole"])
def test_two_workers_equal_one_process(cluster, env, single, which, tmp_path):
    """Moments, histograms, examples (with their windows), curves and the pass's counts are
    identical, over more shards than workers; the whole corpus ends in a partial batch."""
    cfg = env[3] if which == "budget" else replace(env[3], tokens=10**9)
    s, stream = _on_cluster(env, cfg, tmp_path / "store")
    want_s, want = single[which]
    assert len(stream.workers) == 2
    assert s.tokens == want_s.tokens and s.exhausted == (which == "whole")
    assert -(-s.sequences // BATCH) > 2 * cfg.shard_batches  # several shards each
    assert _results(tmp_path / "store") == want


def test_shards_do_not_depend_on_the_worker_count(cluster, env, single, tmp_path):
    """One worker of two cores computes the same shards and merges them to the same results."""
    s, stream = _on_cluster(env, env[3], tmp_path / "store", cpus=2)
    assert len(stream.workers) == 1
    assert _results(tmp_path / "store") == single["budget"][1]


def test_extension_on_the_cluster_continues_the_open_shard(cluster, env, single, tmp_path):
    """150 tokens (ending inside a shard: an odd number of batches), then 300 on the cluster:
    equal to one 300-token run."""
    store = tmp_path / "store"
    a, _ = _on_cluster(env, replace(env[3], tokens=150), store)
    assert (a.sequences // BATCH) % env[3].shard_batches == 1
    b, _ = _on_cluster(env, env[3], store)
    assert (a.status, b.status) == ("ran", "extended")
    assert _results(store) == single["budget"][1]


def test_killed_worker_is_restarted_and_its_shard_recomputed(cluster, env, single, tmp_path, monkeypatch):
    """`kill -9` of a worker process after the first merged piece: Ray restarts the actor, the
    shard it held is computed again, and the results are the same."""
    killed = []

    def kill_one(merged):
        if merged == 1 and not killed:
            pid = ray.get(stream_box[0].workers[0].pid.remote())
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    stream_box = []
    orig_init = C.ClusterStream.__init__

    def init(self, cl):
        orig_init(self, cl)
        stream_box.append(self)

    monkeypatch.setattr(C.ClusterStream, "__init__", init)
    monkeypatch.setattr(C, "_after_piece", kill_one)
    _on_cluster(env, env[3], tmp_path / "store")
    assert killed
    assert _results(tmp_path / "store") == single["budget"][1]


def _argv(env, store, address):
    _, model, corpus, cfg = env
    return ["activations", str(model), "--corpus", str(corpus), "--tokens", str(cfg.tokens), "--batch-size",
            str(BATCH), "--context", str(CONTEXT), "--top-k", "5", "--shard-batches", "2", "--pair", 'L1.N3:"an"',
            "--pair", "L0.N7:the", "--save-every", "0", "--store", str(store), "--ray", address]


def test_killed_driver_resumes_with_the_same_result(cluster, env, single, tmp_path):
    """A real `kill -9` of the driver (`discover activations --ray ADDRESS`) after its third merged
    piece; rerun, it continues from its saved state. The before/after windows differ from the
    fixture's (not CLI flags), so the statistics are compared."""
    store = tmp_path / "store"
    code = ("import discover.cluster as C, sys, time\n"
            "C._after_piece = lambda m: (print('piece', m, flush=True), time.sleep(0.5))\n"
            "from discover.cli import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.Popen([sys.executable, "-c", code, *_argv(env, store, cluster)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    t0, seen = time.time(), []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(b"piece 3") or time.time() - t0 > 180:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert any(x.startswith(b"piece 3") for x in seen), proc.stderr.read()[-2000:]
    from discover.cli import main

    assert main(_argv(env, store, cluster) + ["--json"]) == 0
    want = _single(env, replace(env[3], before=50, after=10), "single_cli")[1]
    got = _results(store)
    for t in ("neuron_activations", "activation_histograms", "prediction_curves", "pass"):
        assert got[t] == want[t], t


@pytest.mark.parametrize("address,cpus,says", [
    ("nonsense", "1", "is not a cluster address"),
    ("local:0", "1", "at least 1 CPU"),
    ("127.0.0.1:1", "1", "cannot reach the Ray cluster at 127.0.0.1:1"),
    ("local:2", "4", "no worker fits"),
])
def test_bad_cluster_is_one_line_and_the_store_untouched(env, tmp_path, address, cpus, says):
    """In a fresh process (not the module's cluster): one line naming the problem, exit 2, no store."""
    store = tmp_path / "store"
    argv = _argv(env, store, address) + ["--ray-cpus", cpus]
    out = subprocess.run([sys.executable, "-m", "discover", *argv], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("discover:")]
    assert len(lines) == 1 and says in lines[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert not store.exists()


def test_run_on_the_cluster_equals_run_in_one_process(cluster, env, tmp_path):
    """`discover run --ray ADDRESS` (the corpus pass on the workers, verify here): the same pass
    results and the same verdicts as `discover run`."""
    from discover.cli import main

    _, model, corpus, _ = env
    outs = {}
    for name, extra in (("single", []), ("cluster", ["--ray", cluster])):
        store = tmp_path / name
        argv = ["run", str(model), "--corpus", str(corpus), "--tokens", "300", "--verify-tokens", "200",
                "--verify-split", "all", "--candidates", "2", "--out", str(tmp_path / f"{name}.html"),
                "--store", str(store), "--json", *extra]
        assert main(argv) == 0
        with Store(store, read_only=True) as st:
            verdicts = st.con.execute("SELECT * EXCLUDE (verify_id) FROM hypotheses ORDER BY ALL").fetchall()
        outs[name] = (_results(store), verdicts)
    assert outs["single"][1]  # hypotheses were tested
    assert outs["single"] == outs["cluster"]


def test_watch_jobs_on_two_workers_equal_a_serial_watch(cluster, tmp_path):
    """`discover watch --ray ADDRESS` over a series of 4 checkpoints and a corrupt one: the
    checkpoints run as parallel jobs (two at once on the 2 workers), committed here one at a
    time, and give the rows of a serial watch: scans, pass statistics, examples, verdicts,
    tracking, each checkpoint's status (the corrupt one failed with the same reason). A driver
    killed inside its second commit and rerun ends with the same rows."""
    import json
    import shutil

    import duckdb

    from discover.cli import main
    from discover.train import TrainConfig, train
    from test_train import TINY, write_corpus

    corpus = write_corpus(tmp_path / "corpus")
    run = tmp_path / "run"
    train(TrainConfig(out=str(run), corpus=str(corpus), **{**TINY, "keep_checkpoints": 10}), progress=False)
    bad = run / "extra" / "checkpoint-1"  # a second series: one checkpoint whose weights are cut short
    shutil.copytree(sorted(run.glob("checkpoint-*"))[0], bad)
    weights = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    common = ["--once", "--tokens", "3000", "--verify-tokens", "3000", "--verify-split", "all", "--corpus", str(corpus),
              "--candidates", "5", "--settle", "0", "--json", "--format", "json"]
    stores = {}
    for name, extra in (("serial", []), ("cluster", ["--ray", cluster])):
        stores[name] = tmp_path / name
        assert main(["watch", str(run), *common, "--store", str(stores[name]), *extra]) == 3  # one failed
    # killed inside its second commit (files moved in, rows not committed), then rerun
    stores["killed"] = tmp_path / "killed"
    cmd = [sys.executable, "-m", "discover", "watch", str(run), *common, "--store", str(stores["killed"]),
           "--ray", cluster]
    p = subprocess.run(cmd, env={**os.environ, "DISCOVER_WATCH_KILL_AT": "commit:2"}, capture_output=True, text=True)
    assert p.returncode == -9, p.stderr[-2000:]
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 3, p.stderr[-2000:]

    def rows(store, sql):
        con = duckdb.connect(str(store / "catalog.duckdb"), read_only=True)
        try:
            return con.execute(sql).fetchall()
        finally:
            con.close()

    for sql in ("SELECT checkpoint_id, layer, neuron, vocab_mean, vocab_kurt, role FROM neurons ORDER BY ALL",
                "SELECT checkpoint_id, layer, neuron, role, score FROM roles ORDER BY ALL",
                "SELECT * EXCLUDE (pass_id) FROM neuron_activations ORDER BY ALL",
                "SELECT * EXCLUDE (pass_id) FROM activation_examples ORDER BY ALL",
                "SELECT * EXCLUDE (pass_id) FROM activation_histograms ORDER BY ALL",
                "SELECT * EXCLUDE (pass_id) FROM prediction_curves ORDER BY ALL",
                "SELECT checkpoint_id, tokens, sequences FROM activation_passes ORDER BY ALL",
                "SELECT * EXCLUDE (verify_id) FROM hypotheses ORDER BY ALL",
                "SELECT * FROM neuron_matches ORDER BY ALL",
                "SELECT checkpoint_id, prev_checkpoint_id, layer, neuron, prev_neuron, change, subject, score "
                "FROM neuron_changes ORDER BY ALL",
                "SELECT spec, checkpoint_id FROM models ORDER BY ALL",
                "SELECT path, step, checkpoint_id, prev_checkpoint_id, status, error FROM watch_checkpoints "
                "ORDER BY ALL"):
        want = rows(stores["serial"], sql)
        assert want or "curves" in sql or "changes" in sql, sql  # (this tiny model may have no candidates)
        assert rows(stores["cluster"], sql) == want, sql
        assert rows(stores["killed"], sql) == want, sql
    [(error,)] = rows(stores["cluster"], "SELECT error FROM watch_checkpoints WHERE status = 'failed'")
    assert "corrupt" in error or "truncated" in error or "safetensors" in error.lower(), error
    assert len(rows(stores["cluster"], "SELECT * FROM watch_checkpoints WHERE status = 'done'")) == 4
    # the jobs ran two at a time, on two worker processes
    jobs = [json.loads(st)["job"] for (st,) in rows(stores["cluster"], "SELECT stages FROM watch_results "
                                                                       "WHERE status = 'done'")]
    spans = sorted((j["started"], j["ended"]) for j in jobs)
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:])), spans
    assert len({j["pid"] for j in jobs}) == 2
    def reports(store):  # each report's changes since the previous checkpoint, and its cards' neurons
        out = {}
        for p in sorted((store / "reports").glob("*.json")):
            rep = json.loads(p.read_text().replace(str(store), "STORE"))  # report paths inside the store
            out[p.name] = (rep["changes"], [c["neuron"] for c in rep["cards"]])
        return out

    want = reports(stores["serial"])
    assert len(want) == 4 and sum(ch is not None and ch.get("along_run") is not None for ch, _ in want.values()) == 4
    assert reports(stores["cluster"]) == want
    assert reports(stores["killed"]) == want
    for name in ("cluster", "killed"):  # no scratch store left, every file referenced
        assert not list((stores[name] / ".jobs").glob("*")), name
        dirs = {r[0] for r in rows(stores[name], "SELECT files_dir FROM checkpoints")}
        assert {d.name for d in (stores[name] / "checkpoints").iterdir()} == dirs
        dirs = {r[0] for r in rows(stores[name], "SELECT files_dir FROM activation_passes")}
        assert {d.name for d in (stores[name] / "activations").iterdir()} == dirs


def test_watch_jobs_refuse_gpu_workers():
    """Every checkpoint job runs verify, which runs on CPU: --ray-gpus is one clear line."""
    from types import SimpleNamespace

    from discover.errors import ClusterError
    from discover.watch_jobs import CheckpointJobs

    with pytest.raises(ClusterError, match="--ray-cpus"):
        CheckpointJobs(SimpleNamespace(spec=C.parse_address("local:1", gpus=1.0), workers=1))


def test_verify_on_two_workers_equals_one_process(cluster, env, tmp_path, monkeypatch):
    """`discover verify --ray ADDRESS`: the held-out forward passes and the mean ablations of the
    prediction hypotheses (one layer's jobs together) run on the same two workers, each loading
    the model once; every verdict and every number of its evidence (feature scores included)
    equal one process's."""
    import json

    from discover.cli import main

    _, model, corpus, _ = env
    started = []

    def counted(cl, cls, n, *args, **kw):
        started.append((cls.__name__, n))
        return start(cl, cls, n, *args, **kw)

    start = C.start_actors
    monkeypatch.setattr(C, "start_actors", counted)
    outs = {}
    for name, extra in (("single", []), ("cluster", ["--ray", cluster])):
        store = tmp_path / name
        argv = ["verify", str(model), "--corpus", str(corpus), "--tokens", "600", "--split", "all", "--candidates",
                "6", "--controls", "5", "--per-rule", "1", "--store", str(store), "--json", *extra]
        assert main(argv) == 0
        with Store(store, read_only=True) as st:
            rows = st.con.execute("SELECT layer, neuron, kind, subject, verdict, decided_by, evidence FROM hypotheses "
                                  "ORDER BY ALL").fetchall()
        outs[name] = [r[:6] + (json.loads(r[6]),) for r in rows]
    tested = [r for r in outs["single"] if r[2] != "feature" and r[6].get("ablation_positions", 0) > 0]
    assert len({r[0] for r in tested}) >= 2, outs["single"]  # ablations on more than one layer
    assert any(r[2] == "feature" for r in outs["single"])  # feature scores from the workers' activations
    assert outs["cluster"] == outs["single"]
    assert started == [("VerifyWorker", 2)]  # one model load per worker for the whole verify run


def test_universality_on_two_workers_equals_one_process(cluster, env, tmp_path):
    """`discover universality --ray ADDRESS`: (shard, pass) work items on the workers, shard
    moments merged in order here; every correlation, partner and baseline equals one process
    streaming the same shards (`--shard-batches 2`), over two passes (a small --memory-gb)."""
    import torch

    from discover.cli import main

    d, model_a, corpus, _ = env
    torch.manual_seed(7)
    model_b = save(make_model("gpt2"), d / "gpt2_seed7")
    outs = {}
    for name, extra in (("single", []), ("cluster", ["--ray", cluster])):
        store = tmp_path / name
        argv = ["universality", str(model_a), str(model_b), "--corpus", str(corpus), "--tokens", "1500", "--context",
                str(CONTEXT), "--batch-size", str(BATCH), "--shard-batches", "2", "--memory-gb", "0.0015",
                "--store", str(store), "--json", *extra]
        assert main(argv) == 0
        with Store(store, read_only=True) as st:
            passes = st.con.execute("SELECT json_extract(settings, '$.passes')::INT FROM universality_runs").fetchone()[0]
            rows = st.con.execute("SELECT * EXCLUDE (universality_id) FROM neuron_correlations ORDER BY ALL").fetchall()
            uni = st.con.execute("SELECT * EXCLUDE (universality_id) FROM universal_neurons ORDER BY ALL").fetchall()
        outs[name] = (passes, rows, uni)
    assert outs["single"][0] >= 2 and outs["single"][1]
    assert outs["cluster"] == outs["single"]


def test_a_worker_that_reads_other_text_is_one_line_and_its_actors_stop(cluster, env, tmp_path):
    """The workers check that their copy of the corpus is the driver's (its fingerprint): here the
    driver's is altered, so every worker refuses; the driver reports the worker's own reason in
    one line, stops its actors, and nothing is committed."""
    from discover.errors import ClusterError

    _, model, corpus, cfg = env
    plan = A.prepare(str(model), cfg, corpus=str(corpus))
    plan.described["fingerprint"] = "0" * 16
    store = tmp_path / "store"
    with C.Cluster(C.parse_address("local:2")) as cl, Store(store) as st:
        stream = C.ClusterStream(cl)
        with pytest.raises(ClusterError) as e:
            A.run_activations(str(model), st, cfg, progress=False, plan=plan, stream=stream)
        assert st.con.execute("SELECT count(*) FROM neuron_activations").fetchone() == (0,)
    msg = str(e.value)
    assert "differs from the driver's" in msg and "\n" not in msg and "\x1b" not in msg
    assert len(stream.workers) == 2
    for w in stream.workers:  # killed: a call on the actor fails instead of being served
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(w.pid.remote(), timeout=60)
