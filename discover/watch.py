"""`discover watch DIR`: nightly discovery over the checkpoints of training runs.

Every directory under DIR that holds a `config.json` and weights (`*.safetensors`, or
`pytorch_model*.bin` with --allow-pickle) is a checkpoint, and so is every `.gguf` file of a
directory without such weights (its step from the file name, its run the directory): HF Trainer `checkpoint-STEP/` layouts,
`discover train` runs, or plain model directories. Its step comes from the name (`checkpoint-STEP`,
`step-STEP`, `stepSTEP`...) or from `trainer_state.json`; checkpoints are processed in step order
within each training run (a run = the checkpoints' parent directory). Hidden directories (names
starting with a dot, such as a trainer's half-written `.tmp-checkpoint-N`) are skipped.

What is new: a checkpoint whose files' signature (names, sizes and modification times of the
config and weights) has no record in the catalog. A changed signature is rehashed; if the content
hash is unchanged only the signature is updated. Each new checkpoint goes through scan ->
activations (`--tokens`) -> verify (`--candidates` strongest prediction candidates + the feature
rules) -> tracking against the run's previous checkpoint (`discover.track`) -> report; one
transaction then records it as done with its results. A checkpoint that fails (corrupt weights,
an unsupported model...) is recorded as failed with its reason and the run goes on; it is retried
when its files change, or with --retry-failed.

Safety: a lock file (`STORE/watch.lock`, an advisory `flock`, released by the kernel when the
process dies) keeps two watches off one store. After `kill -9` at any point the next run marks
the dead run `interrupted` and redoes the checkpoint it was on: every stage commits whole or not at
all (the corpus pass resumes from its saved state), and a checkpoint's tracking rows, its status
and its per-run result are written in one transaction, so nothing is duplicated or half-written.

With `--ray ADDRESS` the checkpoints run as parallel jobs on a cluster, each into a scratch store,
and are committed here one at a time in the order above (`discover.watch_jobs`): the same rows.

Exit codes: 0 every checkpoint found is processed (or nothing was new); 2 bad input (no such
directory, bad settings); 3 some checkpoint failed (recorded; the others were processed); 4 another
`discover watch` holds the store's lock; 130 interrupted.

A run with nothing new imports neither torch nor transformers: it lists directories, compares
file signatures with the catalog and records the run (well under the 2 s budget).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from discover.errors import DiscoverError, failure_reason

EXIT_FAILED = 3
EXIT_BUSY = 4
LOCK_NAME = "watch.lock"
_STEP_RE = re.compile(r"(?:checkpoint|global_step|step|ckpt|iter)[-_]?(\d+)", re.IGNORECASE)


class WatchBusy(DiscoverError):
    """Another `discover watch` holds the store's lock."""

    exit_code = EXIT_BUSY


@dataclass
class WatchConfig:
    tokens: int = 200_000  # corpus-pass tokens per checkpoint
    verify_tokens: int = 20_000
    candidates: int = 20
    verify_split: str = "heldout"
    corpus: str | None = None
    text_field: str = "text"
    reports: str | None = None  # directory of the reports (default: STORE/reports)
    settle: float = 60.0  # seconds a checkpoint's files must be unchanged before it is processed
    fmt: str = "html"
    cards: int = 100
    retry_failed: bool = False
    allow_pickle: bool = False

    def __post_init__(self):
        self.act_config()
        self.verify_config()
        if self.cards < 1:
            raise ValueError("cards must be at least 1")
        if self.settle < 0:
            raise ValueError(f"settle must be >= 0 seconds, got {self.settle}")
        if self.fmt not in ("html", "md", "json"):
            raise ValueError(f"format must be html, md or json, got {self.fmt!r}")

    def act_config(self):
        from discover.activations import ActivationConfig

        return ActivationConfig(tokens=self.tokens)

    def verify_config(self):
        from discover.verify import VerifyConfig

        return VerifyConfig(tokens=self.verify_tokens, candidates=self.candidates, split=self.verify_split)


@dataclass
class Found:
    path: Path
    series: str
    step: int | None
    signature: str
    newest: float = 0.0  # newest modification time of its config and weight files (seconds)


@dataclass
class WatchSummary:
    run_id: str
    watch_dir: str
    status: str = "running"
    found: int = 0
    new: int = 0
    settling: int = 0  # new, but written less than `settle` seconds ago: left for the next look
    processed: int = 0
    failed: int = 0
    unchanged: int = 0
    results: list = field(default_factory=list)
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        return EXIT_FAILED if self.failed else 0


# -------------------------------------------------------------------------- discovery
def _is_weight(name: str, allow_pickle: bool) -> bool:
    return name.endswith(".safetensors") or (allow_pickle and name.startswith("pytorch_model") and name.endswith(".bin"))


def _step(path: Path, entries: dict) -> int | None:
    m = None
    for m in _STEP_RE.finditer(path.name):
        pass
    if m is not None:
        return int(m.group(1))
    if "trainer_state.json" in entries:
        try:
            return int(json.loads(Path(entries["trainer_state.json"].path).read_text())["global_step"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return None


def _skipped(name: str) -> bool:
    """Hidden directories and trainers' staging directories (`.tmp-checkpoint-N`, `tmp-checkpoint-N`)."""
    return name.startswith((".", "tmp-", "tmp_"))


def find_checkpoints(root: Path, *, allow_pickle: bool = False) -> list[Found]:
    """Every checkpoint directory under `root` (itself included), in (run, step, path) order.

    A run (series) is a checkpoint's parent directory; a checkpoint directory that also holds
    checkpoints (a trainer's output directory after it saved the final model) belongs to the run
    of its own checkpoints and comes after them."""
    out: list[Found] = []
    stack = [root]
    while stack:
        d = stack.pop()
        try:
            entries = {e.name: e for e in os.scandir(d)}
        except OSError:
            continue  # unreadable or vanished while we looked
        weights = sorted(n for n, e in entries.items() if _is_weight(n, allow_pickle) and e.is_file())
        if "config.json" in entries and weights:
            h = hashlib.sha256()
            newest = 0
            for name in ["config.json", *weights]:
                try:
                    st = entries[name].stat()
                except OSError:
                    continue
                newest = max(newest, st.st_mtime_ns)
                h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            out.append(Found(d, str(d.parent), _step(d, entries), h.hexdigest(), newest / 1e9))
        elif not weights:  # each GGUF file of a directory without HF weights is a checkpoint
            ggufs = sorted(n for n, e in entries.items()
                           if n.lower().endswith(".gguf") and not _skipped(n) and e.is_file())
            for name in ggufs:
                try:
                    st = entries[name].stat()
                except OSError:
                    continue
                sig = hashlib.sha256(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode()).hexdigest()
                # run/model-step100.gguf: step from the file, run = its directory;
                # run/checkpoint-100/model.gguf: step from the directory, run = the one above
                step, series = _step(Path(Path(name).stem), {}), str(d)
                if step is None and len(ggufs) == 1 and _step(d, entries) is not None:
                    step, series = _step(d, entries), str(d.parent)
                out.append(Found(d / name, series, step, sig, st.st_mtime_ns / 1e9))
        for name, e in entries.items():
            if not _skipped(name) and e.is_dir(follow_symlinks=False):
                stack.append(Path(e.path))
    parents = {f.series for f in out}
    for f in out:
        if str(f.path) in parents:  # the final model saved in the run's own output directory
            f.series, f.step = str(f.path), None
    out.sort(key=lambda f: (f.series, f.step is None, f.step or 0, str(f.path)))
    return out


# ------------------------------------------------------------------------------- lock
@contextmanager
def store_lock(store_root: Path):
    """An exclusive advisory lock on STORE/watch.lock for as long as the block runs."""
    import fcntl

    path = store_root / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise WatchBusy(f"another `discover watch` (pid {holder}) is running on store {store_root}; "
                            "wait for it to finish or stop it") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


# --------------------------------------------------------------------- test hook (kill)
_KILL_COUNTS: dict = {}


def _kill_point(name: str) -> None:
    """Tests: DISCOVER_WATCH_KILL_AT=name[:n] sends SIGKILL to this process the n-th time it
    reaches `name` (hash, scan, pipeline, commit, report, done)."""
    spec = os.environ.get("DISCOVER_WATCH_KILL_AT")
    if not spec:
        return
    want, _, nth = spec.partition(":")
    if want != name:
        return
    _KILL_COUNTS[name] = _KILL_COUNTS.get(name, 0) + 1
    if _KILL_COUNTS[name] == int(nth or 1):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


# -------------------------------------------------------------------------------- run
def _say(msg: str, progress: bool) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def check_dir(watch_dir) -> Path:
    root = Path(watch_dir).expanduser()
    if not root.exists():
        raise DiscoverError(f"watch directory {watch_dir} does not exist; pass the directory your training "
                            "run writes checkpoints into")
    if not root.is_dir():
        raise DiscoverError(f"{watch_dir} is a file; pass the directory your training run writes checkpoints into")
    return root.resolve()


def _store_root(store_root) -> Path:
    from discover.store import resolve_root

    sroot = resolve_root(store_root)
    if sroot.exists() and not sroot.is_dir():
        raise DiscoverError(f"store path {sroot} is a file; --store must name a directory")
    sroot.mkdir(parents=True, exist_ok=True)
    return sroot


def watch_once(watch_dir, store_root=None, config: WatchConfig | None = None, *, progress: bool = True,
               jobs=None) -> WatchSummary:
    """One pass over `watch_dir`: process every new or changed checkpoint, under the store's lock.
    `jobs`: what computes the checkpoints (`discover.watch_jobs.CheckpointJobs`: parallel jobs on
    a Ray cluster, committed here one at a time; None: this process, one after another)."""
    root = check_dir(watch_dir)
    sroot = _store_root(store_root)
    with store_lock(sroot):
        return _watch(root, sroot, config or WatchConfig(), progress, jobs)


def watch_loop(watch_dir, store_root=None, config: WatchConfig | None = None, *, interval: float = 600.0,
               progress: bool = True, on_pass=None, jobs=None) -> None:
    """Poll forever: one pass, then sleep `interval` seconds. The lock is held throughout; the
    catalog is closed between passes so that queries can read it."""
    root = check_dir(watch_dir)
    sroot = _store_root(store_root)
    cfg = config or WatchConfig()
    with store_lock(sroot):
        while True:
            s = _watch(root, sroot, cfg, progress, jobs)
            if on_pass is not None and on_pass(s) is False:
                return
            _say(f"next look at {root} in {interval:g} s", progress)
            time.sleep(interval)


def _watch(root: Path, sroot: Path, cfg: WatchConfig, progress: bool, jobs=None) -> WatchSummary:
    from discover.store import Store

    t0 = time.perf_counter()
    with Store(sroot) as store:
        con = store.con
        # we hold the lock: a run still marked running died without finishing
        con.execute("UPDATE watch_runs SET status = 'interrupted' WHERE status = 'running'")
        found = find_checkpoints(root, allow_pickle=cfg.allow_pickle)
        known = {}
        if found:
            cur = con.execute("SELECT path, signature, status, checkpoint_id FROM watch_checkpoints "
                              "WHERE path IN (SELECT unnest(?))", [[str(f.path) for f in found]])
            known = {r[0]: {"signature": r[1], "status": r[2], "checkpoint_id": r[3]} for r in cur.fetchall()}
        todo = [f for f in found if str(f.path) not in known or known[str(f.path)]["signature"] != f.signature
                or (cfg.retry_failed and known[str(f.path)]["status"] == "failed")]
        now = time.time()
        fresh = [f for f in todo if now - f.newest < cfg.settle]  # perhaps still being written
        todo = [f for f in todo if now - f.newest >= cfg.settle]
        if todo:
            _check_settings(cfg)  # a mistake in the settings is not a failure of every checkpoint
        s = WatchSummary(run_id=uuid.uuid4().hex[:12], watch_dir=str(root), found=len(found), new=len(todo),
                         settling=len(fresh))
        for f in fresh:
            _say(f"{f.path}: written less than {cfg.settle:g} s ago; left for the next look", progress)
        con.execute("INSERT INTO watch_runs VALUES (?, ?, now(), NULL, 'running', ?, ?, 0, 0, ?)",
                    [s.run_id, str(root), os.getpid(), len(found), json.dumps(asdict(cfg))])
        if not todo:
            _say(f"{root}: {len(found)} checkpoint(s), nothing new", progress)
        try:
            _each(store, root, sroot, todo, known, cfg, s, progress, jobs)
        except KeyboardInterrupt:
            con.execute("UPDATE watch_runs SET status = 'interrupted', processed = ?, failed = ? WHERE run_id = ?",
                        [s.processed, s.failed, s.run_id])
            raise
        s.status = "failed" if s.failed else "ok"
        s.seconds = time.perf_counter() - t0
        con.execute("UPDATE watch_runs SET ended_at = now(), status = ?, processed = ?, failed = ? WHERE run_id = ?",
                    [s.status, s.processed, s.failed, s.run_id])
    return s


def _check_settings(cfg: WatchConfig) -> None:
    """The corpus, its split and the rules, checked once before any checkpoint is touched."""
    from discover.corpus import open_corpus
    from discover.rules import load_rules
    from discover.verify import check_split

    check_split(open_corpus(cfg.corpus, text_field=cfg.text_field), cfg.verify_split)
    load_rules(None)


def _each(store, root, sroot, todo, known, cfg, s: WatchSummary, progress, jobs=None) -> None:
    results = _job_results(store, sroot, todo, known, cfg, jobs) if jobs is not None else None
    if results is not None and todo:
        _say(f"{len(todo)} checkpoint(s) sent as jobs to the cluster ({getattr(jobs, 'workers', '?')} at a time); "
             "each is committed here when it and those before it are done", progress)
    t0 = time.perf_counter()
    for i, f in enumerate(todo):
        where = f" (step {f.step})" if f.step is not None else ""
        if results is None:
            _say(f"[{i + 1}/{len(todo)}] {f.path}{where}", progress)
            r = _process(store, root, sroot, f, known.get(str(f.path)), cfg, s.run_id, progress)
        else:
            job = next(results)
            left = (time.perf_counter() - t0) / (i + 1) * (len(todo) - i - 1)
            _say(f"[{i + 1}/{len(todo)}] {f.path}{where}: its job took {job['seconds']:.1f} s on a worker"
                 + (f"; about {left:.0f} s to go" if i + 1 < len(todo) else ""), progress)
            r = _process(store, root, sroot, f, known.get(str(f.path)), cfg, s.run_id, progress, job)
        s.results.append(r)
        if r["status"] == "failed":
            s.failed += 1
            _say(f"    failed: {r['error']}", progress)
        elif r["status"] == "unchanged":
            s.unchanged += 1
            _say("    same content as before (only file times changed)", progress)
        else:
            s.processed += 1


def _job_results(store, sroot, todo, known, cfg, jobs):
    """The checkpoint jobs' results (`discover.watch_jobs`), in `todo` order."""
    from discover import watch_jobs

    def done_id(f):  # the checkpoint id its path was last processed with, if it was
        k = known.get(str(f.path))
        return k["checkpoint_id"] if k and k["status"] == "done" else None

    items = [(f, watch_jobs.scratch_dir(sroot, f), done_id(f)) for f in todo]
    watch_jobs.clear_stale(sroot, {d.name for _, d, _ in items})  # a killed run's jobs resume in theirs
    ids = [r[0] for r in store.con.execute("SELECT checkpoint_id FROM checkpoints").fetchall()]
    return jobs(items, cfg, ids)


class _JobFailed(Exception):
    """A checkpoint job's failure, its message already in a serial watch's words."""


def _process(store, root: Path, sroot: Path, f: Found, known: dict | None, cfg: WatchConfig, run_id: str,
             progress: bool, job: dict | None = None) -> dict:
    """Process checkpoint `f` here, or commit what its job (`job`: run on a cluster) computed."""
    from discover.store import transaction

    t0 = time.perf_counter() - (job["seconds"] if job is not None else 0.0)  # a job's time on its worker counts
    res = {"path": str(f.path), "step": f.step, "checkpoint_id": None, "status": "done", "error": None,
           "stages": {}, "report": None}
    try:
        if job is None:
            from discover.adapter import identify

            _kill_point("hash")
            identity = identify(str(f.path), allow_pickle=cfg.allow_pickle)
        else:
            if job["identity"] is not None:
                res["checkpoint_id"] = job["identity"][1]
            if job["status"] == "failed":
                raise _JobFailed(job["error"])
            identity = tuple(job["identity"])
        res["checkpoint_id"] = identity[1]
        if known and known["status"] == "done" and known["checkpoint_id"] == identity[1]:
            res["status"] = "unchanged"
            with transaction(store.con) as con:
                con.execute("UPDATE watch_checkpoints SET signature = ? WHERE path = ?", [f.signature, str(f.path)])
                _result_row(con, run_id, res, time.perf_counter() - t0)
            return res
        if job is not None and job["status"] == "done" and store.checkpoint(identity[1]) is None:
            _adopt(store, root, sroot, f, job, cfg, run_id, res, progress, t0)
        else:  # here; or a job whose weights the catalog holds by now: reuse them, as a serial watch does
            _run_stages(store, root, sroot, f, identity, cfg, run_id, res, progress, t0)
        _say(f"    done in {time.perf_counter() - t0:.1f} s; report {res['report']}", progress)
        _kill_point("done")
    except Exception as e:  # recorded with its reason; the run goes on with the other checkpoints
        import duckdb

        if isinstance(e, duckdb.InterruptException):  # Ctrl-C inside a catalog query
            raise KeyboardInterrupt from None
        res["status"] = "failed"
        res["error"] = str(e) if isinstance(e, _JobFailed) else failure_reason(e)
        with transaction(store.con) as con:
            con.execute(
                "INSERT OR REPLACE INTO watch_checkpoints (path, watch_dir, series, step, signature, checkpoint_id, "
                "status, error, run_id, processed_at) VALUES (?, ?, ?, ?, ?, ?, 'failed', ?, ?, now())",
                [str(f.path), str(root), f.series, f.step, f.signature, res["checkpoint_id"], res["error"], run_id])
            _result_row(con, run_id, res, time.perf_counter() - t0)
    finally:
        if job is not None and res["status"] != "failed":  # a failed job's store is kept for a retry
            import shutil

            from discover.watch_jobs import scratch_dir

            shutil.rmtree(scratch_dir(sroot, f), ignore_errors=True)
    return res


def _neighbour(store, f: Found, checkpoint_id: str, *, after: bool) -> dict | None:
    """The run's processed checkpoint just before (after=False) or just after `f`, in the run's order:
    by step, then the checkpoints without a step, by path."""
    from discover.store import fetch_dict

    if after:
        cond, arg = ("step > ?", f.step) if f.step is not None else ("step IS NULL AND path > ?", str(f.path))
        order = "step NULLS LAST, path"
    else:
        cond, arg = ("step < ?", f.step) if f.step is not None else ("(step IS NOT NULL OR path < ?)", str(f.path))
        order = "(step IS NULL) DESC, step DESC, path DESC"
    return fetch_dict(store.con.execute(
        f"SELECT path, checkpoint_id, prev_checkpoint_id, verify_id, pass_id FROM watch_checkpoints WHERE series = ? "
        f"AND status = 'done' AND checkpoint_id <> ? AND {cond} ORDER BY {order} LIMIT 1",
        [f.series, checkpoint_id, arg]))


def _track(store, new: dict, old_id: str, *, new_verify, new_pass, old_verify, old_pass):
    """track.changes' (matches, changes, counts) of checkpoint `new` against `old_id`, or why they
    cannot be matched (a string)."""
    from discover import track

    old = store.checkpoint(old_id)
    if old is None:
        return "its scan is no longer in the store"
    why = track.comparable(new, old)
    if why is not None:
        return why
    return track.changes(store, new, old, track.match(store, new, old), new_verify=new_verify,
                         prev_verify=old_verify, new_pass=new_pass, prev_pass=old_pass)


def _run_stages(store, root, sroot, f, identity, cfg, run_id, res, progress, t0) -> None:
    """Every stage of checkpoint `f` in this process, then its commit."""
    from discover.pipeline import prepare, run_pipeline, write_report

    act, ver = cfg.act_config(), cfg.verify_config()
    prepared = prepare(str(f.path), corpus=cfg.corpus, text_field=cfg.text_field, act_config=act,
                       allow_pickle=cfg.allow_pickle, split=ver.split, identity=identity)
    _kill_point("scan")
    run = run_pipeline(None, store, act_config=act, verify_config=ver, out=None, progress=progress,
                       prepared=prepared)
    res["stages"] = run.brief_stages()
    _kill_point("pipeline")
    vid, pid = run.stages["verify"]["verify_id"], run.stages["activations"]["pass_id"]

    def report(out: Path) -> dict:
        t = time.perf_counter()
        cards = write_report(store, prepared[0].view, vid, out, fmt=cfg.fmt, cards=cfg.cards)
        return {"status": "written", "seconds": time.perf_counter() - t, "cards": cards}

    _commit(store, root, sroot, f, identity[1], pid, vid, cfg, run_id, res, progress, t0, report)


def _adopt(store, root, sroot, f, job: dict, cfg, run_id, res, progress, t0) -> None:
    """Commit a checkpoint job's scratch store: its files moved in, then (one transaction) its
    rows, tracking, status and report."""
    import shutil

    from discover import watch_jobs

    scratch = watch_jobs.scratch_dir(sroot, f)
    res["stages"] = {**job["stages"], "job": {k: job[k] for k in ("seconds", "pid", "started", "ended")}}
    moved = watch_jobs.move_files(sroot, scratch)

    def report(out: Path) -> dict:  # the job's report data, with the changes the catalog now holds
        from discover.pipeline import save_report
        from discover.report import changes_section

        t = time.perf_counter()
        rep = job["report_data"]
        rep["changes"] = changes_section(store, job["identity"][1])
        cards = save_report(rep, out, fmt=cfg.fmt)
        return {"status": "written", "seconds": job["report_s"] + time.perf_counter() - t, "cards": cards}

    committed = False
    try:
        with watch_jobs.attached(store.con, scratch) as con:
            _commit(store, root, sroot, f, job["identity"][1], job["pass_id"], job["verify_id"], cfg, run_id, res,
                    progress, t0, report, before=lambda: watch_jobs.insert_rows(con))
            committed = True
    except BaseException:
        if not committed:
            for d in moved:  # no row points at them
                shutil.rmtree(d, ignore_errors=True)
        raise


def _commit(store, root, sroot, f, ckpt_id, pid, vid, cfg, run_id, res, progress, t0, report, before=None) -> None:
    """One transaction: (`before`: a job's rows), tracking against the run's previous checkpoint
    (and of a later one against this), the checkpoint's status and its report (`report(out)`)."""
    from discover import track
    from discover.store import transaction

    reports = Path(cfg.reports).expanduser() if cfg.reports else sroot / "reports"
    try:
        rel = f.path.relative_to(root)
    except ValueError:
        rel = Path(f.path.name)
    name = "-".join((root.name, *rel.parts))  # the watched directory's name keeps two runs' reports apart
    out = reports / f"{name}.{cfg.fmt}"
    out.parent.mkdir(parents=True, exist_ok=True)
    res["report"] = str(out.resolve())
    with transaction(store.con) as con:
        if before is not None:
            before()
        new = store.checkpoint(ckpt_id)
        prev = _neighbour(store, f, ckpt_id, after=False)
        tracked = None
        t = time.perf_counter()
        if prev is not None:
            tracked = _track(store, new, prev["checkpoint_id"], new_verify=vid, new_pass=pid,
                             old_verify=prev["verify_id"], old_pass=prev["pass_id"])
            if isinstance(tracked, str):
                res["stages"]["track"] = {"status": "skipped", "why": tracked}
                tracked = None
            else:
                res["stages"]["track"] = {"status": "matched", "seconds": time.perf_counter() - t,
                                          "against": prev["checkpoint_id"], "counts": tracked[2]}
                _say("    tracked against the previous checkpoint: " + ", ".join(
                    f"{k.replace('_', ' ')} {v}" for k, v in tracked[2].items()), progress)
        # processed after a later step of its run (repaired, retried, late): that step is tracked against it now
        retrack = None
        nxt = _neighbour(store, f, ckpt_id, after=True)
        later = store.checkpoint(nxt["checkpoint_id"]) if nxt and nxt["prev_checkpoint_id"] != ckpt_id else None
        if later is not None:
            again = _track(store, later, ckpt_id, new_verify=nxt["verify_id"], new_pass=nxt["pass_id"],
                           old_verify=vid, old_pass=pid)
            retrack = None if isinstance(again, str) else (nxt, again)
        if tracked is not None:
            track.write(con, tracked[0], tracked[1], ckpt_id, prev["checkpoint_id"])
        if retrack is not None:
            nxt, (matches, ch, _counts) = retrack
            track.forget(con, nxt["checkpoint_id"], nxt["prev_checkpoint_id"])  # its old predecessor's rows
            track.write(con, matches, ch, nxt["checkpoint_id"], ckpt_id)
            con.execute("UPDATE watch_checkpoints SET prev_checkpoint_id = ? WHERE path = ?", [ckpt_id, nxt["path"]])
        con.execute(
            "INSERT OR REPLACE INTO watch_checkpoints VALUES (?, ?, ?, ?, ?, ?, 'done', NULL, ?, ?, ?, ?, ?, now())",
            [str(f.path), str(root), f.series, f.step, f.signature, ckpt_id,
             prev["checkpoint_id"] if tracked is not None else None, pid, vid, res["report"], run_id])
        _kill_point("commit")
        # the report is in place before the rows commit: a kill before the commit leaves a report
        # that the next run rewrites
        res["stages"]["report"] = report(out)
        _result_row(con, run_id, res, time.perf_counter() - t0)


def _result_row(con, run_id: str, res: dict, seconds: float) -> None:
    """The checkpoint's result in this run, and the run's running counts (inside its transaction)."""
    column = {"done": "processed", "failed": "failed"}.get(res["status"])
    if column:
        con.execute(f"UPDATE watch_runs SET {column} = {column} + 1 WHERE run_id = ?", [run_id])
    con.execute("INSERT OR REPLACE INTO watch_results VALUES (?, ?, ?, ?, ?, ?, ?, ?, now())",
                [run_id, res["path"], res["step"], res["checkpoint_id"], res["status"], res["error"],
                 json.dumps(res["stages"], default=str), seconds])


def runs(store, limit: int = 20) -> list[dict]:
    cur = store.con.execute("SELECT * FROM watch_runs ORDER BY started_at DESC LIMIT ?", [limit])
    cols = [c[0] for c in cur.description]
    return [dict(zip(cols, r)) for r in cur.fetchall()]
