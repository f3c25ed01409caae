"""The scanner: every neuron's direct effect on the vocabulary, from the weights alone.

For each layer, in chunks of neurons, `G = W_out_chunk @ U` (the congruence of every neuron with
every token, U the processed unembedding) is computed once and then reduced while it is still
in cache, 32 neurons at a time: the moments of the cosine distribution `c_t`, the top and bottom
tokens, and an exact streaming per-token top-K over all neurons (so that "neurons most
congruent with token X" is a lookup). The full (neuron, vocab) matrix never exists at once:
peak extra memory is one (chunk_rows, vocab) block plus the per-token top-K state.

The numbers follow ../shared/METHODS.md ("Per-neuron weight statistics"); the README lists them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from discover.adapter import ModelView
from discover.defaults import default_model_dir, default_model_spec  # noqa: F401 (callers import them from here too)
from discover.errors import ModelLoadError
from discover.roles import ROLES, RoleThresholds, assign_roles  # noqa: F401


@dataclass(frozen=True)
class ScanConfig:
    """Settings of one scan. `top_k`: top/bottom tokens kept per neuron; `token_top_k`: neurons
    kept per token and sign (the exact answer depth of `query token`)."""

    top_k: int = 20
    token_top_k: int = 50
    chunk_rows: int = 1024
    block_rows: int = 32
    roles: RoleThresholds = field(default_factory=RoleThresholds)
    device: str = "cpu"
    backend: str = "auto"  # "numba" (fused CPU kernels), "torch" (any device), "auto": numba on CPU

    def __post_init__(self):
        for name in ("top_k", "token_top_k", "chunk_rows", "block_rows"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.top_k > 1000 or self.token_top_k > 10000:
            raise ValueError("top_k must be <= 1000 and token_top_k <= 10000")
        if self.backend not in ("auto", "numba", "torch"):
            raise ValueError(f"backend must be auto, numba or torch, got {self.backend!r}")
        if self.backend == "numba" and not self.device.startswith("cpu"):
            raise ValueError("backend numba runs on the CPU only; use backend torch for other devices")

    def use_numba(self) -> bool:
        return self.backend == "numba" or (self.backend == "auto" and self.device.startswith("cpu"))

    def compute_key(self) -> dict:
        """The settings that change the stored numbers (roles excluded: they re-derive cheaply)."""
        return {"top_k": self.top_k, "token_top_k": self.token_top_k}


@dataclass
class LayerResult:
    """Per-neuron results of one layer; arrays are (neuron,) or (neuron, k)."""

    layer: int
    stats: dict[str, np.ndarray]
    top_ids: np.ndarray
    top_vals: np.ndarray
    bottom_ids: np.ndarray
    bottom_vals: np.ndarray
    w_out_unit: np.ndarray  # (neuron, d_model) float32, unit-norm processed w_out (FAISS)
    w_in_unit: np.ndarray | None = None  # (neuron, d_model) float16, unit-norm processed w_in (tracking)


@dataclass
class ScanResult:
    layers: list[LayerResult]
    token_top: tuple[np.ndarray, np.ndarray]  # (ids, congruence), each (K, vocab), descending
    token_bottom: tuple[np.ndarray, np.ndarray]  # most negative first
    unembed_norms: np.ndarray  # (vocab,) ||U[:, t]||
    seconds: float


# --------------------------------------------------------------------- per-token top-K
def _orderable(v: torch.Tensor) -> torch.Tensor:
    """float32 -> int64 whose order equals the floats' order (sign-magnitude bit trick)."""
    b = v.contiguous().view(torch.int32).to(torch.int64)
    return torch.where(b < 0, -(b & 0x7FFFFFFF) - 1, b)


class TokenTopK:
    """Exact streaming top-K along the neuron axis for every token (one sign).

    The first `warm_rows` neurons are reduced densely with `topk`. After that a token's current
    K-th value is a lower bound of its final one, so only entries above it can matter: per block
    of neurons, the block's max per token (one pass, in cache) says which tokens to look at, and
    those candidates are merged now and then with one int64 sort. Exact: nothing that could be
    in the final top-K is dropped.
    """

    WARM_ROWS = 512  # neurons reduced densely before thresholds are used
    MAX_BUFFER = 4_000_000  # candidates held before a merge

    def __init__(self, vocab: int, k: int):
        self.vocab, self.k = vocab, k
        self.warm_rows, self.max_buffer = self.WARM_ROWS, self.MAX_BUFFER
        self.vals: torch.Tensor | None = None  # (k, vocab) descending, once warm
        self.ids: torch.Tensor | None = None
        self.thr: torch.Tensor | None = None  # (vocab,) current K-th value
        self._warm: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._warm_n = 0
        self._buf: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._buf_n = 0

    @property
    def warm(self) -> bool:
        return self.thr is not None

    def add_dense(self, G: torch.Tensor, ids: torch.Tensor) -> None:
        """Before warm-up: keep rows G (rows, vocab) of neurons `ids` (copied)."""
        self._warm.append((G.clone(), ids.clone()))
        self._warm_n += G.shape[0]
        if self._warm_n >= max(self.warm_rows, self.k):
            self._finish_warm()

    def _finish_warm(self) -> None:
        G = torch.cat([g for g, _ in self._warm])
        ids = torch.cat([i for _, i in self._warm])
        self._warm, self._warm_n = [], 0
        k = min(self.k, G.shape[0])
        v, pos = G.topk(k, dim=0)
        self.vals, self.ids = v, ids[pos]
        if k == self.k:
            self.thr = self.vals[-1].clone()

    def add_candidates(self, g: torch.Tensor, ids: torch.Tensor, block_max: torch.Tensor, negate=False) -> None:
        """After warm-up: g (rows, vocab) with its per-token max `block_max` (vocab,).
        With `negate`, the scores are -g and `block_max` is g's per-token min."""
        cols = ((-block_max if negate else block_max) > self.thr).nonzero()[:, 0]
        if cols.numel() == 0:
            return
        sub = g[:, cols]  # (rows, ncols)
        if negate:
            sub = sub.neg_()
        r, j = (sub > self.thr[cols]).nonzero().unbind(1)
        self._buf.append((cols[j], sub[r, j], ids[r]))
        self._buf_n += r.numel()
        if self._buf_n > self.max_buffer:
            self._merge()

    def _merge(self) -> None:
        if not self._buf:
            return
        k = self.k
        dev = self.vals.device
        cols = torch.cat([torch.arange(self.vocab, device=dev).repeat(k)] + [b[0] for b in self._buf])
        vals = torch.cat([self.vals.reshape(-1)] + [b[1] for b in self._buf])
        ids = torch.cat([self.ids.reshape(-1)] + [b[2] for b in self._buf])
        self._buf, self._buf_n = [], 0
        # sort by (token asc, value desc) with one int64 key
        key = cols.to(torch.int64) * (1 << 32) + ((1 << 31) - 1 - _orderable(vals))
        order = torch.sort(key).indices
        cols, vals, ids = cols[order], vals[order], ids[order]
        starts = torch.searchsorted(cols, torch.arange(self.vocab, device=dev))
        rank = torch.arange(cols.shape[0], device=dev) - starts[cols]
        keep = rank < k
        rank, cols = rank[keep], cols[keep]
        self.vals = torch.empty(k, self.vocab, device=dev)
        self.ids = torch.empty(k, self.vocab, dtype=ids.dtype, device=dev)
        self.vals[rank, cols] = vals[keep]
        self.ids[rank, cols] = ids[keep]
        self.thr = self.vals[-1].clone()

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, values), each (k, vocab), best first."""
        if self._warm:
            self._finish_warm()
        self._merge()
        return self.ids.cpu().numpy().astype(np.int32), self.vals.cpu().numpy().astype(np.float32)


# ------------------------------------------------------------------------------ scan
def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="neuron", leave=True, dynamic_ncols=True)


def scan(view: ModelView, config: ScanConfig | None = None, *, progress: bool = True) -> ScanResult:
    """Scan every neuron of every layer of `view` (see the module docstring)."""
    config = config or ScanConfig()
    t0 = time.perf_counter()
    dev = torch.device(config.device)
    U = view.processed_unembed().to(dev)  # (d_model, vocab)
    if not torch.isfinite(U).all():
        raise ModelLoadError("the unembedding or final norm holds NaN or infinite values; the checkpoint is broken")
    u_norm = U.norm(dim=0)
    inv_u = torch.where(u_norm > 0, 1.0 / u_norm, torch.zeros_like(u_norm))
    V = U.shape[1]
    k_tok = min(config.top_k, V)
    k_neurons = min(config.token_top_k, view.n_layers * view.d_mlp)
    if config.use_numba():
        from discover._kernels import new_heaps

        pos_top, neg_top = new_heaps(V, k_neurons), new_heaps(V, k_neurons)
    else:
        pos_top, neg_top = TokenTopK(V, k_neurons), TokenTopK(V, k_neurons)
    layers = []
    with torch.inference_mode():
        for layer in range(view.n_layers):
            layers.append(_scan_layer(view, layer, U, inv_u, k_tok, pos_top, neg_top, config, progress))
    if config.use_numba():
        from discover._kernels import sorted_heaps

        (ids_p, vals_p), (ids_n, vals_n) = sorted_heaps(*pos_top), sorted_heaps(*neg_top)
        ids_p, ids_n = ids_p.astype(np.int32), ids_n.astype(np.int32)
    else:
        ids_p, vals_p = pos_top.result()
        ids_n, vals_n = neg_top.result()
    return ScanResult(
        layers=layers,
        token_top=(ids_p, vals_p),
        token_bottom=(ids_n, -vals_n),
        unembed_norms=u_norm.cpu().numpy(),
        seconds=time.perf_counter() - t0,
    )


def _row_stats_torch(Gc, inv_u, inv_w, top_v, top_i, bot_v, bot_i, mom, block_rows) -> None:
    """Device-generic twin of `_kernels.row_stats` (bottom values stored negated, as there)."""
    top_v[:], top_i[:] = Gc.topk(top_v.shape[1], dim=1)
    v, i = Gc.topk(bot_v.shape[1], dim=1, largest=False)
    bot_v[:], bot_i[:] = -v, i
    for b0 in range(0, Gc.shape[0], block_rows):
        # c_t = G / (|w| |u_t|), centred; block_rows neurons at a time so every pass stays in cache
        b1 = min(Gc.shape[0], b0 + block_rows)
        h = Gc[b0:b1] * inv_u
        h *= inv_w[b0:b1, None]
        mean = h.mean(1, keepdim=True)
        h -= mean
        d2 = h * h
        mom[b0:b1, 0] = mean[:, 0].double()
        mom[b0:b1, 1] = d2.mean(1).double()
        mom[b0:b1, 2] = (d2 * h).mean(1).double()
        mom[b0:b1, 3] = (d2 * d2).mean(1).double()


def _scan_layer(view, layer, U, inv_u, k_tok, pos_top, neg_top, config, progress) -> LayerResult:
    dev = U.device
    W = view.processed_W_out(layer).to(dev)  # (neuron, d_model)
    W_in = view.processed_W_in(layer).to(dev)
    if not (torch.isfinite(W).all() and torch.isfinite(W_in).all()):
        raise ModelLoadError(f"layer {layer}'s MLP weights hold NaN or infinite values; the checkpoint is broken")
    n, V = W.shape[0], U.shape[1]
    w_norm = W.norm(dim=1)
    in_norm = W_in.norm(dim=1)
    inv_w = torch.where(w_norm > 0, 1.0 / w_norm, torch.zeros_like(w_norm))
    cos_io = (W_in * W).sum(1) / (in_norm * w_norm).clamp_min(1e-30)
    mom = torch.empty(n, 4, dtype=torch.float64, device=dev)  # mean, m2, m3, m4 (central moments)
    top_v = torch.empty(n, k_tok, device=dev)
    top_i = torch.empty(n, k_tok, dtype=torch.int64, device=dev)
    bot_v = torch.empty(n, k_tok, device=dev)
    bot_i = torch.empty(n, k_tok, dtype=torch.int64, device=dev)
    cpu = config.use_numba()
    if cpu:
        from discover import _kernels

        inv_u_np, inv_w_np, mom_np = inv_u.numpy(), inv_w.numpy(), mom.numpy()
        top_v_np, top_i_np, bot_v_np, bot_i_np = top_v.numpy(), top_i.numpy(), bot_v.numpy(), bot_i.numpy()
    bar = _progress(n, f"scan L{layer}", progress)
    G = torch.empty(min(config.chunk_rows, n), V, device=dev)
    for c0 in range(0, n, config.chunk_rows):
        c1 = min(n, c0 + config.chunk_rows)
        Gc = G[: c1 - c0]
        torch.mm(W[c0:c1], U, out=Gc)  # (chunk, vocab) congruence
        rows = slice(c0, c1)
        if cpu:  # fused numba kernels: one pass per row, one pass per token (both signs)
            g = Gc.numpy()
            _kernels.row_stats(g, inv_u_np, inv_w_np[rows], top_v_np[rows], top_i_np[rows],
                               bot_v_np[rows], bot_i_np[rows], mom_np[rows])
            _kernels.token_heaps_update(g, layer * n + c0, *pos_top, *neg_top)
        else:
            _row_stats_torch(Gc, inv_u, inv_w[rows], top_v[rows], top_i[rows], bot_v[rows], bot_i[rows],
                             mom[rows], config.block_rows)
            gids = torch.arange(c0, c1, device=dev) + layer * n
            if pos_top.warm:
                pos_top.add_candidates(Gc, gids, Gc.amax(0))
                neg_top.add_candidates(Gc, gids, Gc.amin(0), negate=True)
            else:
                pos_top.add_dense(Gc, gids)
                neg_top.add_dense(Gc.neg(), gids)
        if bar is not None:
            bar.update(c1 - c0)
    if bar is not None:
        bar.close()
    mom = mom.double().cpu()
    var = mom[:, 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        skew = (mom[:, 2] / var.pow(1.5)).numpy()
        kurt = (mom[:, 3] / var.pow(2)).numpy()
    # best first (the CPU kernel leaves heaps unsorted); ties: lower token id first
    from discover._kernels import sorted_heaps  # noqa: I001 (numpy only: no numba kernel runs here)

    top_i, top_v = (a.T for a in sorted_heaps(top_v.cpu().numpy(), top_i.cpu().numpy()))
    bot_i, bot_v = (a.T for a in sorted_heaps(bot_v.cpu().numpy(), bot_i.cpu().numpy()))
    bot_v = -bot_v
    stats = {
        "vocab_mean": mom[:, 0].numpy(),
        "vocab_var": var.numpy(),
        "vocab_skew": np.nan_to_num(skew, nan=0.0),
        "vocab_kurt": np.nan_to_num(kurt, nan=0.0),
        "w_in_norm": in_norm.double().cpu().numpy(),
        "w_out_norm": w_norm.double().cpu().numpy(),
        "cos_in_out": cos_io.double().cpu().numpy(),
    }
    if view.gated:
        W_up = view.processed_W_in(layer, "up").to(dev)
        up_norm = W_up.norm(dim=1)
        stats["w_up_norm"] = up_norm.double().cpu().numpy()
        stats["cos_up_out"] = ((W_up * W).sum(1) / (up_norm * w_norm).clamp_min(1e-30)).double().cpu().numpy()
    unit = (W * inv_w[:, None]).cpu().numpy().astype(np.float32)
    return LayerResult(
        layer=layer,
        stats=stats,
        top_ids=np.ascontiguousarray(top_i, dtype=np.int32),
        top_vals=np.ascontiguousarray(top_v),
        bottom_ids=np.ascontiguousarray(bot_i, dtype=np.int32),
        bottom_vals=np.ascontiguousarray(bot_v),
        w_out_unit=unit,
        w_in_unit=(W_in / in_norm.clamp_min(1e-30)[:, None]).cpu().numpy().astype(np.float16),
    )


# -------------------------------------------------------------------------- pipeline
@dataclass
class ScanSummary:
    """What `scan_model` did: `status` is "scanned", "unchanged" or "roles-updated"."""

    spec: str
    checkpoint_id: str
    status: str
    n_layers: int
    d_mlp: int
    d_model: int
    d_vocab: int
    seconds: float
    role_counts: dict


def scan_model(spec: str | None, store, config: ScanConfig | None = None, *, allow_pickle: bool = False,
               progress: bool = True, force: bool = False, identity=None, view=None) -> ScanSummary:
    """Scan `spec` (hub id or local dir; None = the embedded default) into `store`.

    An unchanged checkpoint (same content hash, same scan settings) is not scanned again;
    changed role thresholds only re-derive roles from the stored statistics.
    """
    from dataclasses import asdict

    from discover.adapter import identify, load_model

    config = config or ScanConfig()
    spec = spec or default_model_spec()
    t0 = time.perf_counter()
    # identity: (normalised spec, checkpoint id, dir) from adapter.identify, if the caller has it
    norm_spec, ckpt_id, model_dir = identity or identify(spec, allow_pickle=allow_pickle)
    row = store.checkpoint(ckpt_id)
    status = "scanned"
    if row is not None and not force and row["scan_settings"] == config.compute_key():
        status = "unchanged"
        if row["role_thresholds"] != asdict(config.roles):
            store.rederive_roles(row, config.roles)
            status = "roles-updated"
        store.add_alias(norm_spec, ckpt_id)
    else:
        if view is None or view.checkpoint_id != ckpt_id:
            view = load_model(spec, allow_pickle=allow_pickle, device="cpu", identity=(norm_spec, ckpt_id, model_dir))
        result = scan(view, config, progress=progress)
        store.write_scan(view, result, config, spec=norm_spec)
    row = store.checkpoint(ckpt_id)
    counts = dict(store.con.execute(
        "SELECT role, count(*) FROM roles WHERE checkpoint_id = ? GROUP BY role", [ckpt_id]).fetchall())
    return ScanSummary(
        spec=norm_spec, checkpoint_id=ckpt_id, status=status, n_layers=row["n_layers"], d_mlp=row["d_mlp"],
        d_model=row["d_model"], d_vocab=row["d_vocab"], seconds=time.perf_counter() - t0,
        role_counts={r: int(counts.get(r, 0)) for r in ROLES},
    )
