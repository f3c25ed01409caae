"""What every architecture family tells the view: where its blocks, MLPs and norms are, how its
MLP weights are laid out, and what is special about its math. A family is a small subclass of
`Family` that overrides attributes (and, where a layout is unusual, one method); nothing outside
`discover/adapter/families/` knows which family a model belongs to."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from discover.errors import UnsupportedModel


@dataclass(frozen=True)
class NormParams:
    """A LayerNorm or RMSNorm as it acts: `weight` is the effective gain (Gemma's `1 + w`
    already added; ones for a norm without parameters); `bias` None for RMSNorm."""

    kind: str  # "layernorm" | "rmsnorm"
    weight: "object"  # torch.Tensor (d_model,)
    bias: "object | None"
    eps: float


def copy32(t):
    """A detached float32 copy on the CPU (never a view of the model's storage)."""
    import torch

    return t.detach().to(device="cpu", dtype=torch.float32).clone()


def submodule(root, path: str):
    """`root.get_submodule(path)`, or None where the path does not exist."""
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


class Family:
    """One architecture family. Paths are module paths (`named_modules()` names): `blocks_paths`
    from the model (the first that exists wins), the rest from a block or from its MLP."""

    name = "base"
    model_types: tuple = ()
    label = ""  # how the README and error messages name the family
    blocks_paths: tuple = ("model.layers",)
    final_norm_paths: tuple = ("model.norm",)
    mlp_path = "mlp"
    in_proj = "gate_proj"  # the pre-activation (the gate of a gated MLP)
    up_proj: str | None = "up_proj"  # gated MLPs only
    out_proj = "down_proj"  # its *input* is the neuron activation
    conv1d = False  # GPT-2's Conv1D stores weights as (in, out)
    mlp_norm_path: str | None = "post_attention_layernorm"  # None: the MLP reads the raw residual
    post_mlp_norm_path: str | None = None  # a norm on the MLP's output before the residual add
    norm_kind = "rmsnorm"
    gain_offset = 0.0  # Gemma's RMSNorm multiplies by (1 + w)
    act_key = "hidden_act"
    parallel = False  # attention and MLP read the same norm of the same residual (GPT-J, Phi-2)

    def __init__(self, model_type: str):
        self.model_type = model_type

    # -- configuration ---------------------------------------------------------------------
    def check_config(self, cfg: dict, where: str) -> None:
        """Raise UnsupportedModel (with the reason) for variants of the family we refuse."""

    def text_config(self, config):
        """The config that describes the language model (a multimodal wrapper's text_config)."""
        return config

    def act_name(self, config) -> str:
        return getattr(self.text_config(config), self.act_key)

    def activation_fn(self, config) -> Callable:
        """The MLP nonlinearity (for gated MLPs, applied to the gate before `* up`)."""
        from transformers.activations import ACT2FN

        return ACT2FN[self.act_name(config)]

    def logit_softcap(self, config) -> float | None:
        """Gemma 2's final tanh soft-cap (None: logits are the head's output as is)."""
        return None

    # -- modules ---------------------------------------------------------------------------
    def blocks_path(self, model) -> str:
        for p in self.blocks_paths:
            if submodule(model, p) is not None:
                return p
        raise UnsupportedModel(f"no transformer blocks at {' or '.join(self.blocks_paths)} in this "
                               f"{self.model_type} model; it is not laid out as transformers' {self.label} is")

    def final_norm_path(self, model) -> str:
        for p in self.final_norm_paths:
            if submodule(model, p) is not None:
                return p
        raise UnsupportedModel(f"no final norm at {' or '.join(self.final_norm_paths)} in this {self.model_type} model")

    def mlp(self, block):
        return block.get_submodule(self.mlp_path)

    attn_paths: tuple = ("self_attn", "attn", "attention", "self_attention")

    def attention(self, block):
        """The block's attention module: the first of `attn_paths` the block has."""
        for p in self.attn_paths:
            try:
                return block.get_submodule(p)
            except AttributeError:
                continue
        raise UnsupportedModel(f"no attention module at {' or '.join(self.attn_paths)} in a {self.model_type} block")

    def layout(self, model):
        """How each layer's neuron axis is laid out (`names.Layout`): dense unless the family has
        experts."""
        from discover.names import DENSE

        return DENSE

    def require_statistics(self) -> None:
        """Raise UnsupportedModel where the corpus pass's statistics are not defined."""

    def require_correlations(self) -> None:
        """Raise UnsupportedModel where neuron-to-neuron correlations over common tokens (universality)
        are not defined (experts)."""

    def site_module(self, model, block, path: str):
        """What hooks on the module at `path` (inside `block`) are registered on: the module
        itself, unless the family's blocks run it on flattened rows (see OPT)."""
        return model.get_submodule(path)

    def mlp_norm(self, block):
        """The norm module the MLP reads (None: it reads the residual stream as is)."""
        return None if self.mlp_norm_path is None else block.get_submodule(self.mlp_norm_path)

    def post_mlp_norm(self, block):
        return None if self.post_mlp_norm_path is None else block.get_submodule(self.post_mlp_norm_path)

    # -- weights, raw, (neuron, d_model) ---------------------------------------------------
    def _linear(self, mlp, name):
        return mlp.get_submodule(name)

    def w_in(self, mlp):
        w = self._linear(mlp, self.in_proj).weight
        return w.T if self.conv1d else w

    def w_up(self, mlp):
        return None if self.up_proj is None else self._linear(mlp, self.up_proj).weight

    def w_out(self, mlp):
        w = self._linear(mlp, self.out_proj).weight
        return w if self.conv1d else w.T  # nn.Linear stores (out=d_model, in=neuron)

    def b_in(self, mlp):
        return getattr(self._linear(mlp, self.in_proj), "bias", None)

    def b_up(self, mlp):
        return None if self.up_proj is None else getattr(self._linear(mlp, self.up_proj), "bias", None)

    def b_out(self, mlp):
        return getattr(self._linear(mlp, self.out_proj), "bias", None)

    @property
    def gated(self) -> bool:
        return self.up_proj is not None

    def norm(self, module, d_model: int) -> NormParams:
        """The norm as it acts on the residual stream (a missing gain is a gain of ones)."""
        import torch

        w = getattr(module, "weight", None)
        gain = torch.ones(d_model) if w is None else copy32(w) + self.gain_offset
        b = getattr(module, "bias", None)
        eps = getattr(module, "eps", None) or getattr(module, "variance_epsilon", None) or 1e-5
        return NormParams(self.norm_kind, gain, None if b is None else copy32(b), float(eps))

    # -- running blocks on a batch ---------------------------------------------------------
    def expand_block_kwargs(self, kwargs: dict, batch: int) -> dict:
        """Block keyword arguments recorded on a batch of 1, made fit for `batch` rows (masks and
        rotary tables broadcast; families with per-row tensors such as ALiBi override this)."""
        return kwargs
