"""A loaded model's tokens: its BOS (else EOS) id, its positions, a single token by text. Shared by
the corpus pass, patching, the study, verify and universality (it imports nothing of theirs)."""

from __future__ import annotations

from discover.errors import QueryError


def bos_id(tokenizer) -> int | None:
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return None


def model_context(view) -> int:
    """The model's positions (the language model's config, inside a multimodal wrapper)."""
    cfg = view.text_config
    for name in ("n_positions", "max_position_embeddings"):
        v = getattr(cfg, name, None)
        if v:
            return int(v)
    return 2048


def single_token(view, text: str, what: str) -> int:
    ids = view.tokenizer.encode(text, add_special_tokens=False)
    unk = view.tokenizer.unk_token_id
    if len(ids) != 1 or (unk is not None and ids[0] == unk):
        raise QueryError(
            f"{what} {text!r} is not one token of this model's vocabulary (it tokenizes to "
            f"{[view.tokenizer.decode([i]) for i in ids]}); name a single token, with its leading space if it has one")
    return int(ids[0])


def backend_of(tokenizer, method: str):
    """The `tokenizers` object behind a transformers tokenizer whose `method` is the backend's own
    (not overridden by a model-specific class), else None: then only the slow path is exact."""
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # another transformers layout
        return None
    if not isinstance(tokenizer, TokenizersBackend) or getattr(type(tokenizer), method) is not getattr(
            TokenizersBackend, method):
        return None
    return getattr(tokenizer, "_tokenizer", None)


def decode_each(tokenizer, n: int, *, fast: bool = True) -> list[str]:
    """`tokenizer.decode([i], clean_up_tokenization_spaces=False)` for every id below n; with
    `fast`, in one batch call of the `tokenizers` backend where that is what decode runs."""
    backend = backend_of(tokenizer, "_decode") if fast else None
    if backend is not None:
        return backend.decode_batch([[i] for i in range(n)], skip_special_tokens=False)
    return [tokenizer.decode([i], clean_up_tokenization_spaces=False) for i in range(n)]


def one_token_texts(tokenizer, strings: list[str], *, fast: bool = True) -> dict[str, int]:
    """{text: id} for every id whose decoded text `strings[id]` the tokenizer splits into exactly
    [id] (no special tokens added). With `fast`, one batch call of the `tokenizers` backend where
    that is what the tokenizer's own call runs; else the tokenizer's call (the reference)."""
    n = min(len(tokenizer), len(strings))
    backend = backend_of(tokenizer, "_encode_plus") if fast else None
    if backend is not None:
        split = bool(getattr(tokenizer, "split_special_tokens", False))
        if backend.encode_special_tokens != split:
            backend.encode_special_tokens = split
        ids = [e.ids for e in backend.encode_batch_fast(strings[:n], add_special_tokens=False)]
    else:
        ids = tokenizer(strings[:n], add_special_tokens=False)["input_ids"]
    return {s: i for i, (s, got) in enumerate(zip(strings[:n], ids)) if got == [i]}
