"""Neuron activation patching (METHODS.md, "Causal tests"), exact and batched.

Denoising direction: run the corrupted prompt, give neuron n the activation it has on the clean
prompt (at the last position, or at every position), and score

    recovery = (m_patched - m_corrupted) / (m_clean - m_corrupted),  m = logit(target) - logit(contrast)

at the final position: 1 = fully restored, 0 = no effect.

Patching neuron n of layer l only adds `(a_clean - a_corr)[pos, n] * W_out[n]` to the residual
stream after block l (the down projection is linear), so nothing before block l + 1 needs to
run again. `patch_neurons` starts every batch of neurons from the corrupted run's cached
residual stream after block l:

- positions "last": only the final position's residual changes, so blocks l+1.. run on that one
  position per neuron, attending to the corrupted prefix's cached keys and values (a KV cache
  expanded to the batch). Cost per neuron: one token through L - l - 1 blocks.
- positions "all": positions before the first token where the prompts differ have identical
  activations in both runs (attention is causal), so only the positions from there on run
  through blocks l+1.., over the cached prefix, many neurons per forward pass.

Only the final position's two logits are computed. `patch_loop` is the reference: one full
forward pass per neuron with a hook that overwrites the activation (the way the "an" neuron
notebook and TransformerLens' patching utilities work). `attribution` is the first-order
screen over every layer: `(a_clean - a_corr) . dm/da` from one forward and one backward pass
on the corrupted prompt, normalised the same way — a screen, never the final word.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from discover.errors import QueryError
from discover.tokens import bos_id, model_context, single_token

POSITIONS = ("last", "all")


@dataclass(frozen=True)
class PatchConfig:
    """Which neurons, which positions, how many neurons per forward pass."""

    layers: tuple | None = None  # None: every layer
    positions: str = "last"
    batch_size: int = 512  # neurons per forward pass
    bos: bool = True  # prepend the tokenizer's BOS (else EOS) token, as the corpus pass does

    def __post_init__(self):
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be last or all, got {self.positions!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass
class PatchResult:
    """Recovery per neuron of every patched layer, attribution per neuron of every layer."""

    clean_tokens: list
    corrupted_tokens: list
    target: tuple  # (id, string)
    contrast: tuple
    positions: str
    m_clean: float
    m_corrupted: float
    recovery: dict = field(default_factory=dict)  # layer -> (N,) float64
    attribution: np.ndarray | None = None  # (L, N) float64, normalised like recovery
    seconds: float = 0.0


# ----------------------------------------------------------------------------- inputs
def encode_prompt(view, text: str, bos: bool) -> list[int]:
    if not text:
        raise QueryError("a prompt is empty; give --clean and --corrupted text")
    ids = view.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]  # length is checked below
    b = bos_id(view.tokenizer)  # as the corpus pass: BOS, else EOS
    return ([b] if bos and b is not None else []) + [int(i) for i in ids]


# -------------------------------------------------------------------------- internals
def logit_direction(view, target: int, contrast: int):
    """(d, bias): logit(target) - logit(contrast) = final-norm output @ d + bias, pre-cap (Gemma 2's
    soft-cap is applied after the head); d (d_model,) float32."""
    head = view.model.get_output_embeddings()
    d = (head.weight[target] - head.weight[contrast]).detach().float()
    b = getattr(head, "bias", None)
    return d, (float((b[target] - b[contrast]).detach()) if b is not None else 0.0)


class _Runner:
    """Cached corrupted/clean runs of one prompt pair and the pieces to resume from block l+1."""

    def __init__(self, view, clean_ids, corr_ids, target, contrast):
        import torch

        self.torch = torch
        self.view = view
        self.base = view.model.base_model
        self.dir, self.bias = logit_direction(view, target, contrast)
        self.W_out = [view.W_out(l) for l in range(view.n_layers)]  # raw (N, d_model): exact deltas
        self.clean_ids, self.corr_ids = clean_ids, corr_ids
        self.T = len(corr_ids)
        clean = view.trace(torch.tensor([clean_ids]))
        self.corr = view.trace(torch.tensor([corr_ids]))
        self.a_clean = [a[0] for a in clean.acts]  # (T, N) per layer
        self.a_corr = [a[0] for a in self.corr.acts]
        self.resid_corr = [o[0] for o in self.corr.outs]  # (T, d) per layer
        self.m_clean = float(self.metric(clean.hidden[0, -1]))
        self.m_corr = float(self.metric(self.corr.hidden[0, -1]))
        self._suffix = None

    def metric(self, final_hidden):
        """m = logit(target) - logit(contrast) from the final norm's output at the last position."""
        return final_hidden @ self.dir + self.bias

    def patched(self, layer: int, start: int, delta):
        """Block `layer`'s output at positions start.. of the corrupted run after `delta`
        (B, S, d) is added to its MLP's raw output: (B, S, d)."""
        raw = self.corr.mlp_raw[layer]
        return self.view.add_to_mlp(layer, self.resid_corr[layer][start:][None], None if raw is None
                                    else raw[0, start:][None], delta)

    def run_from(self, layer: int, hidden):
        """Blocks layer+1.. on residual `hidden` (B, T, d) = the output of block `layer`, whole
        prompt; the final norm's output at the last position (B, d)."""
        return self.view.run_blocks(self.corr, layer, hidden)[:, -1]

    def suffix(self, start: int):
        """The corrupted prompt's keys and values before `start` (every layer) and a trace of its
        positions start.. run over them."""
        if self._suffix is None or self._suffix[0] != start:
            torch = self.torch
            with torch.inference_mode():
                cache = self.view.prefix_cache(torch.tensor([self.corr_ids[:start]]))
            tr = self.view.trace(torch.tensor([self.corr_ids[start:]]),
                                 past_key_values=self.view.expand_cache(cache, 1))
            self._suffix = (start, cache, tr)
        return self._suffix

    def run_suffix_from(self, layer: int, hidden, start: int):
        """Blocks layer+1.. on positions start.. only, (B, T - start, d), attending to the
        corrupted prompt's cached keys and values before `start` (unchanged by the patch:
        attention is causal). The final norm's output at the last position (B, d)."""
        _, cache, tr = self.suffix(start)
        expanded = self.view.expand_cache(cache, hidden.shape[0], layer + 1)
        return self.view.run_blocks(tr, layer, hidden, cache=expanded)[:, -1]

    def first_difference(self) -> int:
        """The first position where the prompts differ (positions before it have equal
        activations everywhere, so patching them changes nothing)."""
        for i, (a, b) in enumerate(zip(self.clean_ids, self.corr_ids)):
            if a != b:
                return i
        return min(len(self.clean_ids), len(self.corr_ids))


def _runner(view, clean: str, corrupted: str, target: str, contrast: str, config: PatchConfig) -> _Runner:
    view.require_activations()
    if view.tokenizer is None:
        raise QueryError("this model has no tokenizer; patching needs one")
    t, c = single_token(view, target, "--target"), single_token(view, contrast, "--contrast")
    if t == c:
        raise QueryError("--target and --contrast are the same token; name two different tokens")
    clean_ids, corr_ids = encode_prompt(view, clean, config.bos), encode_prompt(view, corrupted, config.bos)
    longest = max(len(clean_ids), len(corr_ids))
    if longest > model_context(view):
        raise QueryError(f"a prompt is {longest} tokens, longer than this model's {model_context(view)} positions; "
                         "shorten it")
    if config.positions == "all" and len(clean_ids) != len(corr_ids):
        raise QueryError(
            f"--positions all needs prompts of equal length in tokens: --clean is {len(clean_ids)}, --corrupted "
            f"{len(corr_ids)}; change the words or use --positions last")
    r = _Runner(view, clean_ids, corr_ids, t, c)
    if abs(r.m_clean - r.m_corr) < 1e-6:
        raise QueryError(
            f"the clean and corrupted prompts give the same logit difference ({r.m_clean:.4g}); "
            "there is nothing to recover: choose prompts the model tells apart")
    return r


def _check_layers(view, layers) -> list[int]:
    layers = list(range(view.n_layers)) if layers is None else list(layers)
    bad = [l for l in layers if not 0 <= l < view.n_layers]
    if bad:
        raise QueryError(f"--layers {bad[0]} is out of range: this model has layers 0-{view.n_layers - 1}")
    return sorted(set(layers))


# ------------------------------------------------------------------------- public API
def patch_neurons(view, clean: str, corrupted: str, target: str, contrast: str,
                  config: PatchConfig | None = None, *, attribution: bool = True, progress: bool = False) -> PatchResult:
    """Exact recovery of every neuron of `config.layers`, many neurons per forward pass."""
    import time

    from tqdm import tqdm

    config = config or PatchConfig()
    t0 = time.perf_counter()
    layers = _check_layers(view, config.layers)
    r = _runner(view, clean, corrupted, target, contrast, config)
    res = PatchResult(
        clean_tokens=r.clean_ids, corrupted_tokens=r.corr_ids,
        target=(single_token(view, target, "--target"), target), contrast=(single_token(view, contrast, "--contrast"), contrast),
        positions=config.positions, m_clean=r.m_clean, m_corrupted=r.m_corr)
    bar = tqdm(total=len(layers) * view.d_mlp, unit="neuron", desc="patch", disable=not progress, leave=False)
    with r.torch.inference_mode():
        res.recovery = recover_neurons(view, r, layers, config, bar)
    bar.close()
    if attribution:
        res.attribution = attribution_patching(view, r, config.positions)
    res.seconds = time.perf_counter() - t0
    return res


def patch_token_ids(view, clean_ids: list, corr_ids: list, target_id: int, contrast_id: int,
                    config: PatchConfig | None = None, bar=None) -> tuple[dict, float, float]:
    """`patch_neurons` on token ids (the token study's mined pairs): (recovery per layer, m_clean,
    m_corrupted). The prompts are used as given (no BOS is added)."""
    config = config or PatchConfig()
    r = _Runner(view, list(clean_ids), list(corr_ids), int(target_id), int(contrast_id))
    if abs(r.m_clean - r.m_corr) < 1e-6:
        return {l: np.zeros(view.d_mlp) for l in _check_layers(view, config.layers)}, r.m_clean, r.m_corr
    with r.torch.inference_mode():
        rec = recover_neurons(view, r, _check_layers(view, config.layers), config, bar)
    return rec, r.m_clean, r.m_corr


def recover_neurons(view, r: _Runner, layers: list, config: PatchConfig, bar=None) -> dict:
    """Exact recovery of every neuron of `layers` for the prompt pair of runner `r`."""
    torch = r.torch
    denom = r.m_clean - r.m_corr
    N = view.d_mlp
    recovery = {}
    for l in layers:
        # the patched positions that can change anything: the last, or (all) every position
        # from the first one where the prompts differ; earlier ones come from the KV cache
        if config.positions == "last":  # the prompts may differ in length: last with last
            start = r.T - 1
            da = (r.a_clean[l][-1:] - r.a_corr[l][-1:]).T  # (N, 1)
        else:  # equal lengths
            start = min(r.first_difference(), r.T - 1)
            da = (r.a_clean[l][start:] - r.a_corr[l][start:]).T  # (N, S)
        if r.corr.scales is not None:  # experts: each write goes through the corrupted run's routing
            da = da * r.corr.scales[l][0, start:].T
        # a neuron whose write does not change (equal activations, or an expert the corrupted
        # run did not route these positions to) changes nothing: its recovery is exactly 0
        out = np.zeros(N)
        moved = torch.nonzero((da != 0).any(1)).flatten()
        if bar is not None:
            bar.update(N - len(moved))
        for c0 in range(0, len(moved), config.batch_size):
            idx = moved[c0:c0 + config.batch_size]
            W = r.W_out[l][idx]  # (B, d)
            hidden = r.patched(l, start, da[idx, :, None] * W[:, None, :])  # (B, S, d)
            h = r.run_suffix_from(l, hidden, start) if start > 0 else r.run_from(l, hidden)
            out[idx.numpy()] = ((r.metric(h).double().numpy()) - r.m_corr) / denom
            if bar is not None:
                bar.update(len(idx))
        recovery[l] = out
    return recovery


def attribution_patching(view, r: _Runner, positions: str) -> np.ndarray:
    """(L, N): sum over patched positions of (a_clean - a_corr) * dm/da at the corrupted run,
    divided by (m_clean - m_corr). One forward and one backward pass."""
    torch = r.torch
    acts = {}

    def keep(l):
        def hook(m, a):
            acts[l] = a[0]  # not detached: the gradient must flow through every later layer too
        return hook

    def grad_from_here(m, i, o):  # the model's parameters may not require grad: start the graph here
        return o if o.requires_grad else o.detach().requires_grad_(True)

    hooks = [view.model.get_input_embeddings().register_forward_hook(grad_from_here)]
    for l in range(view.n_layers):
        hooks.append(view.act_module(l).register_forward_pre_hook(keep(l)))
    try:
        with torch.enable_grad():
            h = r.base(input_ids=torch.tensor([r.corr_ids])).last_hidden_state[0, -1]
            m = r.metric(h)
            grads = torch.autograd.grad(m, [acts[l] for l in range(view.n_layers)])
    finally:
        for hk in hooks:
            hk.remove()
    out = np.empty((view.n_layers, view.d_mlp))
    for l, g in enumerate(grads):
        g = g[0]
        if positions == "last":
            prod = (r.a_clean[l][-1] - r.a_corr[l][-1]) * g[-1]
        else:
            prod = ((r.a_clean[l] - r.a_corr[l]) * g).sum(0)  # (T, N) -> (N,): equal lengths
        out[l] = prod.double().numpy() / (r.m_clean - r.m_corr)
    return out


def patch_loop(view, clean: str, corrupted: str, target: str, contrast: str, layer: int, neurons,
               config: PatchConfig | None = None) -> np.ndarray:
    """Reference: one full forward pass per neuron, a hook overwriting its activation."""
    config = config or PatchConfig()
    r = _runner(view, clean, corrupted, target, contrast, config)
    torch = r.torch
    site = view.act_module(layer)
    clean_a = r.a_clean[layer]
    ids = torch.tensor([r.corr_ids])
    out = []
    for n in neurons:
        def hook(m, a, n=n):
            x = a[0].clone()
            if config.positions == "last":
                x[0, -1, n] = clean_a[-1, n]
            else:
                x[0, :, n] = clean_a[:, n]
            return (x,) + tuple(a[1:])

        hk = site.register_forward_pre_hook(hook)
        try:
            with torch.inference_mode():  # pre-cap logits, as the batched path
                logits = view.model.get_output_embeddings()(view.model.base_model(input_ids=ids).last_hidden_state[0, -1])
        finally:
            hk.remove()
        m = float(logits[single_token(view, target, "--target")] - logits[single_token(view, contrast, "--contrast")])
        out.append((m - r.m_corr) / (r.m_clean - r.m_corr))
    return np.array(out)


def store_result(store, view, res: PatchResult, clean: str, corrupted: str, layers) -> str:
    """Write one experiment (every neuron's recovery and attribution) in one transaction."""
    import json
    import uuid

    import pyarrow as pa

    from discover.store import insert_arrow, transaction

    eid = uuid.uuid4().hex[:12]
    L, N = view.n_layers, view.d_mlp
    rec = np.full((L, N), np.nan)
    for l, arr in res.recovery.items():
        rec[l] = arr
    att = res.attribution if res.attribution is not None else np.full((L, N), np.nan)
    tbl = pa.table({
        "experiment_id": pa.repeat(pa.scalar(eid), L * N),
        "checkpoint_id": pa.repeat(pa.scalar(view.checkpoint_id), L * N),
        "layer": np.repeat(np.arange(L, dtype=np.int16), N),
        "neuron": np.tile(np.arange(N, dtype=np.int32), L),
        "recovery": pa.array(rec.ravel(), mask=np.isnan(rec.ravel())),
        "attribution": pa.array(att.ravel(), mask=np.isnan(att.ravel())),
    })
    with transaction(store.con) as con:
        con.execute("INSERT INTO patch_experiments VALUES (?, ?, ?, ?, ?, ?, 'denoising', ?, ?, ?, ?, now(), ?)",
                    [eid, view.checkpoint_id, clean, corrupted, res.target[1], res.contrast[1], res.positions,
                     res.m_clean, res.m_corrupted, json.dumps(sorted(res.recovery)), res.seconds])
        insert_arrow(con, "patch_results", tbl)
    return eid
