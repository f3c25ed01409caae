"""OLMo (weightless LayerNorm) and OLMo 2 / OLMo 3 (no pre-MLP norm, post-feedforward RMSNorm):
the family checks of family_checks.py on tiny random models built from config (TransformerLens
4.3 skips the final-norm fold here and never centres W_gate: `matches_transformerlens` undoes
both on TL's side, see its docstring)."""

from __future__ import annotations


import pytest
import torch
import family_checks as fc

from discover.adapter import from_model

ARCHS = ["olmo", "olmo2", "olmo3"]


def tiny(arch: str, n_layer: int = 3):
    import transformers as tf

    cls, cfg_cls = {"olmo": ("OlmoForCausalLM", "OlmoConfig"), "olmo2": ("Olmo2ForCausalLM", "Olmo2Config"),
                    "olmo3": ("Olmo3ForCausalLM", "Olmo3Config")}[arch]
    kw = dict(num_hidden_layers=n_layer, hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
              intermediate_size=128, vocab_size=97, max_position_embeddings=32, tie_word_embeddings=False,
              pad_token_id=0, bos_token_id=0, eos_token_id=0,
              # at the default 0.02 the clean-corrupt logit difference (patching's denominator) is
              # ~6e-4 for OLMo, whose weightless norms randomise_norms cannot spread: float32 noise
              # then moves a recovery by ~2e-4, over the check's 1e-4. A wider init keeps it well above.
              initializer_range=0.1)
    if arch == "olmo3":  # a sliding layer whose window (4) the test sequences exceed, then a full one
        kw.update(sliding_window=4, layer_types=["sliding_attention", "full_attention", "sliding_attention"][:n_layer])
    model = getattr(tf, cls)(getattr(tf, cfg_cls)(**kw))
    return fc.randomise_norms(model)  # OLMo 2/3's RMSNorm gains; OLMo's norms have no parameters


def test_olmo_norms_are_weightless_layernorms():
    view = from_model(tiny("olmo"), None)
    for norm in [view.mlp_norm(0), view.final_norm()]:
        assert norm.kind == "layernorm" and norm.bias is None and norm.eps == 1e-5
        assert torch.equal(norm.weight, torch.ones(64))
    U = view.processed_unembed()
    torch.testing.assert_close(U.mean(0), torch.zeros(U.shape[1]), atol=1e-6, rtol=0)  # centred: LayerNorm


def test_olmo2_mlp_reads_raw_residual_and_folds_post_norm_gain():
    view = from_model(tiny("olmo2"), None)
    assert view.mlp_norm(0) is None
    torch.testing.assert_close(view.processed_W_in(1), view.W_in(1))  # no fold, no centring
    post = view.post_mlp_norm(1)
    assert post.kind == "rmsnorm" and not torch.allclose(post.weight, torch.ones(64))
    torch.testing.assert_close(view.processed_W_out(1), view.W_out(1) * post.weight)


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

