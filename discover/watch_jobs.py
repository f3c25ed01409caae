"""`discover watch --ray ADDRESS`: checkpoints as parallel jobs on a Ray cluster, committed here
one at a time.

Each new checkpoint is one job (a Ray task with `--ray-cpus` cores; as many run at once as the
cluster fits; CPU only, as verify is): it hashes the checkpoint and runs scan -> corpus pass ->
verify -> the report's data into a scratch store of its own, `STORE/.jobs/<key>` (the key: the
checkpoint's path and file signature; on storage every node shares, like the checkpoints and the
corpus). The driver takes the finished jobs in the serial order (run, step) and commits each
whole, alone: its scratch store's files are moved into the store, then one transaction inserts
its rows, tracks it against the run's previous checkpoint, records it as done and writes its
report (with the changes since the previous checkpoint, which only the catalog knows). The
job runs the very code of a serial watch, and tracking runs here in the same order, so the
catalog ends up with the rows a serial watch writes.

A checkpoint whose content the catalog already holds (the same weights under another path) is
not sent: the job stops after hashing and the driver processes it in its own process, reusing
the scan, pass and verify run as a serial watch does.

Faults: a worker that dies has its job retried (Ray task retries) and the job resumes from its
scratch store (the corpus pass from its saved state); a driver killed and rerun sends the
unfinished checkpoints again, to the same scratch stores, so they resume too. A checkpoint that
fails (or whose worker died more often than Ray retries) is recorded as failed with its reason,
as in a serial watch, and the run goes on; its scratch store is kept for a retry
(`--retry-failed`) and removed at a later look otherwise, so none of its rows reach the catalog
(a serial watch keeps the scan of a checkpoint that failed after it).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

JOBS_DIR = ".jobs"  # inside the store: one scratch store per checkpoint job
MOVED = ".moved"  # in a scratch store whose files were moved into the store: never resumed


def job_key(path, signature: str) -> str:
    return hashlib.sha256(f"{path}\0{signature}".encode()).hexdigest()[:20]


def scratch_dir(store_root: Path, found) -> Path:
    return Path(store_root) / JOBS_DIR / job_key(found.path, found.signature)


def clear_stale(store_root: Path, keep: set) -> None:
    """Remove scratch stores of jobs no longer wanted (the checkpoint's files changed, or it is
    done) and of jobs whose commit was cut short (their files were moved out)."""
    d = Path(store_root) / JOBS_DIR
    if d.is_dir():
        for sub in d.iterdir():
            if sub.name not in keep or (sub / MOVED).exists():
                shutil.rmtree(sub, ignore_errors=True)


def run_job(path: str, scratch: str, c, *, known_id: str | None, catalog_ids: list, threads: int) -> dict:
    """One checkpoint on a worker (`c`: the watch's WatchConfig): hash it, then (unless it is
    unchanged or already in the catalog) scan, corpus pass, verify and the report's data into the
    scratch store `scratch`. Returns what the driver commits: the identity, the stages' summaries,
    the pass and verify ids, the report's data; or {status: failed, error} with a serial watch's
    message."""
    from discover.adapter import identify
    from discover.cluster import use_threads
    from discover.errors import failure_reason
    from discover.pipeline import prepare, run_pipeline
    from discover.report import build_report
    from discover.store import Store

    use_threads(threads)
    t0, started = time.perf_counter(), time.time()
    out = {"status": "done", "identity": None, "started": started, "pid": os.getpid()}
    try:
        identity = identify(path, allow_pickle=c.allow_pickle)
        out["identity"] = list(identity)
        if identity[1] == known_id:
            out["status"] = "unchanged"
        elif identity[1] in catalog_ids:
            out["status"] = "inline"  # the catalog has its scan: the driver reuses it, as a serial watch does
        else:
            act, ver = c.act_config(), c.verify_config()
            prepared = prepare(path, corpus=c.corpus, text_field=c.text_field, act_config=act,
                               allow_pickle=c.allow_pickle, split=ver.split, identity=identity)
            with scratch_lock(Path(scratch)), Store(scratch) as st:
                run = run_pipeline(None, st, act_config=act, verify_config=ver, out=None, progress=False,
                                   prepared=prepared)
                t = time.perf_counter()
                vid = run.stages["verify"]["verify_id"]
                view = prepared[0].view
                # the report's data (its vocabulary histograms need the weights); its "changes"
                # section is filled in, and the report written, when the driver commits it
                rep = build_report(st, view.spec, cards=c.cards, view=view, verify_id=vid)
            out.update(stages=run.brief_stages(), pass_id=run.stages["activations"]["pass_id"], verify_id=vid, report_data=rep,
                       report_s=time.perf_counter() - t)
    except Exception as e:  # noqa: BLE001 (recorded as the checkpoint's failure, as in a serial watch)
        out["status"] = "failed"
        out["error"] = failure_reason(e)
    out["seconds"], out["ended"] = time.perf_counter() - t0, time.time()
    return out


@contextmanager
def scratch_lock(scratch: Path, wait: float = 300.0):
    """Hold the job's scratch store alone: a worker of a killed watch may still be writing there
    when the next look resumes the job (the operating system drops the lock when it exits)."""
    import fcntl

    from discover.errors import ClusterError

    scratch.mkdir(parents=True, exist_ok=True)
    with open(scratch / ".lock", "a") as f:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ClusterError(f"another process has held the job's scratch store {scratch} for {wait:.0f} s "
                                       "(a worker of an earlier watch?); stop it, or remove the folder") from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class CheckpointJobs:
    """Runs watch's checkpoint jobs on a cluster (`discover.cluster.Cluster`) and yields each one's
    result in the order given, as soon as it and every one before it have finished; at most one
    job per worker in flight or finished and waiting (`ray.wait` backpressure)."""

    def __init__(self, cluster):
        from discover.errors import ClusterError

        if cluster.spec.gpus > 0:  # verify (part of every job) runs on CPU
            raise ClusterError("watch --ray runs each checkpoint's job on CPU cores (its verify stage needs them); "
                               "drop --ray-gpus and set --ray-cpus")
        self.cluster = cluster
        self.workers = max(1, cluster.workers)  # jobs at once

    def __call__(self, items: list, cfg, catalog_ids: list):
        """items: [(found, scratch dir, known checkpoint id of its path)], cfg: the watch's
        WatchConfig -> yields job results."""
        from discover.cluster import fetch, in_order, remote_task

        if not items:
            return
        from discover.errors import ClusterError

        task = remote_task(self.cluster, run_job)
        threads = max(1, int(self.cluster.spec.cpus))
        tasks = [lambda _slot, f=f, d=d, k=k: task.remote(str(f.path), str(d), cfg, known_id=k,
                                                         catalog_ids=catalog_ids, threads=threads)
                 for f, d, k in items]
        slots = list(range(self.workers))
        for (f, _, _), ref in zip(items, in_order(slots, tasks, per_actor=1)):
            try:
                yield fetch(ref, "its job")
            except ClusterError as e:  # its worker died more often than Ray retries: the run goes on
                yield {"status": "failed", "identity": None, "error": str(e), "seconds": 0.0}


# ------------------------------------------------------------------------------ commit
def move_files(store_root: Path, scratch: Path) -> list[Path]:
    """Move a finished job's checkpoint and pass folders into the store (before its rows commit:
    a kill in between leaves folders no row points at, removed when the store next opens)."""
    moved = []
    (Path(scratch) / MOVED).touch()
    for kind in ("checkpoints", "activations"):
        src = Path(scratch) / kind
        if not src.is_dir():
            continue
        (Path(store_root) / kind).mkdir(parents=True, exist_ok=True)
        for sub in sorted(src.iterdir()):
            dst = Path(store_root) / kind / sub.name
            os.replace(sub, dst)
            moved.append(dst)
    return moved


def insert_rows(con) -> None:
    """Every row of the job's scratch catalog into the store's (inside the caller's transaction,
    with the scratch catalog attached as `job`)."""
    tables = [r[0] for r in con.execute("SELECT table_name FROM information_schema.tables WHERE table_catalog = 'job' "
                                        "ORDER BY table_name").fetchall()]
    for t in tables:
        if con.execute(f"SELECT count(*) FROM job.main.{t}").fetchone()[0]:
            verb = "INSERT OR REPLACE" if t == "models" else "INSERT"  # a spec seen again: its time is updated
            con.execute(f"{verb} INTO main.{t} BY NAME SELECT * FROM job.main.{t}")


@contextmanager
def attached(con, scratch: Path):
    """`with attached(con, scratch):` the scratch store's catalog attached read-only as `job`."""
    import duckdb

    from discover.store import CATALOG

    quoted = str(Path(scratch) / CATALOG).replace("'", "''")
    con.execute(f"ATTACH '{quoted}' AS job (READ_ONLY)")
    try:
        yield con
    finally:
        try:
            con.execute("DETACH job")
        except duckdb.Error:  # best effort: never hides the error that ended the block
            pass
