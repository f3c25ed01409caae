"""Tiny GGUF files written here with the `gguf` package's GGUFWriter, the way llama.cpp's
converter lays them out: tensor names from gguf's own HF -> GGUF name map, llama's q/k rows
permuted for its rotary layout, GPT-2's Conv1D weights transposed, a byte-level BPE tokenizer in
`tokenizer.ggml.*`. transformers' GGUF reader undoes each of these when it loads the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np

TEXT = ("I climbed up the pear tree and picked a pear. I climbed up the apple tree and picked an apple. "
        "The lemon tree is up the hill, and it was picked for an hour. ") * 20


def byte_bpe(vocab_size: int = 300):
    """A byte-level BPE tokenizer (every byte plus merges), trained on TEXT; <|endoftext|> is id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (its rotary pairs adjacent dimensions; HF's pairs halves)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model, tokenizer, path: Path, qtype: str = "F32") -> Path:
    """Write `model` (a tiny LlamaForCausalLM or GPT2LMHeadModel) and `tokenizer` as a GGUF file;
    `qtype` "F32" or "Q8_0" (2-D weights quantized, norms and biases kept in F32)."""
    import gguf

    cfg = model.config
    mt = cfg.model_type
    arch = {"llama": gguf.MODEL_ARCH.LLAMA, "gpt2": gguf.MODEL_ARCH.GPT2}[mt]
    n_layer = cfg.num_hidden_layers
    names = gguf.get_tensor_name_map(arch, n_layer)
    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    w.add_block_count(n_layer)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_head_count(cfg.num_attention_heads)
    if mt == "llama":
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count_kv(cfg.num_key_value_heads)
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        w.add_rope_freq_base(cfg.rope_parameters["rope_theta"] if getattr(cfg, "rope_parameters", None)
                             else cfg.rope_theta)
        w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
        w.add_vocab_size(cfg.vocab_size)
    else:
        w.add_feed_forward_length(cfg.n_inner or 4 * cfg.hidden_size)
        w.add_layer_norm_eps(cfg.layer_norm_epsilon)
    q = {"F32": gguf.GGMLQuantizationType.F32, "Q8_0": gguf.GGMLQuantizationType.Q8_0}[qtype]
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if qtype == "F32" else gguf.LlamaFileType.MOSTLY_Q8_0)
    # tokenizer: byte-level BPE as llama.cpp stores GPT-2-style tokenizers
    vocab = tokenizer.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    import json

    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t == "<|endoftext|>" else 1 for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)

    tied = getattr(cfg, "tie_word_embeddings", False)
    for hf_name, t in model.state_dict().items():
        if hf_name.endswith((".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")):  # buffers, not weights
            continue
        if tied and hf_name == "lm_head.weight":
            continue
        base, _, suffix = hf_name.rpartition(".")
        name = names.get_name(base)
        assert name is not None, hf_name
        a = t.detach().float().numpy().copy()
        if mt == "llama" and hf_name.endswith("self_attn.q_proj.weight"):
            a = _permute(a, cfg.num_attention_heads)
        elif mt == "llama" and hf_name.endswith("self_attn.k_proj.weight"):
            a = _permute(a, cfg.num_key_value_heads)
        if mt == "gpt2" and hf_name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            a = a.T.copy()  # Conv1D (in, out) -> the (out, in) that GGUF matrices have
        full = f"{name}.{suffix}"
        if q != gguf.GGMLQuantizationType.F32 and a.ndim == 2 and a.shape[1] % 32 == 0:
            w.add_tensor(full, gguf.quants.quantize(a, q), raw_dtype=q)  # byte rows: shape from the bytes
        else:
            w.add_tensor(full, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
