"""Universal neurons across models (METHODS.md, "Across checkpoints and seeds"; Gurnee et al.
2024, "Universal Neurons in GPT2 Language Models").

Every model of a run reads the SAME tokens (tokenized once, with the first model's tokenizer:
the models must share one vocabulary). For every pair of neurons of two different models, the
Pearson correlation of their activations (the MLP activation after the nonlinearity, the site
`discover activations` reads) over every document-token position; the BOS position of each
piece and the padding of a batch are excluded. For each neuron and each other model:

- `max_corr`: its largest correlation with any neuron of the other model (all layers), and the
  neuron reaching it (the partner);
- `baseline_corr`: the same maximum after a random rotation of the other model's neuron basis,
  layer by layer (a Haar-random orthogonal d_mlp x d_mlp matrix per layer, seeded by the run's
  seed, the checkpoint id and the layer);
- `excess = max_corr - baseline_corr`;

and per neuron the means over the other models; `universal` = mean excess > threshold (0.5).
A dead neuron (constant activation) has no correlation: its numbers are NULL, never universal.

How it is computed, exactly and in float64:

- Per (layer of model a, layer of model b) block the co-moment matrix
  C = sum_t (a_t - mean_a)(b_t - mean_b)^T (d_mlp_a x d_mlp_b), per layer of every model the
  within-layer co-moment matrix S and the means / sums of squares, streamed batch by batch with
  Chan et al.'s pairwise update: per batch the centred chunk product plus
  n n_c / (n + n_c) * outer(delta_a, delta_b), folded into ONE in-place float64 GEMM by
  appending the row sqrt(n n_c / (n + n_c)) * delta to each centred chunk.
- The rotated baseline needs no second pass: cov(a, R b) = C R^T, var((R b)_j) = (R S_b R^T)_jj,
  and rotating model a's layer instead gives R_a C for the other direction.

The memory budget (`memory_gb`, default 2 GiB) bounds the computation's own arrays (not the
models' weights): the float64 accumulators of one pass over the corpus, plus the working set of
finalising a block (two d_mlp x d_mlp rotations and one block-sized product), plus one batch's
activations (float32 captures of one model and float64 copies of every layer of every model):

    budget >= 8 * (sum of the pass's units + 2 * max d_mlp^2 + max d_mlp_a * d_mlp_b)
              + batch sequences * context * (4 * max(n_layers * d_mlp) + 8 * sum(n_layers * d_mlp))

A unit is one within-layer S (d_mlp^2 float64) or one cross block C; units are taken in a fixed
order (every S first, then the blocks of each model pair, row by row) and packed greedily into
passes. When they do not all fit, the models are run again over the same batches (tokenized
once, same order), each pass accumulating the next units; running maxima (value and partner)
are merged block by block in the same order, so the results do not depend on the budget. The
batch size, when not given, is the largest (at most 32 sequences) whose activations take at
most a quarter of the budget. Example: GPT-2 medium x 2 seeds (24 layers x 4096 neurons,
context 256): 48 S and 576 blocks of 128 MiB each; at 2 GiB, batches of 1 sequence and 9
units per pass: 70 passes; at 16 GiB, 8 sequences and 95 units: 7 passes; at 32 GiB, 4 passes. The streamed work
is about 2 * (units) * d_mlp^2 FLOP per token whatever the budget; more passes only add forward
passes of the models. A budget too small for one unit is an error that names the budget needed.

A run is written to the catalog in one transaction at the end (`universality_runs`,
`neuron_correlations`, `universal_neurons`); a killed run leaves nothing.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from discover.errors import CorpusError, DiscoverError, ModelLoadError, QueryError

GiB = 2**30
MAX_BATCH = 32  # sequences per forward pass when the batch size is derived from the budget
BATCH_SHARE = 4  # at most 1/BATCH_SHARE of the budget goes to one batch's activations
DEAD_REL_VAR = 1e-24  # var <= this * mean^2: constant up to float64 rounding of the streamed sums


class UniversalityError(DiscoverError):
    """The models of a universality run cannot be compared (too few, the same checkpoint twice,
    different vocabularies) or the memory budget cannot hold one block."""


@dataclass(frozen=True)
class UniversalityConfig:
    """Settings of one universality run."""

    tokens: int = 100_000  # document-token positions correlated (BOS and padding excluded)
    split: str = "all"
    seed: int = 0  # of the random rotations of the baseline
    threshold: float = 0.5  # universal: mean excess correlation above this
    memory_gb: float = 2.0  # accumulators + finalisation + one batch (see the module docstring)
    batch_size: int | None = None  # sequences per forward pass; None: from the budget, at most 32
    context: int | None = None  # tokens per sequence incl. the BOS; None: min(models' maximum, 256)
    device: str = "cpu"
    # None: one stream batch after batch; N: shards of N batches, each accumulated from empty and
    # merged in shard order (what a cluster's workers compute; twice the accumulators' memory)
    shard_batches: int | None = None

    def __post_init__(self):
        if not (isinstance(self.tokens, int) and self.tokens > 0):
            raise ValueError(f"tokens must be a positive number of tokens, got {self.tokens}")
        if self.split not in ("all", "train", "heldout"):
            raise ValueError(f"split must be all, train or heldout, got {self.split!r}")
        if not (isinstance(self.seed, int) and self.seed >= 0):
            raise ValueError(f"seed must be an integer >= 0, got {self.seed}")
        if not math.isfinite(self.threshold):
            raise ValueError(f"threshold must be a finite number, got {self.threshold}")
        if not (math.isfinite(self.memory_gb) and self.memory_gb > 0):
            raise ValueError(f"memory_gb must be a positive number of GiB, got {self.memory_gb}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.context is not None and self.context < 2:
            raise ValueError(f"context must be >= 2 (a BOS and one token), got {self.context}")
        if self.shard_batches is not None and not (isinstance(self.shard_batches, int) and self.shard_batches >= 1):
            raise ValueError(f"shard_batches must be a positive integer, got {self.shard_batches!r}")


@dataclass
class UniversalitySummary:
    """What `universality` found. models: per model its spec, checkpoint, size and universal
    count / fraction, dead neurons and universal neurons per layer; top: the strongest universal
    neurons (by mean excess) with their partners."""

    universality_id: str
    models: list
    tokens: int
    passes: int
    batch_size: int
    context: int
    threshold: float
    exhausted: bool
    seconds: float
    corpus: dict = field(default_factory=dict)
    top: list = field(default_factory=list)


# ------------------------------------------------------------------------ streaming moments
class _Stream:
    """Exact streaming first and second moments of named activation groups, in float64.

    Per group g: the mean (d,) and the sum of squared deviations m2 (d,); per requested pair
    (g, h): the co-moment matrix sum_t (x_g - mean_g)(x_h - mean_h)^T (d_g, d_h). Chunks are
    merged with Chan et al.'s pairwise update, folded into one in-place GEMM per pair."""

    def __init__(self, dims: dict, pairs: list, device="cpu"):
        import torch

        self.torch = torch
        f64 = torch.float64
        self.n = 0
        self.mean = {g: torch.zeros(d, dtype=f64, device=device) for g, d in dims.items()}
        self.m2 = {g: torch.zeros(d, dtype=f64, device=device) for g, d in dims.items()}
        self.co = {p: torch.zeros(dims[p[0]], dims[p[1]], dtype=f64, device=device) for p in pairs}

    def update(self, xs: dict) -> None:
        """Fold one chunk: xs[g] is (n_c, d_g), the same n_c positions for every group."""
        torch = self.torch
        n_c = next(iter(xs.values())).shape[0]
        if n_c == 0:
            return
        n = self.n
        f = n * n_c / (n + n_c)  # Chan et al.: the weight of the chunk-vs-running mean correction
        aug = {}
        for g, x in xs.items():
            x = x.to(torch.float64)
            mc = x.mean(0)  # (d,)
            delta = mc - self.mean[g]
            a = torch.empty((n_c + 1, x.shape[1]), dtype=torch.float64, device=x.device)
            torch.sub(x, mc, out=a[:n_c])  # the centred chunk
            a[n_c] = math.sqrt(f) * delta  # its product row by row adds f * outer(delta_g, delta_h)
            self.m2[g] += (a[:n_c] * a[:n_c]).sum(0) + f * delta * delta
            self.mean[g] += delta * (n_c / (n + n_c))
            aug[g] = a
        for (g, h), c in self.co.items():
            c.addmm_(aug[g].T, aug[h])  # c += centred chunk product + f * outer(delta_g, delta_h)
        self.n = n + n_c

    def merge(self, other: _Stream) -> None:
        """Fold the moments of other, disjoint positions (a shard's stream) into this one (Chan et al.)."""
        if other.n == 0:
            return
        n, m = self.n, other.n
        f = n * m / (n + m)
        delta = {g: other.mean[g] - self.mean[g] for g in self.mean}
        for g in self.mean:
            self.m2[g] += other.m2[g] + f * delta[g] * delta[g]
            self.mean[g] += delta[g] * (m / (n + m))
        for (g, h), c in self.co.items():
            c += other.co[(g, h)]
            c.addr_(delta[g], delta[h], alpha=f)
        self.n = n + m

    def state(self) -> dict:
        """The stream as numpy arrays (to send between processes)."""
        return {"n": self.n, "mean": {g: v.cpu().numpy() for g, v in self.mean.items()},
                "m2": {g: v.cpu().numpy() for g, v in self.m2.items()},
                "co": {p: v.cpu().numpy() for p, v in self.co.items()}}

    @classmethod
    def from_state(cls, st: dict, device="cpu") -> _Stream:
        import torch

        self = cls.__new__(cls)
        self.torch, self.n = torch, st["n"]
        for k in ("mean", "m2", "co"):  # copies: arrays from ray.get are read-only
            setattr(self, k, {g: torch.tensor(v, device=device) for g, v in st[k].items()})
        return self


def _inv_std(m2, mean, n: int):
    """1 / sqrt(m2) with NaN for constant (dead) neurons: their correlations are undefined."""
    torch = _torch()
    dead = m2 <= n * DEAD_REL_VAR * mean * mean
    return torch.where(dead, torch.full_like(m2, float("nan")), m2.clamp_min(1e-300).rsqrt())


def _rotated(S, mean, R):
    """(m2, mean) of the rotated neurons R x: diag(R S R^T) and R mean."""
    torch = _torch()
    buf = torch.mm(R, S)
    buf.mul_(R)
    return buf.sum(1), R @ mean


def _torch():
    import torch

    return torch


def haar_rotation(d: int, seed: int, checkpoint_id: str, layer: int) -> np.ndarray:
    """A Haar-random orthogonal (d, d) float64 matrix, fixed by (seed, checkpoint, layer)."""
    torch = _torch()
    rng = np.random.default_rng([seed, int(checkpoint_id[:15], 16), layer])
    a, tau = torch.geqrf(torch.from_numpy(rng.standard_normal((d, d))))
    # Q applied to I by the blocked ormqr: the same Q as linalg.qr (orgqr), several times faster
    q = torch.ormqr(a, tau, torch.eye(d, dtype=torch.float64)).numpy()
    q *= np.where(np.diag(a.numpy()) < 0, -1.0, 1.0)  # Mezzadri's sign fix: without it Q is not Haar-distributed
    return q


def _block_maxima(C, inv_a, inv_b, rot_inv_a, rot_inv_b, Ra, Rb) -> dict:
    """Maxima of one block C (d_a, d_b): per row (a's neurons over b's) and per column.

    Returns numpy arrays: row_max, row_arg, row_base (after rotating b's basis by Rb) and
    col_max, col_arg, col_base (after rotating a's by Ra); -inf where a neuron is dead."""
    torch = _torch()
    inf = float("inf")
    buf = torch.mul(C, inv_a[:, None])
    buf.mul_(inv_b[None, :]).nan_to_num_(nan=-inf, posinf=inf, neginf=-inf)
    row_max, row_arg = buf.max(1)
    col_max, col_arg = buf.max(0)
    torch.mm(C, Rb.T, out=buf)  # cov(a, Rb b)
    buf.mul_(inv_a[:, None]).mul_(rot_inv_b[None, :]).nan_to_num_(nan=-inf, posinf=inf, neginf=-inf)
    row_base = buf.max(1).values
    torch.mm(Ra, C, out=buf)  # cov(Ra a, b)
    buf.mul_(rot_inv_a[:, None]).mul_(inv_b[None, :]).nan_to_num_(nan=-inf, posinf=inf, neginf=-inf)
    col_base = buf.max(0).values
    out = {"row_max": row_max, "row_arg": row_arg, "row_base": row_base, "col_max": col_max, "col_arg": col_arg,
           "col_base": col_base}
    return {k: v.cpu().numpy() for k, v in out.items()}


def _chunks_stream(chunks, device="cpu") -> _Stream:
    torch = _torch()
    st = None
    for a, b in chunks:
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if st is None:
            st = _Stream({"a": a.shape[1], "b": b.shape[1]}, [("a", "b"), ("a", "a"), ("b", "b")], device)
        st.update({"a": torch.from_numpy(a).to(device), "b": torch.from_numpy(b).to(device)})
    if st is None or st.n == 0:
        raise ValueError("no positions in the chunks")
    return st


def streamed_correlation(chunks: Iterable) -> np.ndarray:
    """The Pearson correlation matrix (N_a, N_b) of two activation streams, given as chunks
    (A (n, N_a), B (n, N_b)) of the same positions, accumulated exactly as `universality` does.
    NaN where a neuron is constant."""
    st = _chunks_stream(chunks)
    inv_a = _inv_std(st.m2["a"], st.mean["a"], st.n)
    inv_b = _inv_std(st.m2["b"], st.mean["b"], st.n)
    return (st.co[("a", "b")] * inv_a[:, None] * inv_b[None, :]).numpy()


def block_maxima(chunks: Iterable, rot_a: np.ndarray, rot_b: np.ndarray) -> dict:
    """For two streams (one layer each): per neuron of a its max correlation over b's neurons,
    the partner and the baseline after rotating b's basis by `rot_b`; and the same for b's
    neurons over a's (baseline: a rotated by `rot_a`). The computation of `universality`, on
    arrays: {"a": {"max_corr", "partner", "baseline"}, "b": {...}}, NaN / -1 for dead neurons."""
    torch = _torch()
    st = _chunks_stream(chunks)
    Ra, Rb = torch.from_numpy(np.asarray(rot_a, np.float64)), torch.from_numpy(np.asarray(rot_b, np.float64))
    inv = {g: _inv_std(st.m2[g], st.mean[g], st.n) for g in ("a", "b")}
    rot = {g: _inv_std(*_rotated(st.co[(g, g)], st.mean[g], R), st.n) for g, R in (("a", Ra), ("b", Rb))}
    m = _block_maxima(st.co[("a", "b")], inv["a"], inv["b"], rot["a"], rot["b"], Ra, Rb)
    out = {}
    for g, side in (("a", "row"), ("b", "col")):
        dead = ~np.isfinite(m[f"{side}_max"])
        out[g] = {"max_corr": np.where(dead, np.nan, m[f"{side}_max"]),
                  "partner": np.where(dead, -1, m[f"{side}_arg"]),
                  "baseline": np.where(dead, np.nan, m[f"{side}_base"])}
    return out


# ------------------------------------------------------------------------------- schedule
@dataclass(frozen=True)
class Unit:
    """One accumulator: a within-layer S (a == b) or a cross block C; a, b = (model, layer)."""

    a: tuple
    b: tuple
    nbytes: int


@dataclass(frozen=True)
class Schedule:
    """The passes over the corpus and the memory rule behind them (bytes)."""

    passes: tuple  # of tuples of Units
    batch_size: int
    batch_bytes: int
    reserve_bytes: int  # finalising one block: two rotations and one block-sized product
    budget_bytes: int
    copies: int = 1  # accumulators held per unit: 2 in shards (the running one and the shard's)

    def spare_bytes(self, p: int) -> int:
        """What pass p leaves of the budget."""
        return (self.budget_bytes - self.reserve_bytes - self.batch_bytes
                - self.copies * sum(u.nbytes for u in self.passes[p]))


def schedule(shapes: list, budget_bytes: int, context: int, batch_size: int | None = None, *,
             copies: int = 1) -> Schedule:
    """Pack the units of models with `shapes` [(n_layers, d_mlp), ...] into passes (module
    docstring); `copies` accumulators per unit (2 when the positions are streamed in shards)."""
    d_max = max(d for _, d in shapes)
    reserve = 8 * (2 * d_max * d_max + max(shapes[i][1] * shapes[j][1] for i in range(len(shapes))
                                           for j in range(i + 1, len(shapes))))
    per_pos = 4 * max(L * d for L, d in shapes) + 8 * sum(L * d for L, d in shapes)
    if batch_size is None:
        batch_size = int(max(1, min(MAX_BATCH, budget_bytes // BATCH_SHARE // (per_pos * context))))
    batch_bytes = batch_size * context * per_pos
    units = [Unit((m, l), (m, l), 8 * d * d) for m, (L, d) in enumerate(shapes) for l in range(L)]
    for i in range(len(shapes)):
        for j in range(i + 1, len(shapes)):
            units += [Unit((i, la), (j, lb), 8 * shapes[i][1] * shapes[j][1])
                      for la in range(shapes[i][0]) for lb in range(shapes[j][0])]
    room = (budget_bytes - reserve - batch_bytes) // copies
    biggest = max(u.nbytes for u in units)
    if biggest > room:
        need = (copies * biggest + reserve + batch_bytes) / GiB
        raise UniversalityError(
            f"--memory-gb {budget_bytes / GiB:.3g} cannot hold one block: {biggest / 2**20:.0f} MiB plus "
            f"{(reserve + batch_bytes) / 2**20:.0f} MiB of working memory (batch of {batch_size} sequences); "
            f"raise --memory-gb to at least {math.ceil(need * 100) / 100:.2f}")
    passes, cur, used = [], [], 0
    for u in units:
        if cur and used + u.nbytes > room:
            passes.append(tuple(cur))
            cur, used = [], 0
        cur.append(u)
        used += u.nbytes
    passes.append(tuple(cur))
    return Schedule(tuple(passes), batch_size, batch_bytes, reserve, budget_bytes, copies)


# ------------------------------------------------------------------------------ prepare
@dataclass
class Plan:
    """A checked request: loaded models, the opened corpus, the tokenized batches, the passes."""

    specs: list
    identities: list
    views: list
    config: UniversalityConfig
    context: int
    bos: int | None
    corpus: object
    described: dict
    batches: list  # [(ids (B, T) int64, counted (B, T) bool)]
    tokens: int
    exhausted: bool
    schedule: Schedule


def _resolve_spec(spec: str | None) -> str:
    from discover.defaults import default_model_spec

    if spec is None or (spec == "default" and not Path("default").exists()):
        return default_model_spec()
    return spec


def prepare(specs: list, config: UniversalityConfig | None = None, *, corpus: str | None = None,
            text_field: str = "text", allow_pickle: bool = False) -> Plan:
    """Load the models and check every input (models, vocabularies, budget, corpus, tokens)
    before any store is touched. A spec None or "default" is the embedded default model."""
    from discover.adapter import identify, load_model, require_statistics
    from discover.corpus import open_corpus
    from discover.tokens import bos_id, model_context

    cfg = config or UniversalityConfig()
    specs = [_resolve_spec(s) for s in specs]
    if len(specs) < 2:
        raise UniversalityError(
            f"universality compares two or more models, got {len(specs)}; give MODEL_A MODEL_B [...] "
            "(e.g. two seeds of one architecture)")
    for s in specs:  # from the configs alone, before any weights are hashed or loaded
        require_statistics(s, correlations=True)
    identities = [identify(s, allow_pickle=allow_pickle) for s in specs]
    seen: dict = {}
    for spec, ident in zip(specs, identities):
        if ident[1] in seen:
            raise UniversalityError(
                f"{seen[ident[1]]} and {spec} are the same checkpoint ({ident[1][:12]}); give distinct models")
        seen[ident[1]] = spec
    views = [load_model(s, allow_pickle=allow_pickle, device=cfg.device, identity=i)
             for s, i in zip(specs, identities)]
    for v, s in zip(views, specs):
        v.require_statistics(correlations=True)
        if v.tokenizer is None:
            raise ModelLoadError(f"model {s} has no tokenizer files; universality needs one")
    strings0 = views[0].token_strings()
    for v, s in zip(views[1:], specs[1:]):
        strings = v.token_strings()
        if strings != strings0:
            diff = next((i for i, (x, y) in enumerate(zip(strings0, strings)) if x != y), min(len(strings0), len(strings)))
            raise UniversalityError(
                f"{specs[0]} and {s} have different vocabularies ({len(strings0)} vs {len(strings)} tokens, first "
                f"difference at id {diff}); universality needs models that share one tokenizer")
    max_ctx = min(model_context(v) for v in views)
    context = cfg.context or min(max_ctx, 256)
    if context > max_ctx:
        raise QueryError(f"--context {context} is longer than the {max_ctx} positions these models take")
    sched = schedule([(v.n_layers, v.d_mlp) for v in views], int(cfg.memory_gb * GiB), context, cfg.batch_size,
                     copies=2 if cfg.shard_batches else 1)
    corp = open_corpus(corpus, text_field=text_field)
    described = corp.describe()
    bos = bos_id(views[0].tokenizer)
    batches, tokens, exhausted = _batches(corp, cfg, views[0].tokenizer, context, bos, sched.batch_size)
    if tokens == 0:
        raise CorpusError(f"the {cfg.split} split of corpus {described['path']} gave no tokens; point --corpus at text")
    return Plan(specs, identities, views, cfg, context, bos, corp, described, batches, tokens, exhausted, sched)


def _batches(corp, cfg: UniversalityConfig, tokenizer, context: int, bos, batch_size: int):
    """Tokenize once: batches of right-padded sequences and their counted positions (every
    document token: not the BOS, not padding), exactly `cfg.tokens` of them unless the corpus ends."""
    from discover.activations import sequences

    start = 1 if bos is not None else 0
    out, seqs, total = [], [], 0

    def flush():
        nonlocal total
        T = max(len(s) for s in seqs)
        ids = np.full((len(seqs), T), seqs[0][0], np.int64)  # padding: never read by a counted position (causal)
        counted = np.zeros((len(seqs), T), bool)
        for b, s in enumerate(seqs):
            ids[b, :len(s)] = s
            counted[b, start:len(s)] = True
        over = total + int(counted.sum()) - cfg.tokens
        if over > 0:  # the budget ends inside this batch: drop the last positions (row-major order)
            flat = counted.reshape(-1)
            flat[np.flatnonzero(flat)[-over:]] = False
        total += int(counted.sum())
        out.append((ids, counted))
        seqs.clear()

    for _, _, _, ids, _ in sequences(corp, cfg.split, tokenizer, context, bos):
        if len(ids) <= start:
            continue
        seqs.append(ids)
        if len(seqs) == batch_size:
            flush()
            if total >= cfg.tokens:
                return out, total, False
    if seqs:
        flush()
    return out, total, total < cfg.tokens


# ------------------------------------------------------------------------------ the run
class _Maxima:
    """Running maxima of one direction (model i's neurons over model j's), merged block by block."""

    def __init__(self, n: int):
        self.value = np.full(n, -np.inf)
        self.layer = np.full(n, -1, np.int16)
        self.neuron = np.full(n, -1, np.int32)
        self.baseline = np.full(n, -np.inf)

    def merge(self, sl: slice, value, arg, base, other_layer: int) -> None:
        better = value > self.value[sl]  # strict: on ties the earlier block (lower layer) keeps it
        self.value[sl] = np.where(better, value, self.value[sl])
        self.layer[sl] = np.where(better, other_layer, self.layer[sl])
        self.neuron[sl] = np.where(better, arg, self.neuron[sl])
        self.baseline[sl] = np.maximum(self.baseline[sl], base)


def stream_batches(views: list, batches: list, pairs: list, device, bar=None) -> _Stream:
    """The streamed moments of `pairs` [((model, layer), (model, layer)), ...] over `batches`,
    from empty: the models run over each batch and every counted position is folded in."""
    import torch

    from discover.activations import capture

    groups = sorted({g for pr in pairs for g in pr})
    dev = torch.device(device)
    st = _Stream({g: views[g[0]].d_mlp for g in groups}, [tuple(pr) for pr in pairs], dev)
    by_model: dict = {}
    for m, l in groups:
        by_model.setdefault(m, []).append(l)
    for ids, counted in batches:
        ids_t = torch.from_numpy(ids).to(dev)
        mask = torch.from_numpy(counted).to(dev)
        xs = {}
        with torch.no_grad():
            for m, layers in by_model.items():
                view = views[m]
                with capture(view) as got:
                    view.model.base_model(input_ids=ids_t, use_cache=False)
                    for l in layers:
                        xs[(m, l)] = got["acts"][l][mask].to(torch.float64)  # (n_c, d_mlp)
                del got
            st.update(xs)
        if bar is not None:
            bar.update(int(counted.sum()))
    return st


def stream_from_state(state: dict, device="cpu"):
    """A stream rebuilt from `_Stream.state()` (a worker's shard, sent between processes)."""
    return _Stream.from_state(state, device)


def shards(plan: Plan) -> list:
    """The batches in shards of `shard_batches` (one shard of all when not sharded)."""
    sb = plan.config.shard_batches or max(1, len(plan.batches))
    return [plan.batches[i:i + sb] for i in range(0, len(plan.batches), sb)]


def _run_pass(plan: Plan, units: tuple, bar) -> _Stream:
    """Run the models over every batch, accumulating this pass's units: one stream, or (sharded)
    each shard's stream from empty merged into the running one in shard order."""
    pairs = [(u.a, u.b) for u in units]
    parts = shards(plan)
    st = stream_batches(plan.views, parts[0], pairs, plan.config.device, bar)
    for part in parts[1:]:
        st.merge(stream_batches(plan.views, part, pairs, plan.config.device, bar))
    return st


def _compute(plan: Plan, progress: bool, run_pass=None) -> dict:
    """Every pass, then every block's maxima: {(i, j): _Maxima} for i != j. `run_pass(plan, units,
    bar)` accumulates one pass (default: this process; `discover.cluster.ClusterPasses`: the
    workers of a Ray cluster, shard by shard)."""
    import torch
    from tqdm import tqdm

    views, cfg = plan.views, plan.config
    dev = torch.device(cfg.device)
    M = len(views)
    best = {(i, j): _Maxima(views[i].n_layers * views[i].d_mlp) for i in range(M) for j in range(M) if i != j}
    rot_stats: dict = {}  # (model, layer) -> 1 / rotated std, from its within-layer S
    rotations: OrderedDict = OrderedDict()  # least recently used last out
    sched = plan.schedule
    d_max = max(v.d_mlp for v in views)
    # the memory rule reserves two rotations; the budget a pass leaves unused keeps more of them
    keep = 2 + min(sched.spare_bytes(p) for p in range(len(sched.passes))) // (8 * d_max * d_max)

    def rotation(g):
        if g not in rotations:
            if len(rotations) >= keep:
                rotations.popitem(last=False)
            v = views[g[0]]
            rotations[g] = torch.from_numpy(haar_rotation(v.d_mlp, cfg.seed, v.checkpoint_id, g[1])).to(dev)
        rotations.move_to_end(g)
        return rotations[g]

    P = len(sched.passes)
    for p, units in enumerate(sched.passes):
        bar = tqdm(total=plan.tokens, unit="tok", unit_scale=True, desc=f"universality pass {p + 1}/{P}",
                   disable=not progress, dynamic_ncols=True, leave=False)
        try:
            st = (run_pass or _run_pass)(plan, units, bar)
        finally:
            bar.close()
        with torch.no_grad():
            inv = {g: _inv_std(st.m2[g], st.mean[g], st.n) for g in st.m2}
            for u in units:
                if u.a == u.b:
                    rot_stats[u.a] = _inv_std(*_rotated(st.co[(u.a, u.a)], st.mean[u.a], rotation(u.a)), st.n)
                    del st.co[(u.a, u.a)]
            for u in units:
                if u.a == u.b:
                    continue
                (i, la), (j, lb) = u.a, u.b
                m = _block_maxima(st.co[(u.a, u.b)], inv[u.a], inv[u.b], rot_stats[u.a], rot_stats[u.b],
                                  rotation(u.a), rotation(u.b))
                del st.co[(u.a, u.b)]
                da, db = views[i].d_mlp, views[j].d_mlp
                best[(i, j)].merge(slice(la * da, (la + 1) * da), m["row_max"], m["row_arg"], m["row_base"], lb)
                best[(j, i)].merge(slice(lb * db, (lb + 1) * db), m["col_max"], m["col_arg"], m["col_base"], la)
        del st
    return best


def universality(specs: list, store, *, corpus: str | None = None, text_field: str = "text", tokens: int = 100_000,
                 split: str = "all", seed: int = 0, threshold: float = 0.5, memory_gb: float = 2.0,
                 batch_size: int | None = None, context: int | None = None, device: str = "cpu",
                 allow_pickle: bool = False, progress: bool = True, plan: Plan | None = None,
                 top: int = 10, run_pass=None, shard_batches: int | None = None) -> UniversalitySummary:
    """Correlate the MLP neurons of two or more models over the same tokens and commit the run
    (maxima, partners, rotated baselines, universal flags) to `store` in one transaction.
    `plan` (from `prepare`) replaces the model, corpus and settings arguments."""
    if plan is None:
        cfg = UniversalityConfig(tokens=tokens, split=split, seed=seed, threshold=threshold, memory_gb=memory_gb,
                                 batch_size=batch_size, context=context, device=device, shard_batches=shard_batches)
        plan = prepare(specs, cfg, corpus=corpus, text_field=text_field, allow_pickle=allow_pickle)
    t0 = time.perf_counter()
    best = _compute(plan, progress, run_pass)
    seconds = time.perf_counter() - t0
    uid = uuid.uuid4().hex[:12]
    tables = _tables(plan, best)
    _write(store, plan, uid, tables, seconds)
    return _summary(plan, uid, tables, seconds, top)


def _tables(plan: Plan, best: dict) -> dict:
    """Arrow tables neuron_correlations and universal_neurons (without the run id)."""
    import pyarrow as pa

    views, thr = plan.views, plan.config.threshold
    corr_parts, uni_parts = [], []
    for i, vi in enumerate(views):
        n = vi.n_layers * vi.d_mlp
        layer = np.repeat(np.arange(vi.n_layers, dtype=np.int16), vi.d_mlp)
        neuron = np.tile(np.arange(vi.d_mlp, dtype=np.int32), vi.n_layers)
        maxs, bases = [], []
        for j, vj in enumerate(views):
            if j == i:
                continue
            b = best[(i, j)]
            dead = ~np.isfinite(b.value)
            maxs.append(np.where(dead, np.nan, b.value))
            bases.append(np.where(dead | ~np.isfinite(b.baseline), np.nan, b.baseline))
            corr_parts.append(pa.table({
                "checkpoint_id": pa.repeat(pa.scalar(vi.checkpoint_id), n), "layer": layer, "neuron": neuron,
                "other_checkpoint_id": pa.repeat(pa.scalar(vj.checkpoint_id), n),
                "max_corr": pa.array(maxs[-1], mask=dead),
                "partner_layer": pa.array(b.layer, mask=dead), "partner_neuron": pa.array(b.neuron, mask=dead),
                "baseline_corr": pa.array(bases[-1], mask=np.isnan(bases[-1])),
                "excess": pa.array(maxs[-1] - bases[-1], mask=np.isnan(maxs[-1] - bases[-1])),
            }))
        mean_max, mean_base = np.mean(maxs, axis=0), np.mean(bases, axis=0)  # NaN if any is NaN
        excess = mean_max - mean_base
        uni_parts.append(pa.table({
            "checkpoint_id": pa.repeat(pa.scalar(vi.checkpoint_id), n), "layer": layer, "neuron": neuron,
            "mean_max_corr": pa.array(mean_max, mask=np.isnan(mean_max)),
            "mean_baseline": pa.array(mean_base, mask=np.isnan(mean_base)),
            "mean_excess": pa.array(excess, mask=np.isnan(excess)),
            "universal": np.nan_to_num(excess, nan=-np.inf) > thr,
        }))
    return {"neuron_correlations": pa.concat_tables(corr_parts), "universal_neurons": pa.concat_tables(uni_parts)}


def _settings(plan: Plan) -> dict:
    cfg = plan.config
    return {"seed": cfg.seed, "threshold": cfg.threshold, "context": plan.context,
            "batch_size": plan.schedule.batch_size, "memory_gb": cfg.memory_gb,
            "passes": len(plan.schedule.passes), "requested_tokens": cfg.tokens, "exhausted": plan.exhausted,
            "bos": plan.bos, "bos_excluded": plan.bos is not None, "padding_excluded": True,
            "tokenizer_of": plan.identities[0][1], "rotation": "haar per layer",
            "activation": "MLP activation after the nonlinearity (input of the output projection)",
            "device": str(cfg.device), "shard_batches": cfg.shard_batches}


def _models(plan: Plan) -> list:
    return [{"spec": ident[0], "checkpoint_id": ident[1], "n_layers": v.n_layers, "d_mlp": v.d_mlp}
            for ident, v in zip(plan.identities, plan.views)]


def _write(store, plan: Plan, uid: str, tables: dict, seconds: float) -> None:
    import pyarrow as pa

    from discover import __version__
    from discover.store import insert_arrow, transaction

    with transaction(store.con) as con:
        con.execute(
            "INSERT INTO universality_runs VALUES (?, ?, ?, ?, ?, ?, ?, now(), ?, ?)",
            [uid, json.dumps(_models(plan)), plan.described["fingerprint"], json.dumps(plan.described),
             plan.config.split, plan.tokens, json.dumps(_settings(plan)), seconds, __version__])
        for name, tbl in tables.items():
            insert_arrow(con, name, tbl.append_column("universality_id", pa.repeat(pa.scalar(uid), tbl.num_rows)))


def _summary(plan: Plan, uid: str, tables: dict, seconds: float, top: int) -> UniversalitySummary:
    uni = tables["universal_neurons"].to_pydict()
    cor = tables["neuron_correlations"].to_pydict()
    ckpt = np.array(uni["checkpoint_id"])
    flag = np.array(uni["universal"], bool)
    layer = np.array(uni["layer"])
    excess = np.array([np.nan if x is None else x for x in uni["mean_excess"]])
    models = []
    for m in _models(plan):
        sel = ckpt == m["checkpoint_id"]
        k, total = int(flag[sel].sum()), int(sel.sum())
        models.append({**m, "universal": k, "neurons": total, "fraction": k / total,
                       "dead": int(np.isnan(excess[sel]).sum()),
                       "per_layer": np.bincount(layer[sel & flag], minlength=m["n_layers"]).tolist()})
    spec_of = {m["checkpoint_id"]: m["spec"] for m in models}
    order = [int(r) for r in np.argsort(-np.nan_to_num(excess, nan=-np.inf), kind="stable") if flag[r]][:top]
    c_key = list(zip(cor["checkpoint_id"], cor["layer"], cor["neuron"]))
    want = {(uni["checkpoint_id"][r], uni["layer"][r], uni["neuron"][r]): r for r in order}
    partners: dict = {}
    for q, key in enumerate(c_key):
        if key in want:
            partners.setdefault(key, []).append({
                "spec": spec_of[cor["other_checkpoint_id"][q]], "checkpoint_id": cor["other_checkpoint_id"][q],
                "neuron": f"L{cor['partner_layer'][q]}.N{cor['partner_neuron'][q]}",
                "max_corr": cor["max_corr"][q], "baseline_corr": cor["baseline_corr"][q]})
    top_rows = [{"spec": spec_of[uni["checkpoint_id"][r]], "checkpoint_id": uni["checkpoint_id"][r],
                 "neuron": f"L{uni['layer'][r]}.N{uni['neuron'][r]}", "mean_max_corr": uni["mean_max_corr"][r],
                 "mean_baseline": uni["mean_baseline"][r], "mean_excess": uni["mean_excess"][r],
                 "partners": partners.get((uni["checkpoint_id"][r], uni["layer"][r], uni["neuron"][r]), [])}
                for r in order]
    return UniversalitySummary(
        universality_id=uid, models=models, tokens=plan.tokens, passes=len(plan.schedule.passes),
        batch_size=plan.schedule.batch_size, context=plan.context, threshold=plan.config.threshold,
        exhausted=plan.exhausted, seconds=seconds, corpus=plan.described, top=top_rows)


# ------------------------------------------------------------------------------- queries
def latest_universality(store, checkpoint_id: str) -> dict | None:
    """The newest universality run that includes `checkpoint_id`, for that checkpoint's neurons:
    {"universality_id", "models", "tokens", "threshold", "neurons": {(layer, neuron): {
    "mean_max_corr", "mean_baseline", "mean_excess", "universal", "partners": [{"checkpoint_id",
    "layer", "neuron", "max_corr", "baseline_corr"}]}}}; None if no run includes it."""
    try:
        runs = store.con.execute(
            "SELECT universality_id, models, tokens, settings FROM universality_runs "
            "ORDER BY created_at DESC, rowid DESC").fetchall()
    except Exception as e:  # a read-only store from before this table existed
        import duckdb

        if isinstance(e, duckdb.CatalogException):
            return None
        raise
    for uid, models, tokens, settings in runs:
        models = json.loads(models)
        if any(m["checkpoint_id"] == checkpoint_id for m in models):
            break
    else:
        return None
    neurons: dict = {}
    for layer, neuron, mm, mb, me, u in store.con.execute(
            "SELECT layer, neuron, mean_max_corr, mean_baseline, mean_excess, universal FROM universal_neurons "
            "WHERE universality_id = ? AND checkpoint_id = ? ORDER BY layer, neuron", [uid, checkpoint_id]).fetchall():
        neurons[(int(layer), int(neuron))] = {"mean_max_corr": mm, "mean_baseline": mb, "mean_excess": me,
                                              "universal": bool(u), "partners": []}
    for layer, neuron, other, pl, pn, mc, bc in store.con.execute(
            "SELECT layer, neuron, other_checkpoint_id, partner_layer, partner_neuron, max_corr, baseline_corr "
            "FROM neuron_correlations WHERE universality_id = ? AND checkpoint_id = ? "
            "ORDER BY layer, neuron", [uid, checkpoint_id]).fetchall():
        neurons[(int(layer), int(neuron))]["partners"].append({
            "checkpoint_id": other, "layer": None if pl is None else int(pl),
            "neuron": None if pn is None else int(pn), "max_corr": mc, "baseline_corr": bc})
    order = {m["checkpoint_id"]: k for k, m in enumerate(models)}
    for v in neurons.values():  # the run's model order
        v["partners"].sort(key=lambda q: order.get(q["checkpoint_id"], len(order)))
    return {"universality_id": uid, "models": models, "tokens": int(tokens),
            "threshold": json.loads(settings)["threshold"], "neurons": neurons}
