"""Llama-style gated MLPs (Llama, Mistral, Qwen2, Qwen3): the family checks of family_checks.py."""

from __future__ import annotations

import pytest
import family_checks as fc
from conftest import make_model

ARCHS = ["llama", "mistral", "qwen2", "qwen3"]


def tiny(arch: str, n_layer: int = 3):
    if arch != "qwen3":
        return make_model(arch, n_layer=n_layer)
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(num_hidden_layers=n_layer, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=16, intermediate_size=128, vocab_size=97, max_position_embeddings=32,
                      tie_word_embeddings=False)
    return fc.randomise_norms(Qwen3ForCausalLM(cfg))


@pytest.mark.parametrize("arch", ARCHS)
def test_planted_neurons_found(arch, tmp_path):
    fc.planted_neurons_found(tiny(arch, 2), tmp_path)


@pytest.mark.parametrize("arch", ARCHS)
def test_hooked_activations_equal_manual_mlp(arch):
    fc.hooked_activations_equal_manual_mlp(tiny(arch))


@pytest.mark.parametrize("positions", ["last", "all"])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_batched_patching_equals_loop(arch, positions):
    fc.batched_patching_equals_loop(tiny(arch), positions)


@pytest.mark.parametrize("arch", ARCHS)
def test_ablation_equals_hooked_forward(arch):
    fc.ablation_equals_hooked_forward(tiny(arch))


@pytest.mark.parametrize("arch", ["qwen3"])
def test_matches_transformerlens(arch, tmp_path):
    fc.matches_transformerlens(tiny(arch), tmp_path)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_padded_vocabulary_counts_only_real_tokens(arch):
    """A head with 128 rows and a 97-token tokenizer (vocabularies padded to a multiple of 64, as
    GPT-NeoX and Pythia pad theirs): every statistic is over the 97 real tokens, with U centred
    over those tokens only, exactly as over a model whose head stops at 97."""
    import numpy as np
    import scipy.stats
    from conftest import make_tokenizer

    from discover.adapter import from_model
    from discover.scan import ScanConfig, scan

    view = from_model(make_model(arch, vocab=128), make_tokenizer())
    assert view.d_vocab == 97 and view.W_U().shape == (64, 97) and len(view.token_strings()) == 97
    U = view.processed_unembed().double().numpy()
    np.testing.assert_allclose(U.mean(1), 0, atol=1e-8)  # centred over the real tokens (float32)
    res = scan(view, ScanConfig(), progress=False)
    for layer in range(view.n_layers):
        Wo = view.processed_W_out(layer).double().numpy()
        C = (Wo @ U) / np.linalg.norm(Wo, axis=1)[:, None] / np.linalg.norm(U, axis=0)[None, :]
        np.testing.assert_allclose(res.layers[layer].stats["vocab_kurt"],
                                   scipy.stats.kurtosis(C, axis=1, fisher=False), rtol=2e-4)
        assert res.layers[layer].top_ids.max() < 97


def test_length_dependent_rotary_tables_are_never_cut():
    """Dynamic NTK scaling makes a position's rotary table depend on the sequence's length, so
    verify's controls are not rerun on cut sequences there (`positions_depend_on_length`)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from discover.adapter import from_model

    def view(**kw):
        cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=4, **kw)
        return from_model(LlamaForCausalLM(cfg), fc.make_tokenizer())

    assert not view().positions_depend_on_length
    assert view(rope_scaling={"rope_type": "dynamic", "factor": 2.0}).positions_depend_on_length
