"""GPT-J (parallel attention + MLP on one shared `ln_1`, rotary, biased lm_head) and GPT-Neo
(nn.Linear MLP, alternating global and local attention): the family checks of family_checks.py."""

from __future__ import annotations

import pytest
import torch
import family_checks as fc

ARCHS = ["gptj", "gpt_neo"]


def tiny(arch: str, n_layer: int = 3):
    from transformers import GPTJConfig, GPTJForCausalLM, GPTNeoConfig, GPTNeoForCausalLM

    if arch == "gptj":
        cfg = GPTJConfig(n_layer=n_layer, n_embd=64, n_head=4, n_inner=128, rotary_dim=8, vocab_size=97,
                         n_positions=32, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
        model = GPTJForCausalLM(cfg)
        with torch.no_grad():  # a non-zero head bias, so that leaving it out of W_U is tested
            model.lm_head.bias.normal_(0, 0.5)
        return fc.randomise_norms(model)
    # a window of 4 (shorter than the test prompts), so local attention changes the numbers
    types = ["global", "local", "local"][:n_layer]
    cfg = GPTNeoConfig(num_layers=n_layer, hidden_size=64, num_heads=4, intermediate_size=128, vocab_size=97,
                       max_position_embeddings=32, attention_types=[[types, 1]], window_size=4,
                       bos_token_id=0, eos_token_id=0)
    return fc.randomise_norms(GPTNeoForCausalLM(cfg))


@pytest.mark.parametrize("arch", ARCHS)
def test_planted_neurons_found(arch, tmp_path):
    fc.planted_neurons_found(tiny(arch, 2), tmp_path)


@pytest.mark.parametrize("arch", ARCHS)
def test_hooked_activations_equal_manual_mlp(arch):
    fc.hooked_activations_equal_manual_mlp(tiny(arch))


@pytest.mark.parametrize("positions", ["last", "all"])
@pytest.mark.parametrize("arch", ARCHS)
def test_batched_patching_equals_loop(arch, positions):
    fc.batched_patching_equals_loop(tiny(arch), positions)


@pytest.mark.parametrize("arch", ARCHS)
def test_ablation_equals_hooked_forward(arch):
    fc.ablation_equals_hooked_forward(tiny(arch))


@pytest.mark.parametrize("arch", ARCHS)
def test_matches_transformerlens(arch, tmp_path):
    fc.matches_transformerlens(tiny(arch), tmp_path)
