"""`discover train`: train a small GPT-2 from scratch on a corpus, with resumable checkpoints.

One run lives in one output directory:

    OUT/run.json                 the run's identity (config + corpus fingerprint); checked on rerun
    OUT/tokenizer/               byte-level BPE trained on the corpus' train split
    OUT/data/train.bin           uint16 token ids, each document preceded by <|endoftext|>
    OUT/data/heldout.bin         the same for the held-out split
    OUT/data/data.json           token counts, corpus fingerprint, tokenizer hash, unigram baseline
    OUT/checkpoint-STEP/         HF layout: config.json, model.safetensors, tokenizer files,
                                 trainer_state.json, training_args.json, optimizer.pt,
                                 scheduler.pt, rng_state.pth
    OUT/log.jsonl                one JSON line per train-loss log and per held-out evaluation

Choices, so numbers from two runs can be compared:
- Model: `GPT2LMHeadModel`, `gelu_new`, tied embeddings, learned positions, no dropout (small
  models on small corpora; it also keeps a run a pure function of (config, corpus)). The model's
  vocabulary is the trained tokenizer's, which can be smaller than `vocab_size` on a small corpus.
- Optimiser: AdamW, betas (0.9, 0.95), eps 1e-8, weight decay 0.1 on matrices only (not on
  biases or LayerNorm gains), gradient norm clipped to 1.0; learning rate linear warmup over
  `warmup_steps`, then cosine decay to 10% of `lr` at the last step.
- Batches: step s reads `batch_size` windows of `context + 1` tokens at offsets drawn from
  `np.random.default_rng([seed, s])`, so a resumed run sees exactly the batches an uninterrupted
  one would; on CPU a resumed run ends with bit-identical weights.
- Held-out loss: mean next-token cross-entropy (nats/token) on fixed windows evenly spaced over
  heldout.bin (`eval_tokens` tokens in all). The unigram baseline is the cross-entropy on
  heldout.bin of the train split's token frequencies with add-one smoothing; a model that has
  learned anything beats it.
- A checkpoint is written to a temporary directory and renamed into place, so a kill never
  leaves half of one; `trainer_state.json` holds no timings, so it is identical between an
  interrupted-and-resumed run and an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from discover.corpus import Corpus, open_corpus
from discover.errors import TrainError

EOT = "<|endoftext|>"
LOG_EVERY = 50  # steps between train-loss log entries (also logged at every save and the end)
TOKENIZER_MIN_FREQUENCY = 2
ENCODE_BATCH_CHARS = 1 << 20  # characters per tokenizer.encode_batch call
RUN_FORMAT = 1

# Fields that define a run: resuming with any of them changed is a different run.
IDENTITY_FIELDS = (
    "text_field", "n_layer", "d_model", "n_head", "d_mlp", "vocab_size", "context", "seed",
    "batch_size", "lr", "warmup_steps", "eval_tokens",
)


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one training run. Invalid values raise ValueError naming the field."""

    out: str
    corpus: str | None = None
    text_field: str = "text"
    n_layer: int = 2
    d_model: int = 256
    n_head: int = 4
    d_mlp: int = 1024
    vocab_size: int = 4096
    context: int = 256
    seed: int = 0
    tokens: int = 10_000_000
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 100
    save_every: int = 500
    eval_every: int = 250
    eval_tokens: int = 65536
    device: str = "auto"
    dtype: str = "float32"
    keep_checkpoints: int | None = None

    def __post_init__(self) -> None:
        if not self.out:
            raise ValueError("out: give an output directory")
        for name in ("n_layer", "d_model", "n_head", "d_mlp", "batch_size", "save_every", "eval_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        if not 257 <= self.vocab_size <= 65536:
            # 256 byte tokens + <|endoftext|>; ids are stored as uint16.
            raise ValueError(f"vocab_size must be in 257..65536, got {self.vocab_size}")
        if self.context < 2:
            raise ValueError(f"context must be at least 2, got {self.context}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.tokens < self.tokens_per_step:
            raise ValueError(
                f"tokens ({self.tokens}) is less than one step (batch_size * context = {self.tokens_per_step})"
            )
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.eval_tokens < self.context:
            raise ValueError(f"eval_tokens ({self.eval_tokens}) must be at least context ({self.context})")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError:
                raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}") from None
        if self.keep_checkpoints is not None and self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be >= 1 or None, got {self.keep_checkpoints}")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.context

    @property
    def max_steps(self) -> int:
        return self.tokens // self.tokens_per_step


@dataclass(frozen=True)
class TrainResult:
    """What a finished (or already complete) run reports."""

    out: str
    checkpoint: str
    final_step: int
    tokens_seen: int
    heldout_loss: float
    unigram_loss: float
    wall_seconds: float
    device: str


def _after_step(step: int) -> None:
    """Called after every optimiser step with the number of completed steps (a test seam)."""


# ------------------------------------------------------------------------ helpers ----
def _say(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as e:
        raise TrainError(f"cannot read {path} ({e}); remove it or use another --out") from None


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _resolve_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(cfg.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"--device {cfg.device}: no CUDA device is available; use --device cpu")
    return dev


@contextlib.contextmanager
def _deterministic(device: torch.device) -> Iterator[None]:
    """Deterministic kernels for the run, restored afterwards (it is process-wide state)."""
    if device.type == "cuda":
        # cuBLAS needs a fixed workspace to be deterministic; must be set before its first use.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    import torch.utils.deterministic as td

    was = torch.are_deterministic_algorithms_enabled()
    was_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    was_fill = td.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    # Filling every torch.empty with NaN costs ~6% of a CPU step; every buffer read is written first.
    td.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=was_warn)
        td.fill_uninitialized_memory = was_fill


@contextlib.contextmanager
def _quiet_hf() -> Iterator[None]:
    """Hide transformers' own progress bars (e.g. "Writing model shards") while saving."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


# ------------------------------------------------------------------ run identity ----
def _check_out(cfg: TrainConfig, fingerprint: str, corpus: Corpus) -> dict:
    """Create OUT/run.json, or check that the existing run is this one."""
    out = cfg.out
    if os.path.exists(out) and not os.path.isdir(out):
        raise TrainError(f"--out {out} is a file; use another --out")
    run_path = os.path.join(out, "run.json")
    run = _read_json(run_path)
    if run is None:
        if os.path.isdir(out) and os.listdir(out):
            raise TrainError(f"{out} is not empty and is not a discover training run; use another --out")
        os.makedirs(out, exist_ok=True)
        run = {
            "format": RUN_FORMAT,
            "config": dataclasses.asdict(cfg),
            "corpus_fingerprint": fingerprint,
            "heldout_percent": corpus.heldout_percent,
        }
        _write_json(run_path, run)
        return run
    old = run.get("config", {})
    diff = [f for f in IDENTITY_FIELDS if old.get(f) != getattr(cfg, f)]
    if run.get("corpus_fingerprint") != fingerprint:
        diff.append("corpus")
    if run.get("heldout_percent") != corpus.heldout_percent:
        diff.append("heldout_percent")
    if diff:
        was = ", ".join(f"{f}={old.get(f)!r}" if f in old else f for f in diff)
        raise TrainError(f"{out} holds a different run ({was}); use another --out or the same settings")
    return run


def _latest_checkpoint(out: str) -> tuple[int, str] | None:
    """(step, path) of the newest complete checkpoint in OUT, or None."""
    best = None
    if not os.path.isdir(out):
        return None
    for name in os.listdir(out):
        m = re.fullmatch(r"checkpoint-(\d+)", name)
        path = os.path.join(out, name)
        if m and os.path.isfile(os.path.join(path, "trainer_state.json")):
            step = int(m.group(1))
            if best is None or step > best[0]:
                best = (step, path)
    return best


def latest_checkpoint(out: str) -> str | None:
    """Path of the newest complete `checkpoint-STEP` directory of a run, or None."""
    found = _latest_checkpoint(out)
    return found[1] if found else None


# ------------------------------------------------------------------- tokenizer ----
def _tokenizer(cfg: TrainConfig, corpus: Corpus, fingerprint: str, progress: bool):
    """Train (or reuse) the byte-level BPE in OUT/tokenizer; returns a `tokenizers.Tokenizer`."""
    from tokenizers import ByteLevelBPETokenizer, Tokenizer

    tok_dir = os.path.join(cfg.out, "tokenizer")
    meta = {
        "vocab_size": cfg.vocab_size,
        "min_frequency": TOKENIZER_MIN_FREQUENCY,
        "corpus_fingerprint": fingerprint,
        "heldout_percent": corpus.heldout_percent,
    }
    if _read_json(os.path.join(tok_dir, "discover_tokenizer.json")) == meta and os.path.isfile(
        os.path.join(tok_dir, "tokenizer.json")
    ):
        return Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))

    _say(progress, f"tokenizer: training byte-level BPE ({cfg.vocab_size} tokens) on the train split")
    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(
        (d.text for d in corpus.iter_documents("train")),
        vocab_size=cfg.vocab_size,
        min_frequency=TOKENIZER_MIN_FREQUENCY,
        special_tokens=[EOT],
        show_progress=False,
    )
    from transformers import PreTrainedTokenizerFast

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token=EOT,
        eos_token=EOT,
        unk_token=EOT,
        model_max_length=cfg.context,
    )
    tmp = tok_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    wrapped.save_pretrained(tmp)
    # The class name every transformers version knows (v5 writes its new "TokenizersBackend").
    tc_path = os.path.join(tmp, "tokenizer_config.json")
    tc = _read_json(tc_path) or {}
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    _write_json(tc_path, tc)
    _write_json(os.path.join(tmp, "discover_tokenizer.json"), meta)
    shutil.rmtree(tok_dir, ignore_errors=True)
    os.replace(tmp, tok_dir)
    return Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))


# ------------------------------------------------------------------------ data ----
def _data(cfg: TrainConfig, corpus: Corpus, fingerprint: str, tok, progress: bool) -> dict:
    """Tokenize the corpus into OUT/data/{train,heldout}.bin (or reuse them); returns data.json."""
    data_dir = os.path.join(cfg.out, "data")
    tok_hash = _sha256_file(os.path.join(cfg.out, "tokenizer", "tokenizer.json"))
    meta_path = os.path.join(data_dir, "data.json")
    meta = _read_json(meta_path)
    paths = {s: os.path.join(data_dir, f"{s}.bin") for s in ("train", "heldout")}
    if (
        meta is not None
        and meta.get("corpus_fingerprint") == fingerprint
        and meta.get("tokenizer_sha256") == tok_hash
        and meta.get("heldout_percent") == corpus.heldout_percent
        and all(os.path.isfile(p) and os.path.getsize(p) == 2 * meta.get(f"{s}_tokens", -1) for s, p in paths.items())
    ):
        return meta

    _say(progress, "data: tokenizing the corpus")
    os.makedirs(data_dir, exist_ok=True)
    vocab = tok.get_vocab_size()
    eot = tok.token_to_id(EOT)
    counts = {s: np.zeros(vocab, dtype=np.int64) for s in paths}
    docs = {s: 0 for s in paths}
    files = {s: open(p + ".tmp", "wb") for s, p in paths.items()}
    try:
        batch: list = []
        size = 0

        def flush() -> None:
            encs = tok.encode_batch([d.text for d in batch], add_special_tokens=False)
            for d, enc in zip(batch, encs):
                split = corpus.split_of(d.doc_id)
                ids = np.empty(len(enc.ids) + 1, dtype=np.uint16)
                ids[0] = eot  # every document starts after an <|endoftext|>, as GPT-2's data
                ids[1:] = enc.ids
                ids.tofile(files[split])
                counts[split] += np.bincount(ids, minlength=vocab)
                docs[split] += 1

        for doc in corpus.iter_documents("all"):
            batch.append(doc)
            size += len(doc.text)
            if size >= ENCODE_BATCH_CHARS:
                flush()
                batch, size = [], 0
        if batch:
            flush()
    finally:
        for f in files.values():
            f.close()
    for s, p in paths.items():
        os.replace(p + ".tmp", p)

    n = {s: int(c.sum()) for s, c in counts.items()}
    if n["heldout"] == 0 or n["train"] == 0:
        empty = "held-out" if n["heldout"] == 0 else "train"
        raise TrainError(
            f"the corpus' {empty} split is empty ({docs['train']} train / {docs['heldout']} held-out documents); "
            "use a corpus with more documents"
        )
    # Unigram baseline: train-split frequencies, add-one smoothing, scored on held-out tokens.
    logp = np.log((counts["train"] + 1) / (n["train"] + vocab))
    unigram = float(-(counts["heldout"] * logp).sum() / n["heldout"])
    meta = {
        "corpus_fingerprint": fingerprint,
        "tokenizer_sha256": tok_hash,
        "heldout_percent": corpus.heldout_percent,
        "vocab_size": vocab,
        "train_tokens": n["train"],
        "heldout_tokens": n["heldout"],
        "train_documents": docs["train"],
        "heldout_documents": docs["heldout"],
        "unigram_loss": unigram,
    }
    _write_json(meta_path, meta)
    return meta


# ------------------------------------------------------------------------ model ----
def _build_model(cfg: TrainConfig, vocab: int, eot: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab,
        n_positions=cfg.context,
        n_embd=cfg.d_model,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_inner=cfg.d_mlp,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=eot,
        eos_token_id=eot,
        tie_word_embeddings=True,  # W_U = W_E.T, as GPT-2
    )
    torch.manual_seed(cfg.seed)
    return GPT2LMHeadModel(config)


def _optimizer(cfg: TrainConfig, model, device: torch.device):
    decay, no_decay = [], []
    for _, p in model.named_parameters():  # tied W_E / W_U appears once
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")
    warmup, total = cfg.warmup_steps, cfg.max_steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


class _Batches:
    """Deterministic training batches and fixed held-out windows from the token files."""

    def __init__(self, cfg: TrainConfig, data_dir: str, device: torch.device):
        self.cfg, self.device = cfg, device
        self.train = np.memmap(os.path.join(data_dir, "train.bin"), dtype=np.uint16, mode="r")
        heldout = np.memmap(os.path.join(data_dir, "heldout.bin"), dtype=np.uint16, mode="r")
        T = cfg.context
        for name, arr in (("train", self.train), ("held-out", heldout)):
            if len(arr) < T + 1:
                raise TrainError(
                    f"the {name} split has {len(arr)} tokens, fewer than context + 1 = {T + 1}; "
                    "use a larger corpus or a smaller --context"
                )
        n_windows = max(1, cfg.eval_tokens // T)
        starts = np.linspace(0, len(heldout) - T - 1, n_windows).round().astype(np.int64)
        self.eval_windows = np.asarray(heldout[starts[:, None] + np.arange(T + 1)], dtype=np.int64)  # (W, T+1)
        self._arange = np.arange(T + 1)

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.cfg.seed, step])
        offsets = rng.integers(0, len(self.train) - self.cfg.context, size=self.cfg.batch_size)
        xy = torch.from_numpy(self.train[offsets[:, None] + self._arange].astype(np.int64))  # (B, T+1)
        if self.device.type == "cuda":
            xy = xy.pin_memory().to(self.device, non_blocking=True)
        return xy[:, :-1], xy[:, 1:]


def _loss(model, x: torch.Tensor, y: torch.Tensor, autocast) -> torch.Tensor:
    with autocast():
        logits = model(input_ids=x, use_cache=False).logits  # (B, T, vocab)
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())


@torch.no_grad()
def _evaluate(model, batches: _Batches, autocast) -> float:
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=batches.device)
    windows = batches.eval_windows
    bs = batches.cfg.batch_size
    for i in range(0, len(windows), bs):
        xy = torch.from_numpy(windows[i : i + bs]).to(batches.device)
        total += _loss(model, xy[:, :-1], xy[:, 1:], autocast).double() * len(xy)
    model.train()
    return float(total.item() / len(windows))


# ------------------------------------------------------------------ checkpoints ----
def _save_checkpoint(cfg, model, opt, sched, state: dict, run_args: dict) -> str:
    step = state["global_step"]
    final = os.path.join(cfg.out, f"checkpoint-{step}")
    tmp = os.path.join(cfg.out, f".tmp-checkpoint-{step}")
    shutil.rmtree(tmp, ignore_errors=True)
    with _quiet_hf():
        model.save_pretrained(tmp)
    tok_dir = os.path.join(cfg.out, "tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(os.path.join(tok_dir, name), os.path.join(tmp, name))
    torch.save(opt.state_dict(), os.path.join(tmp, "optimizer.pt"))
    torch.save(sched.state_dict(), os.path.join(tmp, "scheduler.pt"))
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, os.path.join(tmp, "rng_state.pth"))
    _write_json(os.path.join(tmp, "training_args.json"), run_args)
    _write_json(os.path.join(tmp, "trainer_state.json"), state)  # last: marks the checkpoint complete
    if os.path.exists(final):  # same step saved again: swap by renames, delete the old one after
        aside = f"{tmp}-old"
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
        os.replace(tmp, final)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(tmp, final)
    if cfg.keep_checkpoints is not None:
        steps = sorted(
            int(m.group(1)) for n in os.listdir(cfg.out) if (m := re.fullmatch(r"checkpoint-(\d+)", n))
        )
        for old in steps[: -cfg.keep_checkpoints]:
            shutil.rmtree(os.path.join(cfg.out, f"checkpoint-{old}"), ignore_errors=True)
    return final


def _load_checkpoint(path: str, model, opt, sched, device: torch.device) -> dict:
    from safetensors.torch import load_file

    try:
        weights = load_file(os.path.join(path, "model.safetensors"))
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if unexpected or set(missing) - {"lm_head.weight"}:  # lm_head is tied to wte
            raise TrainError(f"{path} does not match this model's shape; use another --out")
        opt.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), map_location=device, weights_only=True))
        sched.load_state_dict(torch.load(os.path.join(path, "scheduler.pt"), weights_only=True))
        rng = torch.load(os.path.join(path, "rng_state.pth"), weights_only=True)
        with open(os.path.join(path, "trainer_state.json")) as f:
            state = json.load(f)
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        raise TrainError(f"cannot resume from {path} ({str(e).splitlines()[0]}); delete it to resume from an earlier one") from None
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state


def _append_log(cfg: TrainConfig, entry: dict) -> None:
    with open(os.path.join(cfg.out, "log.jsonl"), "a") as f:
        f.write(json.dumps(entry) + "\n")


# ------------------------------------------------------------------------ train ----
def train(cfg: TrainConfig, progress: bool = True) -> TrainResult:
    """Train (or resume) the run described by `cfg`; returns where it ended and its losses."""
    t0 = time.perf_counter()
    device = _resolve_device(cfg)
    if cfg.dtype == "bfloat16" and device.type != "cuda":
        raise TrainError("--dtype bfloat16 needs a CUDA device; use --dtype float32 on CPU")

    corpus = open_corpus(cfg.corpus, text_field=cfg.text_field)
    fingerprint = corpus.fingerprint()
    desc = corpus.describe()
    _say(progress, f"corpus: {desc['kind']} {desc['path']} ({desc['documents']} documents, {desc['characters']:,} characters)")
    _check_out(cfg, fingerprint, corpus)
    for name in os.listdir(cfg.out):  # leftovers of a killed save
        if name.startswith(".tmp-checkpoint-"):
            shutil.rmtree(os.path.join(cfg.out, name), ignore_errors=True)

    tok = _tokenizer(cfg, corpus, fingerprint, progress)
    data = _data(cfg, corpus, fingerprint, tok, progress)
    vocab, eot = tok.get_vocab_size(), tok.token_to_id(EOT)
    _say(
        progress,
        f"data: {data['train_tokens']:,} train / {data['heldout_tokens']:,} held-out tokens, vocab {vocab}; "
        f"unigram baseline {data['unigram_loss']:.4f} nats/token",
    )

    max_steps = cfg.max_steps
    run_args = {
        **dataclasses.asdict(cfg),
        "max_steps": max_steps,
        "tokens_per_step": cfg.tokens_per_step,
        "model_vocab_size": vocab,
        "corpus_fingerprint": fingerprint,
        "heldout_percent": corpus.heldout_percent,
        "unigram_loss": data["unigram_loss"],
    }

    with _deterministic(device):
        model = _build_model(cfg, vocab, eot).to(device)
        opt, sched = _optimizer(cfg, model, device)
        batches = _Batches(cfg, os.path.join(cfg.out, "data"), device)
        autocast = (
            (lambda: torch.autocast("cuda", dtype=torch.bfloat16))
            if cfg.dtype == "bfloat16"
            else contextlib.nullcontext
        )
        state = {
            "global_step": 0,
            "max_steps": max_steps,
            "tokens_seen": 0,
            "train_batch_size": cfg.batch_size,
            "context": cfg.context,
            "logging_steps": LOG_EVERY,
            "eval_steps": cfg.eval_every,
            "save_steps": cfg.save_every,
            "best_metric": None,
            "best_global_step": None,
            "log_history": [],
        }
        found = _latest_checkpoint(cfg.out)
        if found is not None:
            state = _load_checkpoint(found[1], model, opt, sched, device)
            if state.get("max_steps") != max_steps:
                _say(progress, f"note: token budget changed: {state.get('max_steps')} -> {max_steps} steps; "
                               "the learning-rate schedule follows the new budget from here")
                state["max_steps"] = max_steps
            _say(progress, f"resuming from {found[1]}")
            _append_log(cfg, {"event": "resume", "step": state["global_step"]})
        start = state["global_step"]
        history = state["log_history"]
        last_ckpt = found[1] if found else None

        def record_eval(step: int) -> float:
            loss = _evaluate(model, batches, autocast)
            entry = {"step": step, "tokens": step * cfg.tokens_per_step, "eval_loss": loss}
            history.append(entry)
            _append_log(cfg, {**entry, "unigram_loss": data["unigram_loss"]})
            if state["best_metric"] is None or loss < state["best_metric"]:
                state["best_metric"], state["best_global_step"] = loss, step
            return loss

        if start == 0:
            record_eval(0)
        if start >= max_steps:
            evals = [h["eval_loss"] for h in history if "eval_loss" in h]
            return TrainResult(
                out=cfg.out, checkpoint=last_ckpt or "", final_step=start,
                tokens_seen=state["tokens_seen"], heldout_loss=evals[-1] if evals else float("nan"),
                unigram_loss=data["unigram_loss"], wall_seconds=time.perf_counter() - t0, device=str(device),
            )

        from tqdm.auto import tqdm

        bar = tqdm(total=max_steps, initial=start, desc="train", unit="step", file=sys.stderr,
                   disable=not progress, dynamic_ncols=True)
        loss_sum = torch.zeros((), device=device)
        n_acc = 0
        t_log = time.perf_counter()
        heldout_loss = float("nan")
        model.train()
        try:
            for step in range(start, max_steps):
                lr = opt.param_groups[0]["lr"]
                x, y = batches(step)  # (B, T), (B, T)
                loss = _loss(model, x, y, autocast)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                loss_sum += loss.detach()
                n_acc += 1
                done = step + 1
                state["global_step"], state["tokens_seen"] = done, done * cfg.tokens_per_step
                bar.update(1)
                is_save = done % cfg.save_every == 0 or done == max_steps
                if done % LOG_EVERY == 0 or is_save:
                    mean = loss_sum.item() / n_acc  # the only host sync between logs
                    if not math.isfinite(mean):
                        raise TrainError(
                            f"training loss became {mean} by step {done}; rerun with a lower --lr in another --out"
                        )
                    now = time.perf_counter()
                    tps = n_acc * cfg.tokens_per_step / max(now - t_log, 1e-9)
                    entry = {"step": done, "tokens": state["tokens_seen"], "loss": mean, "learning_rate": lr}
                    history.append(entry)
                    _append_log(cfg, {**entry, "tokens_per_s": round(tps, 1)})
                    bar.set_postfix(loss=f"{mean:.3f}", tok_s=f"{tps:,.0f}")
                    loss_sum.zero_()
                    n_acc = 0
                    t_log = now
                if done % cfg.eval_every == 0 or done == max_steps:
                    heldout_loss = record_eval(done)
                    if progress:
                        bar.write(f"step {done}: held-out loss {heldout_loss:.4f} (unigram {data['unigram_loss']:.4f})")
                if is_save:
                    last_ckpt = _save_checkpoint(cfg, model, opt, sched, state, run_args)
                    t_log = time.perf_counter()  # saving is not training time
                _after_step(done)
        finally:
            bar.close()

    return TrainResult(
        out=cfg.out,
        checkpoint=last_ckpt or "",
        final_step=state["global_step"],
        tokens_seen=state["tokens_seen"],
        heldout_loss=heldout_loss,
        unigram_loss=data["unigram_loss"],
        wall_seconds=time.perf_counter() - t0,
        device=str(device),
    )
