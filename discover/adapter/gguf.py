"""GGUF files (llama.cpp, ollama) as models: found, checked before anything is loaded (magic,
header, every tensor inside the file, an architecture we can map), identified by the sha256 of
the file, and loaded through transformers' GGUF reader, dequantized to float32, with the
tokenizer stored in the same file."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

from discover.errors import ModelLoadError, UnsupportedModel, first_line

MAGIC = b"GGUF"
#: GGUF `general.architecture` names whose transformers model_type differs
_MODEL_TYPE = {"gemma3": "gemma3_text"}


def _is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def find(spec: str) -> Path | None:
    """The `.gguf` file `spec` names: the file itself, or the one `.gguf` in a directory that has
    no safetensors weights. None when `spec` is not a GGUF model."""
    p = Path(spec).expanduser()
    if p.is_file():
        return p.resolve() if (p.suffix.lower() == ".gguf" or _is_gguf(p)) else None
    if p.is_dir() and not any(p.glob("*.safetensors")):
        found = sorted(p.glob("*.gguf"))
        if len(found) > 1:
            raise ModelLoadError(f"{spec} holds {len(found)} .gguf files ({', '.join(f.name for f in found[:4])}); "
                                 "pass one of them as MODEL")
        if found:
            return found[0].resolve()
    return None


def _reader(path: Path):
    import gguf

    if not _is_gguf(path):
        with open(path, "rb") as f:
            head = f.read(4)
        raise ModelLoadError(f"{path} is not a GGUF file (it starts with {head!r}, not b'GGUF'); pass a .gguf "
                             "file written by llama.cpp or the gguf package")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # a cut header, bad lengths, bad types
        raise ModelLoadError(f"GGUF file {path} is corrupt or truncated ({first_line(e, 160)}); "
                             "re-download or re-convert it") from None


def _field(reader, key: str):
    f = reader.fields.get(key)
    if f is None:
        return None
    try:
        return f.contents()
    except Exception:
        return None


def model_type(reader, path: Path) -> str:
    """The transformers model_type of a GGUF file's `general.architecture`, or UnsupportedModel."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    from discover.adapter.families import family_for

    arch = _field(reader, "general.architecture")
    if not arch:
        raise ModelLoadError(f"GGUF file {path} has no general.architecture; it is not a model file")
    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        readable = ", ".join(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer"))
        raise UnsupportedModel(f"GGUF architecture '{arch}' in {path} cannot be mapped to a transformers model "
                               f"(transformers reads GGUF for: {readable}); convert the model to safetensors")
    mt = _MODEL_TYPE.get(arch, arch)
    family_for({"model_type": mt}, where=str(path))
    return mt


def quantization(reader) -> str:
    """The file's quantization type, e.g. `Q4_1` (`general.file_type`, else the commonest type of
    its matrices)."""
    import gguf

    ft = _field(reader, "general.file_type")
    if ft is not None:
        try:
            return gguf.LlamaFileType(int(ft)).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            pass
    kinds = Counter(t.tensor_type.name for t in reader.tensors if len(t.shape) >= 2)
    return kinds.most_common(1)[0][0] if kinds else "unknown"


def check(path: Path) -> str:
    """Check `path` without loading it (GGUF, complete, an architecture we map); its sha256."""
    reader = _reader(path)
    size = path.stat().st_size
    for t in reader.tensors:
        if int(t.data_offset) + int(t.n_bytes) > size:
            raise ModelLoadError(f"GGUF file {path} is truncated: tensor {t.name} ends past its {size} bytes; "
                                 "re-download or re-convert it")
    if not reader.tensors:
        raise ModelLoadError(f"GGUF file {path} holds no tensors; it is not a model file")
    model_type(reader, path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def describe(path: Path) -> dict:
    """The source record of a GGUF model: format, quantization type, architecture."""
    reader = _reader(path)
    return {"format": "gguf", "quantization": quantization(reader), "file": path.name,
            "gguf_architecture": _field(reader, "general.architecture")}


def load(path: Path):
    """(model, tokenizer, source): the model dequantized to float32, its tokenizer from the file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = describe(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype="float32")
    except Exception as e:
        raise ModelLoadError(f"could not load GGUF file {path} ({first_line(e)})") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:
        raise ModelLoadError(f"GGUF file {path} loads but its tokenizer does not ({first_line(e, 200)})") from None
    return model, tokenizer, source
