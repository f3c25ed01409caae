"""The same view of every supported causal LM.

Downstream code sees, per layer, `W_in` / `W_out` as (neuron, d_model), the biases, the MLP's
activation function, its pre-MLP norm and any norm on its output; and the final norm and `W_U`
(d_model, vocab). Which module holds what is the family's business (`families/`), nowhere
else. Every accessor returns a float32 *copy*: the loaded model's parameters are never modified.

Weight processing follows TransformerLens (`fold_ln`, `center_writing_weights`,
`center_unembed`); see `processed_unembed`, `processed_W_out`, `processed_W_in`.

`trace` records one forward pass (activations, block outputs, the MLP's raw output where a norm
follows it, and the arguments each block was called with); `run_blocks` reruns the blocks after
a layer on a batch of edited residual streams with those same arguments, so masks, rotary
tables, sliding windows and ALiBi are whatever the model itself built.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from discover.adapter.checks import missing_weights
from discover.adapter.families import NormParams, family_for
from discover.adapter.families.base import copy32
from discover.adapter.locate import identify, tensor_hash
from discover.errors import ModelLoadError, first_line


@dataclass
class Trace:
    """One recorded forward pass: per layer the activations (B, T, N), the block outputs
    (B, T, d), the MLP's raw output (B, T, d; only where a norm follows the MLP) and each block's
    call arguments; `hidden` is the final norm's output (B, T, d)."""

    acts: list
    outs: list
    mlp_raw: list
    calls: list  # (args after the hidden state, kwargs) per block
    hidden: "object"
    batch: int = 1
    scales: list | None = None  # experts: per layer what each activation is multiplied by (B, T, N)


def _is_cache(x) -> bool:
    from transformers.cache_utils import Cache

    return isinstance(x, Cache)


class ModelView:
    """The same view of every supported causal LM. Build with `load_model` or `from_model`."""

    def __init__(self, model, tokenizer, *, spec: str, checkpoint_id: str, model_dir: Path | None = None,
                 source: dict | None = None):
        self.arch = family_for(model.config)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.spec = spec
        self.checkpoint_id = checkpoint_id
        self.model_dir = model_dir
        self.source = source or {"format": "transformers", "quantization": None}
        self.architecture = self.arch.model_type
        self.family = self.arch.name
        self._blocks_path = self.arch.blocks_path(model)
        self._blocks = model.get_submodule(self._blocks_path)
        self._final_norm_path = self.arch.final_norm_path(model)
        tc = self.arch.text_config(model.config)
        self.d_model = tc.hidden_size
        self.d_mlp = int(self.W_out(0).shape[0])
        self.act_name = self.arch.act_name(model.config)
        self.n_layers = len(self._blocks)
        head_rows = model.get_output_embeddings().weight.shape[0]
        # a padded vocabulary (rows past the tokenizer) is not part of any statistic
        n_tok = len(tokenizer) if tokenizer is not None else head_rows
        self.d_vocab = min(head_rows, n_tok) if n_tok > 0 else head_rows
        self.gated = self.arch.gated
        self.layout = self.arch.layout(model)  # names.Layout: dense, or experts end to end
        self._token_strings: list[str] | None = None

    # -- modules ---------------------------------------------------------------------------
    @property
    def blocks(self):
        """The transformer blocks (a ModuleList), in order."""
        return self._blocks

    def _mlp(self, layer: int):
        return self.arch.mlp(self._blocks[layer])

    @property
    def text_config(self):
        """The language model's config (a multimodal wrapper's `text_config`, else the config)."""
        return self.arch.text_config(self.model.config)

    @property
    def positions_depend_on_length(self) -> bool:
        """Whether a position's rotary table depends on the sequence's length (dynamic NTK or
        LongRoPE scaling): then a sequence cut short is not the same computation on its prefix."""
        cfg = self.text_config
        rope = getattr(cfg, "rope_scaling", None) or getattr(cfg, "rope_parameters", None) or {}
        kind = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else None
        return kind in ("dynamic", "longrope")

    def raw_w_out(self, layer: int):
        """The MLP's own W_out parameter viewed as (neuron, d_model), not a copy: writing into it
        changes the model (tests plant neurons this way; analysis never does)."""
        return self.arch.w_out(self._mlp(layer))

    def _path(self, layer: int, *parts: str) -> str:
        """A module path under block `layer`; empty parts (OPT's MLP is the block itself) skipped."""
        return ".".join([self._blocks_path, str(layer), *[p for p in parts if p]])

    def act_site(self, layer: int) -> str:
        """Module path whose *input* is the neuron activation (after the nonlinearity)."""
        return self._path(layer, self.arch.mlp_path, self.arch.out_proj)

    def mlp_site(self, layer: int) -> str:
        """Module path of the MLP (where the MLP is a submodule of the block)."""
        return self._path(layer, self.arch.mlp_path)

    def mlp_input_site(self, layer: int) -> str:
        """Module path whose input is what the neurons read: the MLP's in-projection."""
        return self._path(layer, self.arch.mlp_path, self.arch.in_proj)

    def act_module(self, layer: int):
        """What to register activation hooks on: the module at `act_site`, or the family's
        stand-in where hooks must see (batch, pos, neuron) and the module does not (OPT)."""
        return self.arch.site_module(self.model, self._blocks[layer], self.act_site(layer))

    def attention_module(self, layer: int):
        """The block's attention module (its output is what attention adds to the residual)."""
        return self.arch.attention(self._blocks[layer])

    def require_activations(self) -> None:
        """Raise (one line) unless the neuron activations can be hooked: every stage that reads or
        patches them calls this before it touches the store."""
        self.act_module(0)

    def require_statistics(self, correlations: bool = False) -> None:
        """Raise (one line) unless the corpus pass's statistics (and, with `correlations`, the
        correlations universality needs) are defined for this model: the corpus pass,
        verification and universality call this before they touch the store."""
        self.require_activations()
        self.arch.require_statistics()
        if correlations:
            self.arch.require_correlations()

    def mlp_input_module(self, layer: int):
        """What to register hooks on to see the MLP's input as (batch, pos, d_model)."""
        return self.arch.site_module(self.model, self._blocks[layer], self.mlp_input_site(layer))

    def post_mlp_norm_site(self, layer: int) -> str | None:
        """Module path of the norm on this layer's MLP output (None: there is none)."""
        p = self.arch.post_mlp_norm_path
        return None if p is None or self.arch.post_mlp_norm(self._blocks[layer]) is None \
            else self._path(layer, p)

    def final_norm_site(self) -> str:
        """Module path of the final norm (its input is the residual stream at the end)."""
        return self._final_norm_path

    # -- per-layer raw weights, (neuron, d_model), float32 copies -------------------------
    def W_in(self, layer: int):
        """What each neuron reads (the gate row for gated MLPs), (neuron, d_model)."""
        return copy32(self.arch.w_in(self._mlp(layer)))

    def W_up(self, layer: int):
        """The up row of gated MLPs (None for plain MLPs), (neuron, d_model)."""
        w = self.arch.w_up(self._mlp(layer))
        return None if w is None else copy32(w)

    def W_out(self, layer: int):
        """What each neuron writes per unit activation, before any norm on the MLP's output."""
        return copy32(self.arch.w_out(self._mlp(layer)))

    def b_in(self, layer: int):
        """The pre-activation's bias (the gate's, for gated MLPs), (neuron,); None without one."""
        b = self.arch.b_in(self._mlp(layer))
        return None if b is None else copy32(b)

    def b_up(self, layer: int):
        """The up projection's bias of gated MLPs, (neuron,); None without one."""
        b = self.arch.b_up(self._mlp(layer))
        return None if b is None else copy32(b)

    def b_out(self, layer: int):
        """The MLP output's bias, (d_model,); None without one."""
        b = self.arch.b_out(self._mlp(layer))
        return None if b is None else copy32(b)

    def activation_fn(self) -> Callable:
        """The MLP nonlinearity (for gated MLPs, applied to the gate before `* up`)."""
        return self.arch.activation_fn(self.model.config)

    def mlp_norm(self, layer: int) -> NormParams | None:
        """The norm applied to the residual stream before this layer's MLP (None: none)."""
        mod = self.arch.mlp_norm(self._blocks[layer])
        return None if mod is None else self.arch.norm(mod, self.d_model)

    def post_mlp_norm(self, layer: int) -> NormParams | None:
        """The norm on this layer's MLP output before it joins the residual stream (None: none)."""
        mod = self.arch.post_mlp_norm(self._blocks[layer])
        return None if mod is None else self.arch.norm(mod, self.d_model)

    def final_norm(self) -> NormParams:
        """The norm before the unembedding, as it acts (effective gain, bias, eps)."""
        return self.arch.norm(self.model.get_submodule(self._final_norm_path), self.d_model)

    def W_U(self):
        """The unembedding over the real vocabulary, (d_model, d_vocab). Tied models: `W_E.T`."""
        return copy32(self.model.get_output_embeddings().weight[: self.d_vocab].T)

    def logit_softcap(self) -> float | None:
        """The final logit soft-cap (Gemma 2), or None."""
        return self.arch.logit_softcap(self.model.config)

    def logits(self, hidden):
        """The model's logits from the final norm's output (soft-capped where the model caps)."""
        import torch

        out = self.model.get_output_embeddings()(hidden)
        cap = self.logit_softcap()
        return out if not cap else torch.tanh(out / cap) * cap

    # -- processed weights (TransformerLens conventions) -----------------------------------
    def processed_unembed(self):
        """U = diag(gamma_f) @ W_U, columns centred over d_model (LayerNorm), rows centred over vocab."""
        fn = self.final_norm()
        U = fn.weight[:, None] * self.W_U()
        if fn.kind == "layernorm":
            U -= U.mean(0, keepdim=True)  # LayerNorm output has zero mean over d_model
        U -= U.mean(1, keepdim=True)  # a constant shift of all logits changes no probability
        return U

    def processed_W_out(self, layer: int):
        """W_out with a post-MLP norm's gain folded in (`g_post * w_out`, the weight-only
        direction: the norm's 1/rms is per token and shared by the layer's neurons), centred over
        d_model for LayerNorm models (the next LayerNorm removes that mean)."""
        W = self.W_out(layer)
        post = self.post_mlp_norm(layer)
        if post is not None:
            W = W * post.weight[None, :]
        if self.final_norm().kind == "layernorm":
            W -= W.mean(1, keepdim=True)
        return W

    def processed_W_in(self, layer: int, which: str = "in"):
        """W_in (or W_up) with the pre-MLP norm's gain folded in, centred over d_model for LayerNorm."""
        W = self.W_in(layer) if which == "in" else self.W_up(layer)
        norm = self.mlp_norm(layer)
        if norm is None:
            return W
        W = W * norm.weight[None, :]
        if norm.kind == "layernorm":
            W -= W.mean(1, keepdim=True)
        return W

    # -- recorded forward passes and reruns ------------------------------------------------
    def trace(self, input_ids, *, past_key_values=None, layers=None) -> Trace:
        """One forward pass of the base model on `input_ids` (B, T), recording what `run_blocks`
        and the patching code need. With `past_key_values` the positions attend to them too.
        `layers`: record activations, block outputs and MLP outputs of these layers only (the
        others stay None; memory: B x T x (N + 2 d) floats per layer kept)."""
        import torch

        L = self.n_layers
        acts, outs, raw, calls = [None] * L, [None] * L, [None] * L, [None] * L
        scales = [None] * L if self.layout.moe else None
        post = [self.arch.post_mlp_norm(self._blocks[l]) is not None for l in range(L)]
        keep = set(range(L) if layers is None else layers)
        hooks = []
        try:
            for l in range(L):
                hooks.append(self._blocks[l].register_forward_pre_hook(
                    lambda m, a, k, l=l: calls.__setitem__(l, (tuple(a[1:]), dict(k))), with_kwargs=True))
                if l not in keep:
                    continue
                site = self.act_module(l)
                hooks.append(site.register_forward_pre_hook(lambda m, a, l=l: acts.__setitem__(l, a[0].detach())))
                if post[l]:
                    hooks.append(site.register_forward_hook(lambda m, a, o, l=l: raw.__setitem__(l, o.detach())))
                if scales is not None:  # an expert site's forward hook sees the routing's write scale
                    hooks.append(site.register_forward_hook(lambda m, a, s, l=l: scales.__setitem__(l, s.detach())))
                hooks.append(self._blocks[l].register_forward_hook(
                    lambda m, a, o, l=l: outs.__setitem__(l, (o[0] if isinstance(o, tuple) else o).detach())))
            with torch.inference_mode():
                h = self.run_base(input_ids, cache=past_key_values).last_hidden_state
        finally:
            for hk in hooks:
                hk.remove()
        return Trace(acts, outs, raw, calls, h, batch=int(input_ids.shape[0]), scales=scales)

    def run_base(self, input_ids, *, cache=None, use_cache: bool | None = None):
        """The base model (no head) on `input_ids`, over a KV `cache` of earlier positions if given."""
        import inspect

        kw = {"use_cache": cache is not None if use_cache is None else use_cache}
        if cache is not None:  # transformers renames past_key_values to cache, family by family
            params = inspect.signature(self.model.base_model.forward).parameters
            kw["cache" if "cache" in params else "past_key_values"] = cache
        return self.model.base_model(input_ids=input_ids, **kw)

    def prefix_cache(self, input_ids):
        """The keys and values of every layer after a forward pass over `input_ids` (1, T)."""
        out = self.run_base(input_ids, use_cache=True)
        cache = out.get("cache")  # transformers' newer name; older families return past_key_values
        return cache if cache is not None else out.past_key_values

    def add_to_mlp(self, layer: int, block_out, mlp_raw, delta):
        """The block's output after `delta` (…, d_model) is added to its MLP's raw output: plain
        `block_out + delta`, or through the post-MLP norm where there is one (exact, not linear)."""
        post = self.arch.post_mlp_norm(self._blocks[layer])
        if post is None:
            return block_out + delta
        return block_out + (post(mlp_raw + delta) - post(mlp_raw))

    def run_blocks(self, trace: Trace, layer: int, hidden, *, cache=None):
        """Blocks layer+1.. on `hidden` (B, S, d), the residual stream after block `layer` at the
        positions `trace` ran on, called with the arguments recorded in `trace` (`cache`, keys and
        values of earlier positions expanded to B rows, replaces the recorded cache); then the
        final norm: (B, S, d)."""
        B = hidden.shape[0]
        hidden = hidden.contiguous()  # blocks may .view() it (Mixtral's MoE block does)
        for j in range(layer + 1, self.n_layers):
            args, kwargs = trace.calls[j]
            args = tuple(cache if _is_cache(a) else a for a in args)
            kwargs = {k: (cache if _is_cache(v) else v) for k, v in kwargs.items()}
            if B != trace.batch:
                kwargs = self.arch.expand_block_kwargs(kwargs, B)
            out = self._blocks[j](hidden, *args, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        return self.model.get_submodule(self._final_norm_path)(hidden)

    @staticmethod
    def expand_cache(cache, batch: int, from_layer: int = 0):
        """A copy of a prefix KV cache whose layers from `from_layer` on have `batch` rows (views:
        appending to the copy leaves `cache` as it was)."""
        out = copy.copy(cache)
        out.layers = [copy.copy(c) for c in cache.layers]
        for c in out.layers[from_layer:]:
            if getattr(c, "keys", None) is not None:
                c.keys = c.keys.expand(batch, *c.keys.shape[1:])
                c.values = c.values.expand(batch, *c.values.shape[1:])
        return out

    # -- tokens ---------------------------------------------------------------------------
    def token_strings(self) -> list[str]:
        """The decoded string of every vocabulary id; ids past the tokenizer are `<unused:ID>`."""
        if self._token_strings is None:
            from discover.tokens import decode_each

            n_tok = min(len(self.tokenizer), self.d_vocab) if self.tokenizer is not None else 0
            out = decode_each(self.tokenizer, n_tok) if n_tok else []
            self._token_strings = out + [f"<unused:{i}>" for i in range(n_tok, self.d_vocab)]
        return self._token_strings

    def describe(self) -> dict:
        """What the model is: architecture, family, shapes, norm, source format and quantization."""
        fn = self.final_norm()
        return {
            "architecture": self.architecture,
            "family": self.family,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "d_mlp": self.d_mlp,
            "d_vocab": self.d_vocab,
            "act_fn": self.act_name,
            "gated": self.gated,
            "norm": fn.kind,
            "source_format": self.source["format"],
            "quantization": self.source["quantization"],
            "neuron_layout": self.layout.to_dict() if self.layout.moe else None,
        }


def _quiet_hf():
    """A context manager that silences transformers' logging and progress bars."""
    import contextlib
    import warnings

    from transformers.utils import logging as hf_logging

    @contextlib.contextmanager
    def quiet():
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                yield
        finally:
            hf_logging.set_verbosity(verbosity)
            hf_logging.enable_progress_bar()

    return quiet()


def load_model(spec: str, *, allow_pickle: bool = False, device: str = "cpu", identity=None) -> ModelView:
    """Load a causal LM from a hub id, a local directory (safetensors by default) or a `.gguf`
    file (dequantized to float32, tokenizer from the same file).

    `identity`: the (spec, checkpoint id, location) that `identify` already computed, so the
    weights are not hashed twice."""
    norm_spec, ckpt, where = identity or identify(spec, allow_pickle=allow_pickle)
    if where.is_file():  # a GGUF file (`identify` accepts no other file)
        from discover.adapter import gguf

        with _quiet_hf():
            model, tokenizer, source = gguf.load(where)
        model.to(device)
        return ModelView(model, tokenizer, spec=norm_spec, checkpoint_id=ckpt, model_dir=where, source=source)
    return _load_from_dir(where, spec=norm_spec, checkpoint_id=ckpt, device=device)


def _load_from_dir(model_dir: Path, *, spec: str, checkpoint_id: str, device: str) -> ModelView:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    use_st = any(model_dir.glob("*.safetensors"))
    try:
        with _quiet_hf():
            model, info = AutoModelForCausalLM.from_pretrained(
                str(model_dir), use_safetensors=use_st, weights_only=True, dtype="float32", output_loading_info=True)
    except Exception as e:
        raise ModelLoadError(f"could not load the model in {model_dir} ({first_line(e)})") from None
    missing = missing_weights(model, info)
    if missing:  # transformers would initialise them at random and say so only in a warning
        raise ModelLoadError(f"the weights in {model_dir} lack {len(missing)} of the model's tensors (e.g. "
                             f"{missing[0]}); the checkpoint is incomplete: re-save or re-download it")
    model.to(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:
        raise ModelLoadError(
            f"the model in {model_dir} loads but its tokenizer does not ({first_line(e, 200)}); "
            "save the tokenizer files beside the weights"
        ) from None
    return ModelView(model, tokenizer, spec=spec, checkpoint_id=checkpoint_id, model_dir=model_dir)


def from_model(model, tokenizer, *, spec: str = "<in-memory>") -> ModelView:
    """Wrap an already-loaded model (identity = hash of its tensors)."""
    return ModelView(model, tokenizer, spec=spec, checkpoint_id=tensor_hash(model))
