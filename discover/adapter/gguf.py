"""GGUF files (llama.cpp, ollama) as models: found, checked before anything is loaded (magic,
header, every tensor inside the file, an architecture we can map), identified by the sha256 of
the file, and loaded through transformers' GGUF reader, dequantized to float32, with the
tokenizer stored in the same file."""

from __future__ import annotations

import hashlib
import struct
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from discover.adapter.checks import missing_weights
from discover.errors import ModelLoadError, UnsupportedModel, first_line

MAGIC = b"GGUF"
#: GGUF `general.architecture` names whose transformers model_type differs (llama.cpp's names)
_MODEL_TYPE = {"gemma3": "gemma3_text", "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss",
               "minimax-m2": "minimax_m2", "command-r": "cohere"}


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
        found = sorted(f for f in p.iterdir() if f.suffix.lower() == ".gguf" and f.is_file())
        if len(found) > 1:
            raise ModelLoadError(f"{spec} holds {len(found)} .gguf files ({', '.join(f.name for f in found[:4])}); "
                                 "pass one of them as MODEL")
        if found:
            return found[0].resolve()
    return None


@dataclass
class Header:
    """What a GGUF file says before its tensor data: metadata (scalars; arrays as their length)
    and, per tensor, (name, shape, ggml type, byte offset from `data_start`)."""

    version: int
    meta: dict
    tensors: list
    data_start: int


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


class _Cursor:
    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def take(self, fmt: str):
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return v

    def string(self) -> str:
        n = self.take("<Q")
        if self.pos + n > len(self.buf):
            raise ValueError("a string runs past the end of the file")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == 8:
            return self.string()
        if vtype == 9:
            etype, n = self.take("<I"), self.take("<Q")
            if etype in _SCALARS:  # skip fixed-size elements at once
                self.pos += n * struct.calcsize(_SCALARS[etype])
            else:
                for _ in range(n):
                    self.value(etype)
            return n  # an array: its length is all we need
        raise ValueError(f"unknown metadata value type {vtype}")


def read_header(path: Path) -> Header:
    """Parse a GGUF header (v2/v3) without reading tensor data; ModelLoadError if it is not GGUF
    or is cut short. Much faster than gguf.GGUFReader, which decodes every token string. One
    load asks three times (the statistics check, `check`, `describe`): parsed once per file
    version (path, size, modification time)."""
    st = path.stat()
    return _read_header(str(path), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=8)
def _read_header(name: str, size: int, _mtime_ns: int) -> Header:
    import mmap

    path = Path(name)
    with open(path, "rb") as f:
        if f.read(4) != MAGIC:
            f.seek(0)
            raise ModelLoadError(f"{path} is not a GGUF file (it starts with {f.read(4)!r}, not b'GGUF'); pass "
                                 "a .gguf file written by llama.cpp or the gguf package")
        if size < 24:
            raise ModelLoadError(f"GGUF file {path} is corrupt or truncated ({size} bytes); re-download or re-convert it")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm, memoryview(mm) as view:
            c = _Cursor(view)
            try:
                c.pos = 4
                version = c.take("<I")
                if version not in (2, 3) and struct.unpack("<I", struct.pack(">I", version))[0] in (2, 3):
                    raise ModelLoadError(f"{path} is a big-endian GGUF file; only little-endian files are read: "
                                         "convert it on a little-endian machine")
                if version not in (2, 3):
                    raise ModelLoadError(f"{path} is GGUF version {version}; only versions 2 and 3 are read: "
                                         "re-convert it with a current llama.cpp")
                n_tensors, n_kv = c.take("<Q"), c.take("<Q")
                meta = {}
                for _ in range(n_kv):
                    key = c.string()
                    meta[key] = c.value(c.take("<I"))
                tensors = []
                for _ in range(n_tensors):
                    name = c.string()
                    dims = [c.take("<Q") for _ in range(c.take("<I"))]
                    tensors.append((name, dims, c.take("<I"), c.take("<Q")))
                align = meta.get("general.alignment", 32)
                if not isinstance(align, int) or align <= 0 or align % 8:
                    raise ValueError(f"general.alignment is {align!r}, not a positive multiple of 8")
                data_start = (c.pos + align - 1) // align * align
            except (struct.error, ValueError, OverflowError, MemoryError) as e:
                raise ModelLoadError(f"GGUF file {path} is corrupt or truncated ({first_line(e, 120)}); "
                                     "re-download or re-convert it") from None
    return Header(version, meta, tensors, data_start)


def _nbytes(dims, ggml_type: int) -> int:
    import gguf

    block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
    n = 1
    for d in dims:
        n *= d
    return n // block * type_size


def model_type(header: Header, path: Path) -> str:
    """The transformers model_type of a GGUF file's `general.architecture`, or UnsupportedModel."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    from discover.adapter.families import family_for

    arch = header.meta.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise ModelLoadError(f"GGUF file {path} has no general.architecture; it is not a model file")
    mt = _MODEL_TYPE.get(arch, arch)
    if arch not in GGUF_SUPPORTED_ARCHITECTURES and mt not in GGUF_SUPPORTED_ARCHITECTURES:
        readable = ", ".join(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer"))
        raise UnsupportedModel(f"GGUF architecture '{arch}' in {path} cannot be mapped to a transformers model "
                               f"(transformers reads GGUF for: {readable}); convert the model to safetensors")
    family_for({"model_type": mt}, where=str(path))
    return mt


def quantization(header: Header) -> str:
    """The file's quantization type, e.g. `Q4_1` (`general.file_type`, else the commonest type of
    its matrices)."""
    import gguf

    ft = header.meta.get("general.file_type")
    if ft is not None:
        try:
            return gguf.LlamaFileType(int(ft)).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            pass
    kinds = Counter(gguf.GGMLQuantizationType(t).name for _, dims, t, _ in header.tensors if len(dims) >= 2)
    return kinds.most_common(1)[0][0] if kinds else "unknown"


def check(path: Path) -> str:
    """Check `path` without loading it (GGUF, complete, an architecture we map); its sha256."""
    header = read_header(path)
    size = path.stat().st_size
    if not header.tensors:
        raise ModelLoadError(f"GGUF file {path} holds no tensors; it is not a model file")
    for name, dims, t, offset in header.tensors:
        try:
            end = header.data_start + offset + _nbytes(dims, t)
        except (KeyError, ValueError):
            raise ModelLoadError(f"GGUF file {path}: tensor {name} has an unknown type {t}; re-convert it") from None
        if end > size:
            raise ModelLoadError(f"GGUF file {path} is truncated: tensor {name} ends at byte {end}, past its {size} "
                                 "bytes; re-download or re-convert it")
    model_type(header, path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def describe(path: Path) -> dict:
    """The source record of a GGUF model: format, quantization type, architecture."""
    header = read_header(path)
    return {"format": "gguf", "quantization": quantization(header), "file": path.name,
            "gguf_architecture": header.meta.get("general.architecture")}


@contextmanager
def _dequantize_bar():
    """transformers' dequantization progress bar on a terminal only (never in piped output, where
    an error must stay one line)."""
    import sys
    from functools import partial

    import transformers.modeling_gguf_pytorch_utils as g

    bar = g.tqdm
    g.tqdm = partial(bar, disable=not sys.stderr.isatty())
    try:
        yield
    finally:
        g.tqdm = bar


def load(path: Path):
    """(model, tokenizer, source): the model dequantized to float32, its config and tokenizer from
    the file alone. transformers would prefer a `config.json` or tokenizer files lying beside the
    `.gguf`, so it is read from a directory that holds nothing but a link to it."""
    import os
    import tempfile

    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = describe(path)
    with tempfile.TemporaryDirectory(prefix="discover-gguf-") as d, _dequantize_bar():
        name = "model.gguf"
        os.symlink(path, os.path.join(d, name))
        try:
            model, info = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype="float32",
                                                               output_loading_info=True)
        except Exception as e:
            raise ModelLoadError(f"could not load GGUF file {path} ({first_line(e)})") from None
        missing = missing_weights(model, info)
        if missing:
            raise ModelLoadError(f"GGUF file {path} lacks {len(missing)} of the model's tensors (e.g. {missing[0]}); "
                                 "it is incomplete or was converted wrongly: re-convert it")
        try:
            tokenizer = AutoTokenizer.from_pretrained(d, gguf_file=name)
        except Exception as e:
            raise ModelLoadError(f"GGUF file {path} loads but its tokenizer does not ({first_line(e, 200)})") from None
    return model, tokenizer, source

