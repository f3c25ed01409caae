"""OPT (pre-LN; post-LN and project_out refused) and StableLM (sequential and parallel residual):
the family checks of family_checks.py on tiny random models built from config.

OPT's decoder layer holds fc1/fc2 itself (mlp_path "") and runs them on (batch*pos, d) rows:
the view reaches its activation site through `OPT.site_module` (`FlatSite`), whose hooks see
(batch, pos, neuron) as every other family's do; the checks below exercise exactly that.
"""

from __future__ import annotations

import pytest
import torch
import family_checks as fc
from conftest import make_tokenizer, save
from test_cli import assert_one_error_line, run

from discover.adapter import from_model
from discover.errors import UnsupportedModel

STABLELM = ["stablelm", "stablelm_parallel"]
ALL = ["opt"] + STABLELM


def tiny(arch: str, n_layer: int = 3, **over):
    import transformers as tf

    if arch == "opt":
        kw = dict(num_hidden_layers=n_layer, hidden_size=64, num_attention_heads=4, ffn_dim=128, vocab_size=97,
                  max_position_embeddings=32, word_embed_proj_dim=64, dropout=0.0, pad_token_id=0,
                  bos_token_id=0, eos_token_id=0)
        cfg = tf.OPTConfig(**{**kw, **over})
        return fc.randomise_norms(tf.OPTForCausalLM(cfg))
    cfg = tf.StableLmConfig(num_hidden_layers=n_layer, hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
                            intermediate_size=128, vocab_size=97, max_position_embeddings=32,
                            tie_word_embeddings=False, use_parallel_residual=arch == "stablelm_parallel",
                            pad_token_id=0, bos_token_id=0, eos_token_id=0, **over)
    return fc.randomise_norms(tf.StableLmForCausalLM(cfg))


# ------------------------------------------------------------------------ family checks
@pytest.mark.parametrize("arch", ["opt"] + STABLELM)
def test_planted_neurons_found(arch, tmp_path):
    fc.planted_neurons_found(tiny(arch, 2), tmp_path)  # weights only: no hooks, no view change needed


@pytest.mark.parametrize("arch", ALL)
def test_hooked_activations_equal_manual_mlp(arch):
    fc.hooked_activations_equal_manual_mlp(tiny(arch))


@pytest.mark.parametrize("positions", ["last", "all"])
@pytest.mark.parametrize("arch", ALL)
def test_batched_patching_equals_loop(arch, positions):
    fc.batched_patching_equals_loop(tiny(arch), positions)


@pytest.mark.parametrize("arch", ALL)
def test_ablation_equals_hooked_forward(arch):
    fc.ablation_equals_hooked_forward(tiny(arch))


def test_opt_matches_transformerlens(tmp_path):
    fc.matches_transformerlens(tiny("opt"), tmp_path)  # TL 4.3 unflattens OPT's MLP hooks as FlatSite does


@pytest.mark.parametrize("arch", STABLELM)
def test_stablelm_matches_transformerlens(arch, tmp_path):
    fc.matches_transformerlens(tiny(arch), tmp_path)  # TL leaves W_gate uncentred: see family_checks


# ------------------------------------------------------------------------ family specifics
@pytest.mark.parametrize("arch", STABLELM)
def test_stablelm_mlp_reads_the_right_norm(arch):
    model = tiny(arch, 2)
    view = from_model(model, None)
    block = model.model.layers[1]
    want = block.input_layernorm if arch == "stablelm_parallel" else block.post_attention_layernorm
    norm = view.mlp_norm(1)
    assert norm.kind == "layernorm" and view.arch.parallel == (arch == "stablelm_parallel")
    torch.testing.assert_close(norm.weight, want.weight.detach())
    torch.testing.assert_close(norm.bias, want.bias.detach())


def test_post_ln_opt_is_refused(tmp_path, capsys):
    model = tiny("opt", 2, do_layer_norm_before=False)
    with pytest.raises(UnsupportedModel) as e:
        from_model(model, make_tokenizer())
    msg = str(e.value)
    assert "\n" not in msg and "post-LN" in msg and "direct effect through W_U" in msg, msg
    rc, _, err = run(capsys, "scan", save(model, tmp_path / "opt-post-ln"), "--store", tmp_path / "store")
    assert rc == 2
    assert_one_error_line(rc, err, "post-LN", "do_layer_norm_before=false", "direct effect through W_U")


def test_opt_project_out_is_refused(tmp_path, capsys):
    model = tiny("opt", 2, word_embed_proj_dim=32)  # opt-350m's project_in / project_out, pre-LN here
    with pytest.raises(UnsupportedModel, match="word_embed_proj_dim=32 != hidden_size=64"):
        from_model(model, make_tokenizer())
    rc, _, err = run(capsys, "scan", save(model, tmp_path / "opt-proj"), "--store", tmp_path / "store")
    assert_one_error_line(rc, err, "project_out")
