"""The corpus pass: what every neuron does on real text (METHODS.md, "Activation statistics").

`run_activations` streams tokenized documents through the model in batches, with hooks on every
layer's activation site (the input of `c_proj` / `dense_4h_to_h` / `down_proj`: after the
nonlinearity, `act(gate) * up` for gated MLPs) and on the final norm, and folds each batch into
one state per neuron with a fused kernel (`_act_kernels.activation_update`):

- exact moments in float64 (mean, variance, skewness `E[z^3]`, kurtosis `E[z^4]`, NOT excess,
  as the scanner's vocabulary kurtosis), activation frequency (fraction > 0), min and max;
- an exact histogram on fixed geometric bins (`_act_kernels.bin_edges`);
- the top-k documents by maximum activation, and by maximum direct logit attribution to the
  true next token (`act * w_out . U[:, next] / final-norm scale`, processed weights), at most
  one entry per document, each with a window of `before` tokens before and `after` after the
  maximum and the per-token values of that window;
- for the scan's prediction / suppression candidates and user `--pair`s: per activation bin,
  the number of positions, how many had the token as the model's top prediction, how many had a
  known next token and how many had the token next (the "an" neuron study's Finding 2).

Sequences: each document is cut into pieces of `context - 1` tokens, each preceded by the
tokenizer's BOS (else EOS) token, as GPT-2 saw documents in training; the BOS position is shown
in examples but never counted. The budget is counted in document tokens and honoured in whole
batches, so a pass extended to more tokens sees exactly the batches a longer single run would.

A pass is identified by (checkpoint, corpus fingerprint, split, context, batch size, device, k,
window, pairs). Its running state is saved atomically every `save_every` seconds under
`activations/<pass>/state.npz`; a rerun after `kill -9` continues from there and ends with the
same numbers as an uninterrupted run (the batches, their order and every merge are the same).
Results are committed to the catalog in one transaction at the end of each run; until then the
catalog keeps the previous results of the pass.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from discover import _act_kernels as K
from discover.errors import CorpusError, QueryError
from discover.pass_store import (  # noqa: F401 (callers use them from here too)
    CURVE_FIELDS,
    RESULT_TABLES,
    create_pass,
    pass_row,
    write_results,
)
from discover.shards import OPEN, close_shard, merged_moments
from discover.tokens import bos_id, model_context, single_token  # noqa: F401 (callers use them from here too)

KINDS = ("activation", "dla")  # the two example tables
STATE_VERSION = 3
ROWS_BUDGET_BYTES = 0.5e9  # activations held per batch (all layers) when batch_size is not given


@dataclass(frozen=True)
class ActivationConfig:
    """Settings of one corpus pass. `tokens` and `save_every` do not change a pass's identity."""

    tokens: int = 1_000_000
    batch_size: int | None = None  # sequences per forward pass; None: from ROWS_BUDGET_BYTES, at most 32
    context: int | None = None  # tokens per sequence incl. the BOS; None: min(model's maximum, 256)
    top_k: int = 20
    before: int = 50
    after: int = 10
    split: str = "all"
    pairs: tuple = ()  # ((layer, neuron, token_id), ...) named by the user
    max_candidates: int = 256  # strongest prediction + suppression candidates that get curves
    save_every: float = 30.0  # seconds between saves of the resumable state
    device: str = "cpu"
    shard_batches: int = 16  # batches per shard (discover.shards): part of the pass's identity
    purpose: str = "corpus"  # "study": a token study's pass, which `query.latest_pass` passes over

    def __post_init__(self):
        if not (isinstance(self.tokens, int) and self.tokens > 0):
            raise ValueError(f"tokens must be a positive number of tokens, got {self.tokens}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.context is not None and self.context < 2:
            raise ValueError(f"context must be >= 2 (a BOS and one token), got {self.context}")
        if not 1 <= self.top_k <= 1000:
            raise ValueError(f"top_k must be 1..1000, got {self.top_k}")
        if self.before < 0 or self.after < 0:
            raise ValueError("before and after must be >= 0")
        if self.split not in ("all", "train", "heldout"):
            raise ValueError(f"split must be all, train or heldout, got {self.split!r}")
        if self.max_candidates < 0:
            raise ValueError(f"max_candidates must be >= 0, got {self.max_candidates}")
        if not (isinstance(self.shard_batches, int) and self.shard_batches >= 1):
            raise ValueError(f"shard_batches must be a positive integer, got {self.shard_batches!r}")


@dataclass
class PassSummary:
    """What `run_activations` did. status: 'ran', 'extended', 'resumed', 'unchanged'."""

    pass_id: str
    checkpoint_id: str
    status: str
    tokens: int
    sequences: int
    documents: int
    exhausted: bool
    seconds: float
    tokens_per_second: float
    pairs: int
    corpus: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------ stream
def sequences(corpus, split: str, tokenizer, context: int, bos: int | None, start=(0, 0)):
    """Yield (doc ordinal, doc id, chunk, ids (with BOS), next token after the chunk or -1)
    from document ordinal start[0], chunk start[1] on, in corpus order."""
    body = context - (1 if bos is not None else 0)
    d0, c0 = start
    for ordinal, doc in enumerate(corpus.iter_documents(split)):
        if ordinal < d0:
            continue
        ids = tokenizer(doc.text, add_special_tokens=False, verbose=False)["input_ids"]
        n = len(ids)
        for c in range(c0 if ordinal == d0 else 0, -(-n // body)):
            piece = ids[c * body:(c + 1) * body]
            nxt = ids[(c + 1) * body] if (c + 1) * body < n else -1
            yield ordinal, doc.doc_id, c, ([bos] if bos is not None else []) + piece, nxt


def batched(seqs, size: int):
    """Consecutive lists of `size` items of `seqs` (the pass's batches); the last may be shorter."""
    batch: list = []
    for s in seqs:
        batch.append(s)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# ------------------------------------------------------------------------------- hooks
@contextmanager
def capture(view):
    """Hooks on every layer's activation site and on the final norm, removed on exit.

    Yields a dict: 'acts' -> list of (B, T, N) tensors (per layer, the site's input), 'resid'
    -> the final norm's input (B, T, d_model), 'post' -> per layer the input of a norm on the
    MLP's output (B, T, d_model; None where there is no such norm), 'scale' -> per layer the
    experts' write scale (B, T, N): routing weights, 0 where a token is not routed (None in dense
    models)."""
    model = view.model
    L = view.n_layers
    got: dict = {"acts": [None] * L, "resid": None, "post": [None] * L, "scale": [None] * L}
    handles = []

    def scale_hook(layer):
        def hook(_mod, _args, scale):
            got["scale"][layer] = scale
        return hook

    def post_hook(layer):
        def hook(_mod, args):
            got["post"][layer] = args[0]
        return hook

    def site_hook(layer):
        def hook(_mod, args):
            got["acts"][layer] = args[0]
        return hook

    def resid_hook(_mod, args):
        got["resid"] = args[0]

    try:
        for layer in range(view.n_layers):
            site = view.act_module(layer)
            handles.append(site.register_forward_pre_hook(site_hook(layer)))
            if view.layout.moe:  # an expert site's forward hook sees the routing's write scale
                handles.append(site.register_forward_hook(scale_hook(layer)))
        handles.append(model.get_submodule(view.final_norm_site()).register_forward_pre_hook(resid_hook))
        for layer in range(view.n_layers):
            site = view.post_mlp_norm_site(layer)
            if site is not None:
                handles.append(model.get_submodule(site).register_forward_pre_hook(post_hook(layer)))
        yield got
    finally:
        for h in handles:
            h.remove()


# ------------------------------------------------------------------------------- state
class PassState:
    """Everything a pass accumulates, as arrays (L = layers, N = neurons per layer)."""

    def __init__(self, L: int, N: int, k: int, width: int, n_pairs: int):
        f64, f32, i64, i32 = np.float64, np.float32, np.int64, np.int32
        self.meta = {"version": STATE_VERSION, "tokens": 0, "sequences": 0, "batches": 0,
                     "next": [0, 0], "exhausted": False, "documents": 0, "doc_names": {}}
        self.a = {
            # moments of the closed shards, and of the open one (discover.shards): positions each
            # neuron counted (routed tokens, for experts), mean and central sums m2, m3, m4
            "count": np.zeros((L, N), i64),
            "mean": np.zeros((L, N), f64), "m2": np.zeros((L, N), f64), "m3": np.zeros((L, N), f64),
            "m4": np.zeros((L, N), f64),
            **{k: np.zeros((L, N), i64 if k == "s_count" else f64) for k in OPEN},
            "amin": np.full((L, N), np.inf, f32), "amax": np.full((L, N), -np.inf, f32),
            "n_pos": np.zeros((L, N), i64), "hist": np.zeros((L, N, K.N_BINS), i64),
            "curves": np.zeros((n_pairs, K.N_BINS, len(CURVE_FIELDS)), i64),
        }
        for p in ("a", "d"):  # a: by activation, d: by direct logit attribution
            self.a[f"{p}v"] = np.full((L, N, k), K.EMPTY, f32)
            self.a[f"{p}doc"] = np.full((L, N, k), -1, i64)
            self.a[f"{p}pos"] = np.zeros((L, N, k), i32)
            self.a[f"{p}chunk"] = np.zeros((L, N, k), i32)
            self.a[f"{p}next"] = np.full((L, N, k), -1, i32)
            self.a[f"{p}tok"] = np.full((L, N, k, width), -1, i32)
            self.a[f"{p}val"] = np.zeros((L, N, k, width), np.float16)

    def save(self, path: Path) -> None:
        """Atomically replace `path` (write a temporary file, fsync, rename)."""
        live = {int(d) for d in np.unique(np.concatenate([self.a["adoc"].ravel(), self.a["ddoc"].ravel()]))
                if d >= 0}
        self.meta["doc_names"] = {k: v for k, v in self.meta["doc_names"].items() if int(k) in live}
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, __meta__=np.frombuffer(json.dumps(self.meta).encode(), np.uint8), **self.a)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def of(cls, meta: dict, arrays: dict) -> PassState:
        """A state from its parts (a saved file's, or a cluster worker's piece)."""
        self = cls.__new__(cls)
        self.meta, self.a = meta, arrays
        return self

    @classmethod
    def load(cls, path: Path) -> PassState:
        with np.load(path) as z:
            self = cls.of(json.loads(bytes(z["__meta__"]).decode()),
                          {k: z[k].copy() for k in z.files if k != "__meta__"})
        if self.meta.get("version") != STATE_VERSION:
            raise QueryError(f"{path} was written by another discover version; delete it to start the pass over")
        return self

    # -- derived statistics ---------------------------------------------------------------
    def moments(self) -> dict:
        """Per neuron over the positions it counted (NaN for a neuron that counted none: an
        expert no token was routed to)."""
        a = {**self.a, **merged_moments(self.a)}
        n = a["count"].astype(np.float64)
        seen = n > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            var = np.where(seen, a["m2"] / n, np.nan)
            skew = np.where(var > 0, (a["m3"] / n) / var ** 1.5, np.nan)
            kurt = np.where(var > 0, (a["m4"] / n) / var ** 2, np.nan)
            freq = np.where(seen, a["n_pos"] / n, np.nan)
        return {"act_tokens": a["count"], "act_mean": np.where(seen, a["mean"], np.nan), "act_var": var,
                "act_skew": skew, "act_kurt": kurt, "act_freq": freq,
                "act_min": np.where(seen, a["amin"].astype(np.float64), np.nan),
                "act_max": np.where(seen, a["amax"].astype(np.float64), np.nan),
                "act_tail": np.where(seen, hist_tail_sign(a["hist"], a["count"]), np.nan)}


def hist_tail_sign(hist: np.ndarray, count: np.ndarray, q: float = 0.001) -> np.ndarray:
    """+1 / -1 per neuron: the side of its strong activations, from its histogram: the sign of
    the larger in magnitude of its `q` and `1 - q` quantiles, each taken as the outer edge of the
    bin that holds it (bins go by magnitude, so this needs no values). Verify's `tail_sign` is the
    same rule on exact held-out quantiles."""
    edges = K.bin_edges()
    finite = edges.copy()
    finite[0], finite[-1] = 2 * edges[1], 2 * edges[-2]  # the overflow bins' outer edges
    cum = np.cumsum(hist, axis=-1)
    n = np.maximum(count, 1)[..., None]
    lo = np.argmax(cum >= q * n, axis=-1)
    hi = np.argmax(cum >= (1 - q) * n, axis=-1)
    lo_mag = np.where(finite[lo] < 0, -finite[lo], 0.0)  # a low quantile on the positive side: no negative tail
    hi_mag = np.where(finite[hi + 1] > 0, finite[hi + 1], 0.0)
    return np.where(hi_mag >= lo_mag, 1, -1)


# ------------------------------------------------------------------------------- the pass
class PassRunner:
    """One run of the pass over a model view (no store: `fold` is the whole computation)."""

    def __init__(self, view, cfg: ActivationConfig, pairs: list, context: int, batch_size: int):
        import torch

        self.view, self.cfg, self.context, self.batch_size = view, cfg, context, batch_size
        self.torch = torch
        self.dev = torch.device(cfg.device)
        self.L, self.N = view.n_layers, view.d_mlp
        self.width = cfg.before + cfg.after + 1
        self.pairs = pairs  # [(layer, neuron, token_id, source)]
        self.U = view.processed_unembed().to(self.dev)  # (d_model, vocab)
        self.W_out_T = [view.processed_W_out(l).T.contiguous().to(self.dev) for l in range(self.L)]  # (d_model, N)
        self.lm_head = view.model.get_output_embeddings()
        self.base = view.model.base_model
        self.norm = view.final_norm()
        self.post = [view.post_mlp_norm(l) for l in range(self.L)]  # norms on the MLP's output, or None
        self.group, self.group_first = neuron_groups(view.layout, self.N)

    def new_state(self) -> PassState:
        return PassState(self.L, self.N, self.cfg.top_k, self.width, len(self.pairs))

    @staticmethod
    def _inv_scale(torch, x, norm):
        """1 / the norm's per-position scale: sqrt(var + eps) (LayerNorm) or sqrt(mean x^2 + eps)."""
        x = x.float()
        var = x.var(-1, unbiased=False) if norm.kind == "layernorm" else x.pow(2).mean(-1)
        return torch.rsqrt(var + norm.eps)

    def forward(self, ids):
        """Hooked forward pass: per-layer activations, per-layer 1/scale (the final norm's, times a
        post-MLP norm's where the layer has one), top prediction."""
        torch = self.torch
        with torch.inference_mode(), capture(self.view) as got:
            h = self.base(input_ids=ids).last_hidden_state  # (B, T, d_model), after the final norm
            B, T, _ = h.shape
            flat = h.reshape(B * T, -1)
            pred = torch.empty(B * T, dtype=torch.int64, device=h.device)
            step = max(1, int(2**24 // max(1, self.view.d_vocab)))  # rows of logits per chunk (64 MiB)
            for i in range(0, B * T, step):
                pred[i:i + step] = self.lm_head(flat[i:i + step]).argmax(-1)
            inv_scale = self._inv_scale(torch, got["resid"], self.norm)
            # a neuron's direct effect through a post-MLP norm is divided by that norm's scale
            # at the position too (frozen, as the final norm's: shared by the layer's neurons)
            inv = [inv_scale if p is None else inv_scale * self._inv_scale(torch, got["post"][l], p)
                   for l, p in enumerate(self.post)]
            acts = [a.float().contiguous() for a in got["acts"]]
            if self.view.layout.moe:  # (B, T, G): each group's write scale (one expert shares one)
                first = torch.from_numpy(self.group_first).to(h.device)
                wscale = [s[..., first].float().contiguous() for s in got["scale"]]
            else:
                wscale = [torch.ones(B, T, 1)] * self.L
        return acts, [i.reshape(B, T) for i in inv], pred.reshape(B, T), wscale

    def fold(self, state: PassState, batch: list) -> None:
        """Fold one batch of sequences [(ordinal, doc_id, chunk, ids, next), ...] into `state`."""
        torch = self.torch
        B, T = len(batch), max(len(s[3]) for s in batch)
        start = 1 if bos_id(self.view.tokenizer) is not None else 0
        pad = batch[0][3][0]
        ids = np.full((B, T), pad, np.int64)
        nxt_tok = np.full((B, T), -1, np.int64)
        lens = np.zeros(B, np.int32)
        for b, (_, _, _, seq, nxt) in enumerate(batch):
            m = len(seq)
            ids[b, :m] = seq
            nxt_tok[b, :m - 1] = seq[1:]
            nxt_tok[b, m - 1] = nxt
            lens[b] = m
        docs = np.array([s[0] for s in batch], np.int64)
        chunks = np.array([s[2] for s in batch], np.int32)
        acts, inv_scales, pred, wscales = self.forward(torch.from_numpy(ids).to(self.dev))
        pred = pred.cpu().numpy()
        valid = (np.arange(T)[None, :] >= start) & (np.arange(T)[None, :] < lens[:, None])

        uniq, nxt_idx = np.unique(nxt_tok, return_inverse=True)
        nxt_idx = nxt_idx.reshape(B, T).astype(np.int32)
        has = uniq >= 0
        # rows of ct for each unique known next token; -1 where unknown
        col = np.where(has, np.cumsum(has) - 1, -1)
        nxt_idx = col[nxt_idx].astype(np.int32)
        U_next = self.U[:, torch.from_numpy(uniq[has])].T.contiguous()  # (u, d_model)

        a = state.a
        for l in range(self.L):
            inv_scale = inv_scales[l].cpu().numpy().astype(np.float32)  # (B, T)
            act = acts[l].cpu().numpy()  # (B, T, N)
            wscale = wscales[l].cpu().numpy()  # (B, T, G)
            ct = (U_next @ self.W_out_T[l]).cpu().numpy()  # (u, N)
            if ct.shape[0] == 0:
                ct = np.zeros((1, self.N), np.float32)
            asrc = np.full((self.N, self.cfg.top_k), -1, np.int32)
            dsrc = np.full((self.N, self.cfg.top_k), -1, np.int32)
            K.activation_update(
                act, act.view(np.int32), lens, start, docs, nxt_idx, inv_scale, ct, wscale, self.group,
                *(a[m][l] for m in OPEN), a["amin"][l], a["amax"][l], a["n_pos"][l],
                a["hist"][l], a["av"][l], a["adoc"][l], asrc, a["apos"][l], a["dv"][l], a["ddoc"][l], dsrc,
                a["dpos"][l], dense=not self.view.layout.moe)
            for p, src in (("a", asrc), ("d", dsrc)):
                self._windows(state, l, p, src, act, ids, lens, chunks, nxt_idx, ct, inv_scale, nxt_tok, wscale)
            self._curves(state, l, act, valid, pred, nxt_tok, wscale)
        n_tokens = int(valid.sum())
        names = state.meta["doc_names"]
        for s in batch:
            names[str(s[0])] = s[1]
        last = batch[-1]
        state.meta["tokens"] += n_tokens
        state.meta["sequences"] += B
        state.meta["batches"] += 1
        state.meta["documents"] = last[0] + 1
        more = last[4] >= 0  # the document goes on after this chunk
        state.meta["next"] = [last[0], last[2] + 1] if more else [last[0] + 1, 0]

    def _windows(self, state, l, p, src, act, ids, lens, chunks, nxt_idx, ct, inv_scale, nxt_tok, wscale) -> None:
        """Copy the context window of every top-k entry the kernel just replaced."""
        n_idx, j_idx = np.nonzero(src >= 0)
        if len(n_idx) == 0:
            return
        a = state.a
        b = src[n_idx, j_idx]
        pos = a[f"{p}pos"][l][n_idx, j_idx]
        q = pos[:, None] - self.cfg.before + np.arange(self.width)[None, :]  # (E, W)
        ok = (q >= 0) & (q < lens[b][:, None])
        qc = np.clip(q, 0, ids.shape[1] - 1)
        bb = b[:, None]
        vals = act[bb, qc, n_idx[:, None]]
        if p == "d":
            j = nxt_idx[bb, qc]
            s = wscale[bb, qc, self.group[n_idx][:, None]]  # what the neuron wrote: its routing weight
            vals = np.where(j >= 0, vals * s * ct[np.maximum(j, 0), n_idx[:, None]] * inv_scale[bb, qc], np.nan)
        a[f"{p}tok"][l][n_idx, j_idx] = np.where(ok, ids[bb, qc], -1)
        a[f"{p}val"][l][n_idx, j_idx] = np.where(ok, vals, np.nan).astype(np.float16)
        a[f"{p}chunk"][l][n_idx, j_idx] = chunks[b]
        a[f"{p}next"][l][n_idx, j_idx] = nxt_tok[b, pos]

    def _curves(self, state, l, act, valid, pred, nxt_tok, wscale) -> None:
        """Activation-vs-prediction counts per bin for this layer's pairs (vectorised), over the
        positions each neuron counts."""
        sel = [i for i, pr in enumerate(self.pairs) if pr[0] == l]
        if not sel:
            return
        neurons = np.array([self.pairs[i][1] for i in sel])
        toks = np.array([self.pairs[i][2] for i in sel])
        x = act[valid][:, neurons]  # (R, P)
        P = len(sel)
        size = P * K.N_BINS
        flat = K.bin_index(x) + K.N_BINS * np.arange(P)[None, :]
        # a position a neuron does not count (not routed to its expert) goes to a dropped slot
        flat = np.where(wscale[valid][:, self.group[neurons]] != 0, flat, size)
        pv, nv = pred[valid], nxt_tok[valid]
        no_next = flat[nv < 0]  # few rows: the last token of each document
        r_top, p_top = np.nonzero(pv[:, None] == toks[None, :])  # sparse
        r_nxt, p_nxt = np.nonzero(nv[:, None] == toks[None, :])
        counts = np.bincount(flat.ravel(), minlength=size + 1)[:size]
        parts = [
            counts,
            np.bincount(flat[r_top, p_top], minlength=size + 1)[:size],
            counts - np.bincount(no_next.ravel(), minlength=size + 1)[:size],
            np.bincount(flat[r_nxt, p_nxt], minlength=size + 1)[:size],
        ]
        state.a["curves"][sel] += np.stack(parts, axis=-1).reshape(P, K.N_BINS, len(CURVE_FIELDS))


def _after_batch(batches: int) -> None:
    """Test hook: called after every folded (and possibly saved) batch."""


def neuron_groups(layout, N: int) -> tuple[np.ndarray, np.ndarray]:
    """(group of each neuron (N,) int32, first neuron of each group): one group in a dense layer;
    in a mixture-of-experts layer one per expert, then one for the shared expert. The neurons of
    a group share their write scale at every position (their expert's routing weight)."""
    if not layout.moe:
        return np.zeros(N, np.int32), np.zeros(1, np.int64)
    E, I = layout.experts, layout.expert_size
    group = np.minimum(np.arange(N) // I, E).astype(np.int32)
    first = np.arange(E + (1 if layout.shared else 0), dtype=np.int64) * I
    return group, first


def auto_batch_size(view, context: int) -> int:
    per_row = view.n_layers * view.d_mlp * 4
    return int(max(1, min(32, ROWS_BUDGET_BYTES // (per_row * context))))


# ------------------------------------------------------------------------------ pairs
def parse_pair(text: str, view) -> tuple[int, int, int]:
    """'L1.N42:" an"' -> (1, 42, token id); the token must be one token of the vocabulary."""
    nid, sep, tok = text.partition(":")
    lay = view.layout
    if not sep or not tok:
        eg = "L1.E2.N42" if lay.moe else "L1.N42"
        raise QueryError(f"malformed --pair {text!r}; write it as NEURON:TOKEN, e.g. '{eg}:\" an\"'")
    try:
        layer, neuron = lay.parse(nid)
    except QueryError as e:
        raise QueryError(f"--pair {text!r}: {e}") from None
    if not (0 <= layer < view.n_layers and 0 <= neuron < view.d_mlp):
        raise QueryError(
            f"--pair {text!r}: neuron {nid} is out of range: this model has layers "
            f"0-{view.n_layers - 1} and neurons 0-{view.d_mlp - 1} per layer")
    if len(tok) >= 2 and tok[0] == tok[-1] and tok[0] in "\"'":
        tok = tok[1:-1]
    if not tok:
        raise QueryError(f"--pair {text!r}: the token text is empty")
    return layer, neuron, single_token(view, tok, f"--pair {text!r}:")


def candidate_pairs(store, checkpoint_id: str, limit: int) -> list[tuple[int, int, int, str]]:
    """The strongest prediction / suppression candidates (`discover.candidates`, from the catalog
    alone), as (layer, neuron, token id, role)."""
    from discover.candidates import candidates

    return [(c["layer"], c["neuron"], c["token_id"], c["role"]) for c in candidates(store, checkpoint_id, limit)]


# ------------------------------------------------------------------------------ pipeline
@dataclass
class Plan:
    """A checked request: the loaded model, the user's pairs and the opened corpus."""

    spec: str
    identity: tuple
    view: object
    user_pairs: list
    context: int
    batch_size: int
    corpus: object
    described: dict
    corpus_spec: str | None = None  # as given (None: the built-in corpus), for workers that open it themselves
    text_field: str = "text"
    allow_pickle: bool = False


def prepare(spec: str | None, config: ActivationConfig | None = None, *, corpus: str | None = None,
            text_field: str = "text", allow_pickle: bool = False, identity=None) -> Plan:
    """Load the model and check every input (pairs, context, corpus) before any store is touched.
    `identity`: what `adapter.identify` already returned for `spec` (the weights are hashed once)."""
    from discover.adapter import identify, load_model, require_statistics
    from discover.corpus import open_corpus
    from discover.defaults import default_model_spec
    from discover.errors import ModelLoadError

    cfg = config or ActivationConfig()
    spec = spec or default_model_spec()
    require_statistics(spec)  # from the config alone, before the weights are hashed or loaded
    identity = identity or identify(spec, allow_pickle=allow_pickle)
    view = load_model(spec, allow_pickle=allow_pickle, device=cfg.device, identity=identity)
    view.require_statistics()
    if view.tokenizer is None:
        raise ModelLoadError(f"model {spec} has no tokenizer files; the corpus pass needs one")
    user_pairs = [parse_pair(p, view) + ("pair",) for p in cfg.pairs]
    max_ctx = model_context(view)
    context = cfg.context or min(max_ctx, 256)
    if context > max_ctx:
        raise QueryError(f"--context {context} is longer than this model's {max_ctx} positions")
    corp = open_corpus(corpus, text_field=text_field)
    described = corp.describe()
    where = corpus if corpus is None or not Path(corpus).exists() else str(Path(corpus).resolve())  # for workers
    return Plan(spec, identity, view, user_pairs, context, cfg.batch_size or auto_batch_size(view, context),
                corp, described, where, text_field, allow_pickle)


def run_activations(spec: str | None, store, config: ActivationConfig | None = None, *, corpus: str | None = None,
                    text_field: str = "text", allow_pickle: bool = False, progress: bool = True,
                    plan: Plan | None = None, stream=None) -> PassSummary:
    """Run (or extend, or resume) the corpus pass of `spec` (None: the embedded default model)
    over `corpus` (None: the built-in default corpus) and commit its results to `store`.
    `stream`: what folds the batches, `stream(runner, state, plan, state_path, progress)` (default:
    this process, batch after batch; `discover.cluster.ClusterStream`: workers of a Ray cluster)."""
    from discover.scan import scan_model

    cfg = config or ActivationConfig()
    plan = plan or prepare(spec, cfg, corpus=corpus, text_field=text_field, allow_pickle=allow_pickle)
    spec, identity, view, context, batch_size = plan.spec, plan.identity, plan.view, plan.context, plan.batch_size
    user_pairs, corp, described = plan.user_pairs, plan.corpus, plan.described

    if store.checkpoint(identity[1]) is None:  # an existing scan keeps its settings and role thresholds
        scan_model(spec, store, progress=progress, identity=identity, view=view if cfg.device == "cpu" else None)
    ckpt_id = identity[1]
    pairs = list(dict.fromkeys(user_pairs + candidate_pairs(store, ckpt_id, cfg.max_candidates)))
    seen, uniq_pairs = set(), []
    for p in pairs:  # one curve per (neuron, token), the user's source label first
        if p[:3] not in seen:
            seen.add(p[:3])
            uniq_pairs.append(p)
    pairs = uniq_pairs
    device = stream.device(cfg.device) if hasattr(stream, "device") else str(cfg.device)  # where the pass runs
    settings = {"context": context, "batch_size": batch_size, "shard_batches": cfg.shard_batches,
                "device": device, "top_k": cfg.top_k, "before": cfg.before,
                "after": cfg.after, "bins": {"exp_lo": K.EXP_LO, "exp_hi": K.EXP_HI, "per_octave": K.SUB},
                "bos": bos_id(view.tokenizer), "pairs": [list(p) for p in pairs], "version": STATE_VERSION}
    if cfg.purpose != "corpus":  # (absent for the ordinary pass: its identity is unchanged)
        settings["purpose"] = cfg.purpose
    key = {"checkpoint_id": ckpt_id, "corpus": described["fingerprint"], "split": cfg.split, **settings}
    pass_key = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    row = pass_row(store, ckpt_id, pass_key)
    if row is None:
        row = create_pass(store, ckpt_id, pass_key, described, cfg.split, settings)
    pdir = store.root / "activations" / row["files_dir"]
    pdir.mkdir(parents=True, exist_ok=True)
    state_path = pdir / "state.npz"

    runner = PassRunner(view, cfg, pairs, context, batch_size)
    state = PassState.load(state_path) if state_path.exists() else runner.new_state()
    before_tokens = state.meta["tokens"]
    t0 = time.perf_counter()
    if state.meta["tokens"] < cfg.tokens and not state.meta["exhausted"]:
        if stream is None:
            _stream(runner, state, corp, cfg, context, state_path, progress)
        else:
            stream(runner, state, plan, state_path, progress)
    seconds = time.perf_counter() - t0
    folded = state.meta["tokens"] - before_tokens
    if state.meta["tokens"] == 0:
        raise CorpusError(f"the {cfg.split} split of corpus {described['path']} gave no tokens; point --corpus at text")
    if row["tokens"] == state.meta["tokens"] and row["results_dir"] is not None:
        status = "unchanged"
    else:
        status = "resumed" if before_tokens > row["tokens"] else ("extended" if row["tokens"] else "ran")
        write_results(store, row, state, runner, seconds=float(row["seconds"] or 0) + seconds, progress=progress)
    return PassSummary(
        pass_id=row["pass_id"], checkpoint_id=ckpt_id, status=status, tokens=state.meta["tokens"],
        sequences=state.meta["sequences"], documents=state.meta["documents"], exhausted=state.meta["exhausted"],
        seconds=seconds, tokens_per_second=folded / seconds if seconds > 0 and folded else 0.0,
        pairs=len(pairs), corpus=described)


def fold_batch(runner: PassRunner, state: PassState, batch: list) -> None:
    """Fold one batch; close the shard it ends (discover.shards) before anything is saved."""
    runner.fold(state, batch)
    if state.meta["batches"] % runner.cfg.shard_batches == 0:
        close_shard(state.a)


def fold_piece(runner: PassRunner, state: PassState, corp, start: tuple, n_batches: int) -> None:
    """Fold `n_batches` whole batches of the pass's stream from sequence position `start`
    (document ordinal, chunk) into `state` (a cluster worker's piece of one shard: its moments
    stay open, the driver closes the shard); fewer where the corpus ends (the last partial)."""
    bos = bos_id(runner.view.tokenizer)
    state.meta["next"] = list(start)
    stream = sequences(corp, runner.cfg.split, runner.view.tokenizer, runner.context, bos, tuple(start))
    for done, batch in enumerate(batched(stream, runner.batch_size), 1):
        runner.fold(state, batch)
        if done == n_batches and len(batch) == runner.batch_size:
            return
    state.meta["exhausted"] = True


def _stream(runner: PassRunner, state: PassState, corp, cfg, context, state_path: Path, progress: bool) -> None:
    """Fold whole batches until the budget is reached or the corpus ends; save periodically."""
    from tqdm import tqdm

    bos = bos_id(runner.view.tokenizer)
    target = cfg.tokens
    bar = tqdm(total=target, initial=min(state.meta["tokens"], target), unit="tok", unit_scale=True,
               desc="activations", disable=not progress, dynamic_ncols=True, leave=False)
    last_save = time.monotonic()
    try:
        stream = sequences(corp, cfg.split, runner.view.tokenizer, context, bos, tuple(state.meta["next"]))
        for batch in batched(stream, runner.batch_size):
            if len(batch) < runner.batch_size:  # the corpus's last, partial batch: then it ends
                fold_batch(runner, state, batch)
                continue
            before = state.meta["tokens"]
            fold_batch(runner, state, batch)
            bar.update(min(state.meta["tokens"], target) - min(before, target))
            done = state.meta["tokens"] >= target
            if done or time.monotonic() - last_save >= cfg.save_every:
                state.save(state_path)
                last_save = time.monotonic()
            _after_batch(state.meta["batches"])
            if done:
                break
        else:
            state.meta["exhausted"] = True
            state.save(state_path)
    finally:
        bar.close()


