"""OLMo (weightless LayerNorm) and OLMo 2 / OLMo 3 (no pre-MLP norm, post-feedforward RMSNorm):
the family checks of family_checks.py on tiny random models built from config.

`matches_transformerlens_tl43` (also used by test_family_opt_stablelm.py) is
`family_checks.matches_transformerlens` with two TransformerLens 4.3 conventions undone; see
its docstring for why each leaves every activation and logit difference unchanged."""

from __future__ import annotations

import copy

import pytest
import torch
import family_checks as fc
from conftest import make_tokenizer, save

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


def matches_transformerlens_tl43(model, tmp_path):
    """Processed W_U, W_out, W_gate / W_in and hook_post equal TransformerLens 4.3's, as
    `family_checks.matches_transformerlens` (same tolerances, same comparisons), once two TL
    conventions are undone on TL's side:

    - gate centring: folding a LayerNorm, TL centres W_in over d_model but never W_gate
      (`ProcessWeights._fold_mlp_layer_norm`); ours centres both. The normed input has zero mean
      over d_model, so both give the same pre-activations: TL's gate is compared centred.
    - final-norm fold: TL folds ln_final into W_U only where ln_final has a weight tensor and the
      adapter supports fold_ln. OLMo's weightless LayerNorm has none, so TL skips the fold *and*
      its centring over d_model; the OLMo 2/3 adapters set `supports_fold_ln = False` (their
      sublayer norms come after the sublayer), which leaves the final RMSNorm gain unfolded too.
      We fold it (`U = diag(g_f) W_U`, METHODS.md), so TL's W_U is compared as
      `g_f * W_U` (it is already centred over the vocabulary, and g_f scales d_model rows,
      so the order does not matter), centred over d_model for LayerNorm models.
    """
    from transformer_lens.model_bridge import TransformerBridge

    tol = dict(rtol=1e-4, atol=1e-5)
    ids = torch.tensor([[3, 4, 6, 11, 12, 9, 10, 2]])
    model_dir = save(model, tmp_path / "tl")
    view = from_model(model, make_tokenizer())
    bridge = TransformerBridge.boot_transformers(str(model_dir), hf_model=copy.deepcopy(model),
                                                 tokenizer=make_tokenizer(), device="cpu")
    bridge.enable_compatibility_mode(disable_warnings=True, fold_ln=True, center_writing_weights=True,
                                     center_unembed=True)
    fn = view.final_norm()
    with torch.no_grad():
        W_U = bridge.W_U[:, :view.d_vocab]
        if not getattr(bridge.adapter, "supports_fold_ln", True):
            W_U = fn.weight[:, None] * W_U
        if fn.kind == "layernorm":
            W_U = W_U - W_U.mean(0, keepdim=True)  # a no-op where TL folded (and centred) itself
        torch.testing.assert_close(W_U, view.processed_unembed(), **tol)
        for layer in range(view.n_layers):
            mlp = bridge.blocks[layer].mlp
            W_out = view.processed_W_out(layer)
            post = view.post_mlp_norm(layer)
            if post is not None:  # TL keeps W_out raw: its ln2_post sees the MLP's output
                W_out = W_out / post.weight[None, :]
            torch.testing.assert_close(mlp.W_out, W_out, **tol)
            norm = view.mlp_norm(layer)
            gate = mlp.W_gate if view.gated else mlp.W_in  # (d_model, neuron)
            if norm is not None and norm.kind == "layernorm":
                gate = gate - gate.mean(0, keepdim=True)
            torch.testing.assert_close(gate, view.processed_W_in(layer).T, **tol)
            if view.gated:
                torch.testing.assert_close(mlp.W_in, view.processed_W_in(layer, "up").T, **tol)
        acts = {}
        handles = [view.model.get_submodule(view.act_site(l)).register_forward_pre_hook(
            lambda m, a, l=l: acts.__setitem__(l, a[0].detach().clone())) for l in range(view.n_layers)]
        try:
            view.model(ids)
        finally:
            for h in handles:
                h.remove()
        _, cache = bridge.run_with_cache(ids)
        for layer in range(view.n_layers):
            torch.testing.assert_close(cache[f"blocks.{layer}.mlp.hook_post"], acts[layer], **tol)


@pytest.mark.parametrize("arch", ARCHS)
def test_matches_transformerlens(arch, tmp_path):
    matches_transformerlens_tl43(tiny(arch), tmp_path)

