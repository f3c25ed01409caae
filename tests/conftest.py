"""Tiny models built from config (no downloads), saved with a word-level tokenizer."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

WORDS = ["an", "a", "the", "apple", "pear", "tree", "lemon", "picked", "climbed", "up", "and", "I",
         "of", "to", "in", "is", "it", "that", "was", "for"]
VOCAB = ["<|endoftext|>"] + WORDS + [f"w{i}" for i in range(97 - 1 - len(WORDS))]
assert len(VOCAB) == 97


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="<|endoftext|>")


def make_model(arch: str, *, n_layer: int = 2, d_model: int = 64, d_mlp: int = 128, vocab: int = 97):
    """A random tiny causal LM of one of the supported families."""
    from transformers import (GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig,
                              LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

    if arch == "gpt2":
        m = GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_embd=d_model, n_head=4, vocab_size=vocab,
                                       n_positions=32, n_inner=d_mlp, bos_token_id=0, eos_token_id=0))
    elif arch == "gpt_neox":
        m = GPTNeoXForCausalLM(GPTNeoXConfig(num_hidden_layers=n_layer, hidden_size=d_model, num_attention_heads=4,
                                             intermediate_size=d_mlp, vocab_size=vocab, max_position_embeddings=32))
    else:
        cls, cfg = {"llama": (LlamaForCausalLM, LlamaConfig), "mistral": (MistralForCausalLM, MistralConfig),
                    "qwen2": (Qwen2ForCausalLM, Qwen2Config)}[arch]
        m = cls(cfg(num_hidden_layers=n_layer, hidden_size=d_model, num_attention_heads=4, num_key_value_heads=4,
                    intermediate_size=d_mlp, vocab_size=vocab, max_position_embeddings=32, tie_word_embeddings=False))
    # Non-trivial norm gains/biases so that folding them in matters.
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name or "ln_" in name or "layernorm" in name:
                if name.endswith("weight"):
                    p.copy_(1.0 + 0.3 * torch.randn_like(p))
                else:
                    p.copy_(0.1 * torch.randn_like(p))
    return m.eval()


def save(model, path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path), safe_serialization=True)
    make_tokenizer().save_pretrained(str(path))
    return path


@pytest.fixture
def store_dir(tmp_path):
    return tmp_path / "store"
