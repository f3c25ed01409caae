"""Phi-3 (fused gate_up_proj) and Phi-2 (parallel attention + MLP on one shared LayerNorm, biased
lm_head): the family checks of family_checks.py, and Phi-3's fused split against Phi3MLP itself."""

from __future__ import annotations

import pytest
import torch
import family_checks as fc

ARCHS = ["phi3", "phi"]


def tiny(arch: str, n_layer: int = 3):
    from transformers import Phi3Config, Phi3ForCausalLM, PhiConfig, PhiForCausalLM

    common = dict(num_hidden_layers=n_layer, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                  vocab_size=97, max_position_embeddings=32, tie_word_embeddings=False, bos_token_id=0,
                  eos_token_id=0)
    if arch == "phi3":
        # partial rotary as Phi-4-mini; GQA as Phi-3-medium; a sliding window (2047 in Phi-3-mini-4k)
        # shorter than the test prompts, so the recorded masks matter; pad id inside the vocabulary
        cfg = Phi3Config(num_key_value_heads=2, partial_rotary_factor=0.5, original_max_position_embeddings=32,
                         sliding_window=6, pad_token_id=0, **common)
        return fc.randomise_norms(Phi3ForCausalLM(cfg))
    # Phi-2: gelu_new, partial rotary (0.4 there), lm_head with a bias
    cfg = PhiConfig(partial_rotary_factor=0.5, **common)
    model = PhiForCausalLM(cfg)
    with torch.no_grad():  # a non-zero head bias, so that leaving it out of W_U is tested
        model.lm_head.bias.normal_(0, 0.5)
    return fc.randomise_norms(model)


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


def test_phi3_fused_split_is_gate_then_up():
    """W_in is the half of gate_up_proj that act_fn sees, W_up the half it multiplies: the
    activation at down_proj's input equals act(x W_in) * (x W_up), and swapping the halves
    does not (so the check can fail)."""
    from discover.adapter import from_model

    view = from_model(tiny("phi3", 1), None)
    mlp = view.model.get_submodule(view.mlp_site(0))
    x = torch.randn(2, 5, view.d_model)
    got = {}
    hook = mlp.down_proj.register_forward_pre_hook(lambda m, a: got.__setitem__("a", a[0].detach()))
    try:
        with torch.no_grad():
            mlp(x)
    finally:
        hook.remove()
    act = view.activation_fn()
    gate, up = x @ view.W_in(0).T, x @ view.W_up(0).T
    torch.testing.assert_close(got["a"], act(gate) * up)
    assert not torch.allclose(got["a"], act(up) * gate, atol=1e-3)
    n = view.d_mlp
    assert n == mlp.gate_up_proj.weight.shape[0] // 2 == mlp.down_proj.weight.shape[1]
    # the family's accessors are views of the fused parameter: writing into them plants
    with torch.no_grad():
        view.arch.w_up(mlp)[3] = 7.0
    assert bool((mlp.gate_up_proj.weight[n + 3] == 7.0).all())
