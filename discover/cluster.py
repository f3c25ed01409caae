"""Scale out on Ray (Ray Core, the optional extra `discover[ray]`): the corpus pass, verify's
held-out forward passes and mean ablations, and universality's (shard, pass) items across the
workers of a cluster, with results identical to one process.

`--ray ADDRESS` names the cluster: `local[:N]` starts a local one of N CPUs (default: this
machine's), `auto` joins the running cluster this machine belongs to (`ray start`), `HOST:PORT`
(or `ray://HOST:PORT`) joins that head node.

The pass is cut into shards by the corpus alone (`discover.shards`); the driver tokenizes the
stream once to find where each shard starts (document, chunk) and never sends text: each worker
(an actor holding one model replica, loaded once; `--ray-cpus` cores each, or `--ray-gpus`
GPUs) opens the corpus itself (shared storage) and folds its shard from an empty state. The
driver holds references, at most two per worker in flight (`ray.wait`), fetches each finished
shard's state in shard order, merges it (`shards.merge_piece`: a fixed left-deep tree over shard
ids) and saves its running state atomically every `save_every` seconds in the pass's folder,
as one process does. Only the driver writes the catalog.

Faults: a worker that dies is restarted and its shard recomputed (Ray's actor restarts and
task retries); a driver that dies resumes, when rerun, from its last saved state: the shards
after it are computed again and merge to the same result.

Verify (`ClusterVerify`): its held-out batches' forward passes run on workers and come back in
batch order; its prediction hypotheses' mean ablations go to workers one layer's hypotheses at a
time. Universality (`ClusterPasses`): per pass of accumulators, each shard of batches (token ids)
is streamed from empty on a worker holding every model, and the shards' moments are merged here
in shard order. Every one of these is deterministic, so the results equal one process's.
Watch runs whole checkpoints as parallel jobs (`discover.watch_jobs`, tasks of `remote_task`).
"""

from __future__ import annotations

import os
import re
import socket
import time
from dataclasses import asdict, dataclass

from discover.errors import ClusterError

HINT = "use --ray local[:N] for a cluster on this machine, or --ray auto on a node started with `ray start`"
MAX_RESTARTS = 3  # times a dead worker is restarted (and its shard retried) before the pass fails
START_TIMEOUT = 900.0  # seconds for the workers to load their models
FREE_WAIT = 15.0  # seconds to wait for a cluster's resources to be free before using what is


@dataclass(frozen=True)
class ClusterSpec:
    """Where to run: `kind` local / auto / address; per worker `cpus` cores (CPU workers) or
    `gpus` GPUs (GPU workers, when > 0)."""

    address: str
    kind: str
    local_cpus: int | None = None
    cpus: float = 1.0
    gpus: float = 0.0


def parse_address(text: str, *, cpus: float = 1.0, gpus: float = 0.0) -> ClusterSpec:
    """'local', 'local:4', 'auto', 'HOST:PORT' or 'ray://HOST:PORT' -> a ClusterSpec."""
    t = (text or "").strip()
    if not (cpus > 0) or gpus < 0:
        raise ClusterError(f"--ray-cpus must be > 0 and --ray-gpus >= 0 (got {cpus} and {gpus})")
    m = re.fullmatch(r"local(?::(\d+))?", t)
    if m:
        n = int(m.group(1)) if m.group(1) else (os.cpu_count() or 1)
        if n < 1:
            raise ClusterError(f"--ray {text!r}: a local cluster needs at least 1 CPU; write local:N with N >= 1")
        return ClusterSpec(t, "local", n, cpus, gpus)
    if t == "auto":
        return ClusterSpec(t, "auto", None, cpus, gpus)
    m = re.fullmatch(r"(?:ray://)?([A-Za-z0-9.\-]+|\[[0-9A-Fa-f:]+\]):(\d{1,5})", t)
    if m and 0 < int(m.group(2)) < 65536:
        return ClusterSpec(t, "address", None, cpus, gpus)
    raise ClusterError(f"--ray {text!r} is not a cluster address: write local[:N], auto or HOST:PORT (e.g. "
                       f"10.0.0.5:6379)")


def _ray():
    try:
        import ray
    except ImportError:
        raise ClusterError("--ray needs Ray: install it with pip install 'discover[ray]' (Ray Core)") from None
    return ray


def _reachable(address: str, timeout: float = 3.0) -> None:
    host, _, port = address.removeprefix("ray://").rpartition(":")
    host = host.strip("[]")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise ClusterError(f"cannot reach the Ray cluster at {address} ({e.strerror or type(e).__name__}): check the "
                           f"address and that the head node runs (`ray start --head`); or {HINT}") from None


class Cluster:
    """A connection to a Ray cluster (`with Cluster(spec) as c:`): starts a local one or joins one,
    checks that a worker fits, and shuts down what it started. Inside a process that is already
    connected (tests), it uses that connection."""

    def __init__(self, spec: ClusterSpec):
        self.spec = spec
        self.started = False
        self.workers = 0

    def __enter__(self) -> Cluster:
        ray = _ray()
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local cluster needs no token (and warns without)
        quiet = {"logging_level": "ERROR", "log_to_driver": False, "include_dashboard": False}
        if not ray.is_initialized():
            s = self.spec
            try:
                if s.kind == "local":
                    ray.init(address="local", num_cpus=s.local_cpus, **quiet)
                elif s.kind == "auto":
                    ray.init(address="auto", **quiet)
                else:
                    _reachable(s.address)
                    ray.init(address=s.address, **quiet)
            except ClusterError:
                raise
            except (ConnectionError, RuntimeError, ValueError) as e:
                from discover.errors import first_line

                what = "no running Ray cluster was found" if s.kind == "auto" else f"cannot join {s.address}"
                raise ClusterError(f"--ray {s.address}: {what} ({first_line(e, 160)}); {HINT}") from None
            self.started = True
        try:
            self.workers = self._fit()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _fit(self) -> int:
        """Workers that fit the cluster's free resources now (actors that do not fit would wait)."""
        ray = _ray()
        total, free = ray.cluster_resources(), ray.available_resources()
        s = self.spec

        def count(res):
            return int(float(res.get("GPU", 0)) // s.gpus) if s.gpus > 0 else int(float(res.get("CPU", 0)) // s.cpus)

        need = f"{s.gpus:g} GPU" if s.gpus > 0 else f"{s.cpus:g} CPU"
        if count(total) < 1:
            raise ClusterError(f"the Ray cluster at {s.address} has {float(total.get('CPU', 0)):g} CPUs and "
                               f"{float(total.get('GPU', 0)):g} GPUs: no worker fits (each needs {need}); lower "
                               f"--ray-cpus / --ray-gpus or add nodes")
        deadline = time.monotonic() + FREE_WAIT  # actors just killed hand their resources back shortly
        while count(free) < count(total) and time.monotonic() < deadline:
            time.sleep(0.25)
            free = ray.available_resources()
        n = count(free)
        if n < 1:
            raise ClusterError(f"the Ray cluster at {s.address} is busy: no worker fits in its free resources now "
                               f"(each needs {need}); wait for its other jobs or lower --ray-cpus / --ray-gpus")
        return n

    def __exit__(self, *exc) -> None:
        if self.started:
            _ray().shutdown()
            self.started = False


def start_actors(cluster: Cluster, cls, n: int, *args, gpu: bool = False) -> list:
    """n Ray actors of class `cls` (constructed with `args`), each with one worker's resources
    (`--ray-gpus` GPUs where `gpu` and the cluster spec asks for them, else `--ray-cpus` cores);
    a dead one is restarted and its tasks retried up to MAX_RESTARTS times."""
    ray = _ray()
    s = cluster.spec
    gpus = s.gpus if gpu else 0
    remote = ray.remote(cls).options(num_cpus=0 if gpus > 0 else s.cpus, num_gpus=gpus,
                                     max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS)
    return [remote.remote(*args) for _ in range(n)]


def remote_task(cluster: Cluster, fn):
    """`fn` as a Ray task with one worker's resources (`--ray-gpus` GPUs, else `--ray-cpus`
    cores), retried up to MAX_RESTARTS times when its worker dies."""
    s = cluster.spec
    return _ray().remote(fn).options(num_cpus=0 if s.gpus > 0 else s.cpus, num_gpus=s.gpus,
                                     max_retries=MAX_RESTARTS)


def fetch(ref, what: str, timeout: float | None = None):
    """`ray.get(ref)`; a failure is one ClusterError line with the worker's own reason (an error
    raised in the worker's code is not retried; a dead worker is restarted up to MAX_RESTARTS)."""
    ray = _ray()
    try:
        return ray.get(ref, timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        raise ClusterError(f"{what}: no answer within {timeout:g} s; is the cluster busy, or a worker stuck?") from None
    except ray.exceptions.RayError as e:
        from discover.errors import first_line

        cause = e.cause if isinstance(e, ray.exceptions.RayTaskError) and e.cause is not None else e
        text = re.sub(r"\x1b\[[0-9;]*m", "", first_line(cause, 300))
        raise ClusterError(f"a Ray worker failed on {what}: {text}") from None


def stop_actors(actors: list) -> None:
    ray = _ray()
    for a in actors:
        ray.kill(a)


def in_order(actors: list, tasks: list, per_actor: int = 2):
    """Run `tasks` (each: actor -> ObjectRef) on `actors` and yield their refs in task order as
    they finish: each task goes to the actor with the fewest queued, at most `per_actor` queued
    on each, and no more than that many per actor finished and waiting (`ray.wait` backpressure)."""
    ray = _ray()
    busy = [0] * len(actors)
    inflight: dict = {}  # ref -> (task index, actor)
    finished: dict = {}  # task index -> ref
    nxt = 0
    for i in range(len(tasks)):
        while i not in finished:
            while (nxt < len(tasks) and min(busy) < per_actor
                   and len(inflight) + len(finished) < per_actor * len(actors)):
                a = busy.index(min(busy))
                busy[a] += 1
                inflight[tasks[nxt](actors[a])] = (nxt, a)
                nxt += 1
            ready, _ = ray.wait(list(inflight), num_returns=1)
            for ref in ready:
                j, a = inflight.pop(ref)
                busy[a] -= 1
                finished[j] = ref
        yield finished.pop(i)


def use_threads(n: int) -> None:
    """A worker's share of cores for torch and for numba's kernels alike (numba's OpenMP layer
    otherwise resets the count to every core of the node when its kernels run)."""
    import numba
    import torch

    n = max(1, int(n))
    torch.set_num_threads(n)
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))


class _Worker:
    """Base of the actors: an error while setting up (a model that does not load, another corpus)
    is kept and raised by the first task, so that the driver reports its own message (an error
    raised in an actor's constructor only says that the actor died)."""

    error: BaseException | None = None

    def __init__(self, *args):
        try:
            self.setup(*args)
        except Exception as e:  # noqa: BLE001 (reported by the first task)
            self.error = e

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def pid(self) -> int:
        self.check()
        return os.getpid()


class PassWorker(_Worker):
    """A Ray actor: one model replica, loaded once, that folds pieces of a corpus pass."""

    def setup(self, spec: str, identity: tuple, cfg: dict, corpus_spec, text_field: str, pairs: list,
              context: int, batch_size: int, allow_pickle: bool, threads: int, fingerprint: str):

        from discover.activations import ActivationConfig, PassRunner, prepare

        use_threads(threads)
        cfg = ActivationConfig(**{**cfg, "pairs": tuple(cfg["pairs"])})
        plan = prepare(spec, cfg, corpus=corpus_spec, text_field=text_field, allow_pickle=allow_pickle,
                       identity=tuple(identity))
        if plan.described["fingerprint"] != fingerprint:  # another copy of the corpus on this node
            raise ClusterError(f"the corpus {corpus_spec or 'default'} on worker node {os.uname().nodename} differs "
                               f"from the driver's (fingerprint {plan.described['fingerprint'][:12]} against "
                               f"{fingerprint[:12]}); put the same files on shared storage")
        self.runner = PassRunner(plan.view, cfg, [tuple(p) for p in pairs], context, batch_size)
        self.corpus = plan.corpus

    def piece(self, start: tuple, n_batches: int, open_moments: dict | None):
        """The state of `n_batches` batches from `start`, from an empty state (its open moments
        from `open_moments` where the piece continues a shard); (meta, arrays)."""
        from discover.activations import fold_piece
        from discover.shards import OPEN

        self.check()
        state = self.runner.new_state()
        if open_moments is not None:
            for k in OPEN:
                state.a[k][...] = open_moments[k]
        fold_piece(self.runner, state, self.corpus, tuple(start), n_batches)
        return state.meta, state.a


def plan_pieces(runner, state, corp, target: int) -> tuple[list[tuple], bool]:
    """The pieces that take `state` to `target` tokens (whole batches), as (start, n_batches):
    each within one shard, the first continuing the open shard; and whether the corpus ends.
    The stream is tokenized here to find where each piece starts; no text leaves the driver."""
    from discover.activations import batched, bos_id, sequences

    bos = bos_id(runner.view.tokenizer)
    first = 1 if bos is not None else 0
    sb, bs = runner.cfg.shard_batches, runner.batch_size
    batches, tokens = state.meta["batches"], state.meta["tokens"]
    pieces: list[list] = []
    stream = sequences(corp, runner.cfg.split, runner.view.tokenizer, runner.context, bos, tuple(state.meta["next"]))
    for batch in batched(stream, bs):
        if not pieces or batches % sb == 0:  # a piece starts: (document ordinal, chunk) of its first sequence
            pieces.append([(batch[0][0], batch[0][2]), 0])
        pieces[-1][1] += 1
        batches += 1
        tokens += sum(len(seq[3]) - first for seq in batch)
        if len(batch) == bs and tokens >= target:
            return [tuple(p) for p in pieces], False
    return [tuple(p) for p in pieces], True


def _after_piece(merged: int) -> None:
    """Test hook: called after every merged (and possibly saved) piece."""


class ClusterStream:
    """Folds a corpus pass on the workers of a cluster (the `stream` of `run_activations`)."""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        self.workers: list = []
        # where the driver's time went (seconds): planning the pieces (tokenizing the stream),
        # starting the workers (each loads the model), waiting, fetching and merging states
        self.stats = {"pieces": 0, "workers": 0, "plan_s": 0.0, "start_s": 0.0, "fetch_s": 0.0, "merge_s": 0.0,
                      "save_s": 0.0, "wall_s": 0.0}

    def device(self, configured: str) -> str:
        """The device the workers run the pass on: CUDA for GPU workers, else the configured one
        (recorded in the pass's settings: a pass is not extended on other hardware)."""
        return "cuda" if self.cluster.spec.gpus > 0 and str(configured) == "cpu" else str(configured)

    def __call__(self, runner, state, plan, state_path, progress: bool) -> None:
        from tqdm import tqdm

        from discover.activations import PassState
        from discover.shards import OPEN, merge_piece

        t_wall = time.perf_counter()
        cfg, spec = runner.cfg, self.cluster.spec
        pieces, ends = plan_pieces(runner, state, plan.corpus, cfg.tokens)
        st = self.stats
        st["plan_s"] += time.perf_counter() - t_wall
        st["pieces"] += len(pieces)
        if not pieces:
            state.meta["exhausted"] = state.meta["exhausted"] or ends
            state.save(state_path)
            return
        cfg_d = {**asdict(cfg), "device": self.device(cfg.device)}
        n = min(self.cluster.workers, len(pieces))
        workers = start_actors(self.cluster, PassWorker, n, plan.spec, list(plan.identity), cfg_d, plan.corpus_spec,
                               plan.text_field, [list(p) for p in runner.pairs], runner.context, runner.batch_size,
                               plan.allow_pickle, max(1, int(spec.cpus)), plan.described["fingerprint"], gpu=True)
        self.workers = workers  # (tests: the worker processes to kill)
        st["workers"] = n
        try:
            t = time.perf_counter()
            for w in workers:  # every replica loaded
                fetch(w.pid.remote(), "starting the corpus pass's workers", START_TIMEOUT)
            st["start_s"] += time.perf_counter() - t
        except BaseException:
            stop_actors(workers)
            raise
        target = cfg.tokens
        bar = tqdm(total=target, initial=min(state.meta["tokens"], target), unit="tok", unit_scale=True,
                   desc=f"activations on {n} Ray workers", disable=not progress, dynamic_ncols=True, leave=False)
        sb, b0 = cfg.shard_batches, state.meta["batches"]
        first_open = {k: state.a[k].copy() for k in OPEN} if b0 % sb else None
        tasks = [lambda w, i=i, start=start, nb=nb: w.piece.remote(start, nb, first_open if i == 0 else None)
                 for i, (start, nb) in enumerate(pieces)]
        merged, last_save = 0, time.monotonic()
        try:
            for ref in in_order(workers, tasks):
                t = time.perf_counter()
                meta, arrays = fetch(ref, f"piece {merged} of the corpus pass")
                st["fetch_s"] += time.perf_counter() - t
                planned = pieces[merged][1]
                if meta["batches"] != planned and not (ends and merged == len(pieces) - 1):
                    raise ClusterError(f"piece {merged} of the corpus pass came back with {meta['batches']} "
                                       f"batches instead of {planned}: a worker reads other text than the "
                                       "driver; put the corpus on shared storage")
                del ref
                src = PassState.of(meta, arrays)
                before = state.meta["tokens"]
                t = time.perf_counter()
                merge_piece(state, src, closes=(state.meta["batches"] + meta["batches"]) % sb == 0)
                st["merge_s"] += time.perf_counter() - t
                del src, meta, arrays
                merged += 1
                if merged == len(pieces):
                    state.meta["exhausted"] = ends
                bar.update(min(state.meta["tokens"], target) - min(before, target))
                if merged == len(pieces) or time.monotonic() - last_save >= cfg.save_every:
                    t = time.perf_counter()
                    state.save(state_path)
                    st["save_s"] += time.perf_counter() - t
                    last_save = time.monotonic()
                _after_piece(merged)
        finally:
            bar.close()
            stop_actors(workers)
            st["wall_s"] += time.perf_counter() - t_wall


class UniversalityWorker(_Worker):
    """A Ray actor: a replica of every model of a universality run; streams shards of batches."""

    def setup(self, specs: list, identities: list, allow_pickle: bool, device: str, threads: int):

        from discover.adapter import load_model

        use_threads(threads)
        self.device = device
        self.views = [load_model(s, allow_pickle=allow_pickle, device=device, identity=tuple(i))
                      for s, i in zip(specs, identities)]

    def shard(self, batches: list, pairs: list) -> dict:
        from discover.universality import stream_batches

        self.check()
        pairs = [(tuple(a), tuple(b)) for a, b in pairs]
        return stream_batches(self.views, batches, pairs, self.device).state()


class ClusterPasses:
    """Runs the passes of `discover universality` on the workers of a cluster (its `run_pass`):
    work items are (shard, pass): each worker streams a shard of the batches (token ids, the
    same for every model) for the pass's units from empty; the driver merges the shards' moments
    in shard order, as one process does with the same `shard_batches`, so the correlations are
    identical to it."""

    def __init__(self, cluster: Cluster, allow_pickle: bool = False):
        self.cluster, self.allow_pickle = cluster, allow_pickle
        self.workers: list = []
        self.parts: list = []  # each shard's token ids in the object store, put once for every pass
        self.stats = {"items": 0, "workers": 0, "merge_s": 0.0, "wall_s": 0.0}

    def _start(self, plan) -> None:
        spec = self.cluster.spec
        n = min(self.cluster.workers, max(1, len(_shards(plan))))
        device = plan.config.device  # CPU workers (GPU workers serve the corpus pass only)
        self.workers = start_actors(self.cluster, UniversalityWorker, n, plan.specs, [list(i) for i in plan.identities],
                                    self.allow_pickle, device, max(1, int(spec.cpus)))
        self.stats["workers"] = n

    def __call__(self, plan, units, bar):
        from discover.universality import stream_from_state

        ray = _ray()
        t0 = time.perf_counter()
        if not self.workers:
            self._start(plan)
        pairs = [[list(u.a), list(u.b)] for u in units]
        parts = _shards(plan)
        if len(self.parts) != len(parts):
            self.parts = [ray.put(p) for p in parts]
        tasks = [lambda w, k=k: w.shard.remote(self.parts[k], pairs) for k in range(len(parts))]
        st = None
        try:
            for k, ref in enumerate(in_order(self.workers, tasks)):
                part = stream_from_state(fetch(ref, f"universality shard {k}"), plan.config.device)
                t = time.perf_counter()
                if st is None:
                    st = part
                else:
                    st.merge(part)
                self.stats["merge_s"] += time.perf_counter() - t
                bar.update(int(sum(c.sum() for _, c in parts[k])))
            self.stats["items"] += len(parts)
        finally:
            self.stats["wall_s"] += time.perf_counter() - t0
        return st

    def close(self) -> None:
        stop_actors(self.workers)
        self.workers, self.parts = [], []


def _shards(plan) -> list:
    from discover.universality import shards

    return shards(plan)


class _AblationData:
    """What `verify.Ablator` reads of the held-out data: next tokens and sequences (token ids)."""

    def __init__(self, next_token, seqs):
        self.next_token, self.seqs = next_token, seqs


class VerifyWorker(_Worker):
    """A Ray actor: one model replica, loaded once for a whole verify run; runs its held-out
    forward passes (`features.forward_batch`), then the mean ablations of its prediction
    hypotheses on the held-out sequences."""

    def setup(self, spec: str, identity: tuple, allow_pickle: bool, threads: int):
        from discover.adapter import load_model

        use_threads(threads)
        self.view = load_model(spec, allow_pickle=allow_pickle, identity=tuple(identity))
        self.abl, self.abl_key = None, None

    def forward(self, batch: list, start: int):
        from discover.features import forward_batch

        self.check()
        return forward_batch(self.view, batch, start)

    def effects(self, jobs: list, means, key: str, next_token, seqs) -> list:
        """The ablations of `jobs` on the held-out data `key` (sent with every task, so that a
        restarted worker has it too; Ray keeps one copy per node)."""
        from discover.verify import Ablator

        self.check()
        if self.abl is None or self.abl_key != key:
            self.abl, self.abl_key = Ablator(self.view, _AblationData(next_token, seqs)), key
        return [self.abl.effects(job[0], [tuple(x) for x in job[1]], means, job[2], elsewhere=job[3]) for job in jobs]


class ClusterVerify:
    """What verify spreads over the workers of a cluster, each holding one model replica for the
    whole run (`with ClusterVerify(cluster) as spread:`; the workers stop at the end):
    - `forward` (of `features.collect`): each held-out batch's forward pass on a worker (token
      ids sent, at most two batches per worker in flight), the activations written here in batch
      order;
    - `effects` (of `verify.prediction_hypotheses`): the mean ablations, the jobs of one layer
      on one worker together (they share traced forward passes there), in layer order, results
      in the jobs' order.
    Forward passes and ablations are deterministic, so every score, verdict and number of
    evidence equals one process's."""

    def __init__(self, cluster: Cluster, allow_pickle: bool = False):
        self.cluster, self.allow_pickle = cluster, allow_pickle
        self.workers: list = []
        self.identity = None  # the checkpoint the workers hold
        self.stats = {"workers": 0, "batches": 0, "jobs": 0, "groups": 0, "effects_s": 0.0}

    def __enter__(self) -> ClusterVerify:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        stop_actors(self.workers)
        self.workers = []

    def _start(self, view) -> list:
        if self.workers and self.identity != view.checkpoint_id:  # another model: other workers
            self.close()
        if not self.workers:
            self.identity = view.checkpoint_id
            if view.model_dir is None:
                raise ClusterError("this model was not loaded from a path (hub id, directory or .gguf file); the "
                                   "cluster's workers load it from one: run without --ray")
            identity = (view.spec, view.checkpoint_id, view.model_dir)
            self.workers = start_actors(self.cluster, VerifyWorker, max(1, self.cluster.workers), view.spec,
                                        identity, self.allow_pickle, max(1, int(self.cluster.spec.cpus)))
            self.stats["workers"] = len(self.workers)
        return self.workers

    def forward(self, view, batches: list, start: int):
        if not batches:
            return
        workers = self._start(view)
        tasks = [lambda w, b=b: w.forward.remote(b, start) for b in batches]
        for ref in in_order(workers, tasks):
            self.stats["batches"] += 1
            yield fetch(ref, "verify's held-out activations")

    def effects(self, view, data, jobs: list, means, progress: bool = False) -> list:
        from tqdm import tqdm

        ray = _ray()
        if not jobs:
            return []
        t0 = time.perf_counter()
        groups: list[list[int]] = []
        for i, job in enumerate(jobs):  # consecutive jobs of one layer form one task
            if groups and jobs[groups[-1][0]][1][0][0] == job[1][0][0]:
                groups[-1].append(i)
            else:
                groups.append([i])
        workers = self._start(view)[:len(groups)]
        next_ref, seqs_ref, means_ref = ray.put(data.next_token), ray.put(data.seqs), ray.put(means)
        plain = [(j[0], [list(x) for x in j[1]], j[2], j[3]) for j in jobs]
        out: list = [None] * len(jobs)
        bar = tqdm(total=len(jobs), desc=f"verify predictions on {len(workers)} Ray workers", unit="hypothesis",
                   disable=not progress, leave=False)
        key = seqs_ref.hex()
        tasks = [lambda w, grp=grp: w.effects.remote([plain[i] for i in grp], means_ref, key, next_ref, seqs_ref)
                 for grp in groups]
        try:
            for grp, ref in zip(groups, in_order(workers, tasks)):
                for i, r in zip(grp, fetch(ref, "verify's ablations")):
                    out[i] = r
                bar.update(len(grp))
        finally:
            bar.close()
        self.stats.update(jobs=len(jobs), groups=len(groups), effects_s=time.perf_counter() - t0)
        return out
