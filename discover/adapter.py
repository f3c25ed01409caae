"""One model adapter: every supported architecture seen the same way.

Downstream code sees, per layer, `W_in` / `W_out` as (neuron, d_model), the biases, the MLP's
activation function and its pre-MLP norm; and the final norm and `W_U` (d_model, vocab). GPT-2's
transposed `Conv1D`, GPT-NeoX's untied `embed_out` and Llama's gate/up/down live here and nowhere
else. Every accessor returns a float32 *copy*: the loaded model's parameters are never modified.

Weight processing follows TransformerLens (`fold_ln`, `center_writing_weights`,
`center_unembed`); see `processed_unembed`, `processed_W_out`, `processed_W_in`.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from discover.errors import ModelLoadError, UnsupportedModel, first_line

#: config.model_type -> family. Llama-style gated MLPs share one code path.
SUPPORTED = {
    "gpt2": "gpt2",
    "gpt_neox": "gpt_neox",
    "llama": "gated",
    "mistral": "gated",
    "qwen2": "gated",
}
SUPPORTED_TEXT = "GPT-2 (gpt2), GPT-NeoX/Pythia (gpt_neox), Llama, Mistral, Qwen2"

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
#: config keys that say where or with what a model was saved, not what it is
_VOLATILE_CONFIG = ("_name_or_path", "transformers_version")
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)


@dataclass(frozen=True)
class NormParams:
    """A LayerNorm or RMSNorm: `kind` is "layernorm" or "rmsnorm"; `bias` None for RMSNorm."""

    kind: str
    weight: "object"  # torch.Tensor (d_model,)
    bias: "object | None"
    eps: float


def _torch():
    import torch

    return torch


def _copy(t) -> "object":
    """A detached float32 copy on the CPU (never a view of the model's storage)."""
    torch = _torch()
    return t.detach().to(device="cpu", dtype=torch.float32).clone()


# ----------------------------------------------------------------------------- locate
def _looks_like_path(spec: str) -> bool:
    """True unless `spec` has the shape of a hub id ("name" or "org/name")."""
    if spec.startswith((".", "/", "~")) or spec.endswith("/"):
        return True
    return not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9][A-Za-z0-9_.\-]*)?", spec)


def normalise_spec(spec: str) -> str:
    """The key a model is stored under: an absolute path for local directories, else the hub id."""
    p = Path(spec).expanduser()
    if p.exists():
        return str(p.resolve())
    return spec


def resolve_model_dir(spec: str, *, allow_pickle: bool = False) -> Path:
    """The local directory holding `spec`'s config and weights (downloading a hub id if needed)."""
    p = Path(spec).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ModelLoadError(
                f"{spec} is a file, not a model directory; pass the directory that holds config.json"
            )
        if not (p / "config.json").is_file():
            raise ModelLoadError(
                f"{spec} is not a model directory (no config.json); pass a Hugging Face model "
                "directory or hub id"
            )
        return p.resolve()
    if _looks_like_path(spec):
        raise ModelLoadError(f"model path {spec} does not exist; check the path")
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "*.txt", "*.model"]
        if allow_pickle:
            patterns.append("*.bin")
        return Path(snapshot_download(spec, allow_patterns=patterns))
    except Exception as e:  # network, unknown repo, auth...
        raise ModelLoadError(
            f"could not load '{spec}': not a local path, and fetching it from the Hugging Face hub "
            f"failed ({first_line(e, 200)}); check the path or hub id, or download it first"
        ) from None


def weight_files(model_dir: Path, *, allow_pickle: bool) -> list[Path]:
    """The weight files `from_pretrained` will read; refuses pickle unless `allow_pickle`."""
    st = sorted(model_dir.glob("*.safetensors"))
    if st:
        for f in st:
            check_safetensors(f)
        return st
    pickled = sorted(f for f in model_dir.iterdir() if f.suffix in _WEIGHT_SUFFIXES)
    if not pickled:
        raise ModelLoadError(
            f"{model_dir} has a config.json but no weights (*.safetensors); pass a complete model directory"
        )
    if not allow_pickle:
        raise ModelLoadError(
            f"{model_dir} has only pickle weights ({pickled[0].name}); pickle files can run code when "
            "loaded: convert them to safetensors, or pass --allow-pickle to load them with weights_only=True"
        )
    return pickled


def check_safetensors(path: Path) -> None:
    """Fail with one clear line if a safetensors file is truncated or not safetensors at all."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100_000_000):
                raise ValueError("header length is past the end of the file")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end > size:
            raise ValueError(f"truncated: {size} bytes on disk, {8 + n + end} expected")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ModelLoadError(
            f"weights file {path} is corrupt ({e}); re-download or re-save the checkpoint"
        ) from None


def content_hash(model_dir: Path, files: list[Path]) -> str:
    """sha256 over the weight files' bytes and the canonical config: a checkpoint's identity."""
    h = hashlib.sha256()
    cfg = json.loads((model_dir / "config.json").read_text())
    for volatile in _VOLATILE_CONFIG:
        cfg.pop(volatile, None)
    h.update(json.dumps(cfg, sort_keys=True).encode())
    for f in files:
        fh = hashlib.sha256()
        with open(f, "rb") as fp:
            for block in iter(lambda: fp.read(1 << 24), b""):
                fh.update(block)
        h.update(f.name.encode() + b"\0" + fh.digest())
    return h.hexdigest()


def tensor_hash(model) -> str:
    """sha256 over an in-memory model's state dict and config (models not loaded from disk)."""
    h = hashlib.sha256()
    cfg = model.config.to_dict()
    for volatile in _VOLATILE_CONFIG:
        cfg.pop(volatile, None)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(dtype=_torch().uint8).numpy().tobytes())
    return h.hexdigest()


def check_architecture(model_dir: Path) -> str:
    """The model_type of `model_dir`'s config, or UnsupportedModel naming what is supported."""
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{model_dir}/config.json is not valid JSON ({e}); fix or re-download it") from None
    mt = cfg.get("model_type")
    if mt not in SUPPORTED:
        raise UnsupportedModel(
            f"unsupported architecture '{mt}' in {model_dir}; supported: {SUPPORTED_TEXT}"
        )
    return mt


# ------------------------------------------------------------------------------ view
class ModelView:
    """The same view of every supported causal LM. Build with `load_model` or `from_model`."""

    def __init__(self, model, tokenizer, *, spec: str, checkpoint_id: str, model_dir: Path | None = None):
        mt = getattr(model.config, "model_type", None)
        if mt not in SUPPORTED:
            raise UnsupportedModel(f"unsupported architecture '{mt}'; supported: {SUPPORTED_TEXT}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.spec = spec
        self.checkpoint_id = checkpoint_id
        self.model_dir = model_dir
        self.architecture = mt
        self.family = SUPPORTED[mt]
        cfg = model.config
        if self.family == "gpt2":
            self._blocks = model.transformer.h
            self.d_model = cfg.n_embd
            self.d_mlp = self._blocks[0].mlp.c_fc.weight.shape[1]
            self.act_name = cfg.activation_function
        elif self.family == "gpt_neox":
            self._blocks = model.gpt_neox.layers
            self.d_model = cfg.hidden_size
            self.d_mlp = cfg.intermediate_size
            self.act_name = cfg.hidden_act
        else:
            self._blocks = model.model.layers
            self.d_model = cfg.hidden_size
            self.d_mlp = cfg.intermediate_size
            self.act_name = cfg.hidden_act
        self.n_layers = len(self._blocks)
        self.d_vocab = model.get_output_embeddings().weight.shape[0]
        self.gated = self.family == "gated"
        self._token_strings: list[str] | None = None

    # -- per-layer raw weights, (neuron, d_model), float32 copies -------------------------
    def W_in(self, layer: int):
        """What each neuron reads (gate row for gated MLPs), (neuron, d_model)."""
        mlp = self._blocks[layer].mlp
        if self.family == "gpt2":
            return _copy(mlp.c_fc.weight.T)  # Conv1D stores (in, out): transpose
        if self.family == "gpt_neox":
            return _copy(mlp.dense_h_to_4h.weight)
        return _copy(mlp.gate_proj.weight)

    def W_up(self, layer: int):
        """The up row of gated MLPs (None for plain MLPs), (neuron, d_model)."""
        return _copy(self._blocks[layer].mlp.up_proj.weight) if self.gated else None

    def W_out(self, layer: int):
        """What each neuron writes per unit activation, (neuron, d_model)."""
        mlp = self._blocks[layer].mlp
        if self.family == "gpt2":
            return _copy(mlp.c_proj.weight)  # Conv1D (in=neuron, out=d_model) is already (neuron, d_model)
        if self.family == "gpt_neox":
            return _copy(mlp.dense_4h_to_h.weight.T)
        return _copy(mlp.down_proj.weight.T)

    def b_in(self, layer: int):
        mlp = self._blocks[layer].mlp
        mod = {"gpt2": lambda: mlp.c_fc, "gpt_neox": lambda: mlp.dense_h_to_4h, "gated": lambda: mlp.gate_proj}[
            self.family
        ]()
        return None if getattr(mod, "bias", None) is None else _copy(mod.bias)

    def b_out(self, layer: int):
        mlp = self._blocks[layer].mlp
        mod = {"gpt2": lambda: mlp.c_proj, "gpt_neox": lambda: mlp.dense_4h_to_h, "gated": lambda: mlp.down_proj}[
            self.family
        ]()
        return None if getattr(mod, "bias", None) is None else _copy(mod.bias)

    def activation_fn(self) -> Callable:
        """The MLP nonlinearity (for gated MLPs, applied to the gate before `* up`)."""
        from transformers.activations import ACT2FN

        return ACT2FN[self.act_name]

    def mlp_norm(self, layer: int) -> NormParams:
        """The norm applied to the residual stream before this layer's MLP."""
        blk = self._blocks[layer]
        mod = {"gpt2": "ln_2", "gpt_neox": "post_attention_layernorm", "gated": "post_attention_layernorm"}[self.family]
        return self._norm(getattr(blk, mod))

    def final_norm(self) -> NormParams:
        m = self.model
        mod = {"gpt2": lambda: m.transformer.ln_f, "gpt_neox": lambda: m.gpt_neox.final_layer_norm,
               "gated": lambda: m.model.norm}[self.family]()
        return self._norm(mod)

    def _norm(self, mod) -> NormParams:
        bias = getattr(mod, "bias", None)
        eps = getattr(mod, "eps", None) or getattr(mod, "variance_epsilon", None) or 1e-5
        kind = "layernorm" if self.family in ("gpt2", "gpt_neox") else "rmsnorm"
        return NormParams(kind, _copy(mod.weight), None if bias is None else _copy(bias), float(eps))

    def W_U(self):
        """The unembedding, (d_model, vocab). For tied models this is `W_E.T`."""
        return _copy(self.model.get_output_embeddings().weight.T)

    def act_site(self, layer: int) -> str:
        """Module path whose *input* is the neuron activation (after the nonlinearity)."""
        return {"gpt2": f"transformer.h.{layer}.mlp.c_proj", "gpt_neox": f"gpt_neox.layers.{layer}.mlp.dense_4h_to_h",
                "gated": f"model.layers.{layer}.mlp.down_proj"}[self.family]

    @property
    def blocks(self):
        """The transformer blocks (a ModuleList), in order."""
        return self._blocks

    def final_norm_site(self) -> str:
        """Module path of the final norm (its input is the residual stream at the end)."""
        return {"gpt2": "transformer.ln_f", "gpt_neox": "gpt_neox.final_layer_norm", "gated": "model.norm"}[self.family]

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
        """W_out centred over d_model for LayerNorm models (the next LayerNorm removes that mean)."""
        W = self.W_out(layer)
        if self.final_norm().kind == "layernorm":
            W -= W.mean(1, keepdim=True)
        return W

    def processed_W_in(self, layer: int, which: str = "in"):
        """W_in (or W_up) with the pre-MLP norm's gain folded in, centred over d_model for LayerNorm."""
        W = self.W_in(layer) if which == "in" else self.W_up(layer)
        norm = self.mlp_norm(layer)
        W = W * norm.weight[None, :]
        if norm.kind == "layernorm":
            W -= W.mean(1, keepdim=True)
        return W

    # -- tokens ---------------------------------------------------------------------------
    def token_strings(self) -> list[str]:
        """The decoded string of every vocabulary id; ids past the tokenizer are `<unused:ID>`."""
        if self._token_strings is None:
            n_tok = len(self.tokenizer) if self.tokenizer is not None else 0
            out = []
            for i in range(self.d_vocab):
                if i < n_tok:
                    out.append(self.tokenizer.decode([i], clean_up_tokenization_spaces=False))
                else:
                    out.append(f"<unused:{i}>")
            self._token_strings = out
        return self._token_strings

    def describe(self) -> dict:
        fn = self.final_norm()
        return {
            "architecture": self.architecture,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "d_mlp": self.d_mlp,
            "d_vocab": self.d_vocab,
            "act_fn": self.act_name,
            "gated": self.gated,
            "norm": fn.kind,
        }


def load_model(spec: str, *, allow_pickle: bool = False, device: str = "cpu", identity=None) -> ModelView:
    """Load a Hugging Face causal LM from a hub id or a local directory (safetensors by default).

    `identity`: the (spec, checkpoint id, dir) that `identify` already computed, so the weights
    are not hashed twice."""
    norm_spec, ckpt, model_dir = identity or identify(spec, allow_pickle=allow_pickle)
    return _load_from_dir(model_dir, spec=norm_spec, checkpoint_id=ckpt, allow_pickle=allow_pickle, device=device)


def _load_from_dir(model_dir: Path, *, spec: str, checkpoint_id: str, allow_pickle: bool, device: str) -> ModelView:
    import warnings

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    use_st = any(model_dir.glob("*.safetensors"))
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_pretrained(
                str(model_dir), use_safetensors=use_st, weights_only=True
            )
    except Exception as e:
        raise ModelLoadError(f"could not load the model in {model_dir} ({first_line(e)})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
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


def identify(spec: str, *, allow_pickle: bool = False) -> tuple[str, str, Path]:
    """(normalised spec, checkpoint id, model dir) without loading the weights."""
    model_dir = resolve_model_dir(spec, allow_pickle=allow_pickle)
    check_architecture(model_dir)
    files = weight_files(model_dir, allow_pickle=allow_pickle)
    return normalise_spec(spec), content_hash(model_dir, files), model_dir
