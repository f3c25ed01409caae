"""Checks on a model `from_pretrained` has just loaded (shared by the Hugging Face and GGUF loaders)."""

from __future__ import annotations


def missing_weights(model, info: dict) -> list[str]:
    """Parameters `from_pretrained` found no weights for (it initialises them at random), except a
    head tied to the embedding."""
    tied = getattr(model.config, "tie_word_embeddings", False)
    return [k for k in info.get("missing_keys", []) if not (tied and k.endswith("lm_head.weight"))]
