"""Where a model is and what it is: a local directory, a hub id or a GGUF file, its weight
files checked before anything is loaded, and its checkpoint id (a content hash)."""

from __future__ import annotations

import hashlib
import json
import re
import struct
from pathlib import Path

from discover.errors import ModelLoadError, first_line

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
#: config keys that say where or with what a model was saved, not what it is
_VOLATILE_CONFIG = ("_name_or_path", "transformers_version")


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
                f"{spec} is a file, not a model directory or a .gguf file; pass the directory that holds "
                "config.json, or a .gguf file"
            )
        if not (p / "config.json").is_file():
            raise ModelLoadError(
                f"{spec} is not a model directory (no config.json, no .gguf file); pass a Hugging Face "
                "model directory, a .gguf file or a hub id"
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
    import torch

    h = hashlib.sha256()
    cfg = model.config.to_dict()
    for volatile in _VOLATILE_CONFIG:
        cfg.pop(volatile, None)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(dtype=torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_architecture(model_dir: Path) -> str:
    """The model_type of `model_dir`'s config, or UnsupportedModel naming what is supported."""
    from discover.adapter.families import family_for

    try:
        cfg = json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{model_dir}/config.json is not valid JSON ({e}); fix or re-download it") from None
    family_for(cfg, where=str(model_dir))
    return cfg.get("model_type")


def require_statistics(spec: str, correlations: bool = False) -> None:
    """Refuse (one line), from the config or GGUF header alone, before any weight is hashed or
    loaded, a local model whose corpus-pass statistics (with `correlations`: universality's
    correlations, not defined for experts) are not defined. Hub ids not on disk are checked
    after loading (`ModelView.require_statistics`)."""
    from discover.adapter import gguf
    from discover.adapter.families import family_for

    found = gguf.find(spec)
    if found is not None:
        fam = family_for({"model_type": gguf.model_type(gguf.read_header(found), found)})
    else:
        cfg = Path(spec).expanduser() / "config.json"
        if not cfg.is_file():
            return
        try:
            fam = family_for(json.loads(cfg.read_text()), where=str(cfg.parent))
        except json.JSONDecodeError:
            return  # identify says so, in its own words
    fam.require_statistics()
    if correlations:
        fam.require_correlations()


def identify(spec: str, *, allow_pickle: bool = False) -> tuple[str, str, Path]:
    """(normalised spec, checkpoint id, location) without loading the weights. The location is
    the model directory, or the `.gguf` file for GGUF models."""
    from discover.adapter import gguf

    found = gguf.find(spec)
    if found is not None:
        return normalise_spec(spec), gguf.check(found), found
    model_dir = resolve_model_dir(spec, allow_pickle=allow_pickle)
    check_architecture(model_dir)
    files = weight_files(model_dir, allow_pickle=allow_pickle)
    return normalise_spec(spec), content_hash(model_dir, files), model_dir
