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
