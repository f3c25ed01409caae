"""Gemma 1, 2, 3 (text) and 3 (inside Gemma3ForConditionalGeneration): the family checks of
family_checks.py, and what is Gemma's own: (1 + w) norm gains, the unscaled unembedding beside
the sqrt(d_model)-scaled embedding, and Gemma 2's final logit soft-cap."""

from __future__ import annotations

import pytest
import torch
import family_checks as fc

from discover.adapter import from_model, family_for
from discover.errors import UnsupportedModel

ARCHS = ["gemma", "gemma2", "gemma3_text", "gemma3"]
# sliding and full layers mixed, with a window (4) shorter than the prompts, so it matters
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention"]


def tiny(arch: str, n_layer: int = 3, softcap: float | None = None, head_scale: float = 1.0, **extra):
    """A random tiny Gemma of `arch` (final_logit_softcapping=`softcap` for gemma2/3); `head_scale`
    multiplies the (tied) embedding and head, for logits large enough for a cap to bite."""
    import transformers as tf

    kw = dict(num_hidden_layers=n_layer, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              intermediate_size=128, vocab_size=97, max_position_embeddings=32, pad_token_id=0, bos_token_id=0,
              eos_token_id=0, **extra)
    if arch != "gemma":
        kw.update(sliding_window=4, layer_types=(LAYER_TYPES * n_layer)[:n_layer], final_logit_softcapping=softcap)
    if arch == "gemma":
        model = tf.GemmaForCausalLM(tf.GemmaConfig(**kw))
    elif arch == "gemma2":
        model = tf.Gemma2ForCausalLM(tf.Gemma2Config(**kw))
    elif arch == "gemma3_text":
        model = tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**kw))
    else:  # the multimodal wrapper, with a one-layer SigLIP tower that text-only runs never call
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                      patch_size=14)
        cfg = tf.Gemma3Config(text_config=kw, vision_config=vision, mm_tokens_per_image=4, image_token_id=96,
                              boi_token_id=94, eoi_token_id=95)
        model = tf.Gemma3ForConditionalGeneration(cfg)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(head_scale)
    return fc.randomise_norms(model)


# -- the generic family checks -------------------------------------------------------------
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


# -- Gemma's own conventions ----------------------------------------------------------------
def _apply(norm, x):
    """A NormParams as the view describes it, applied by hand (RMSNorm: no bias)."""
    assert norm.kind == "rmsnorm" and norm.bias is None
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight


@pytest.mark.parametrize("arch", ARCHS)
def test_norms_are_one_plus_w_and_feed_the_mlp(arch):
    """Every norm the view describes acts as x / rms(x) * (1 + w), on the module the model runs;
    the pre-MLP norm's output is what the MLP reads; the activation is the MLP's own."""
    model = tiny(arch)
    view = from_model(model, None)
    ins, outs, mlp_in = {}, {}, {}
    mods = {"final": view.model.get_submodule(view.final_norm_site())}
    for l in range(view.n_layers):
        mods[("pre", l)] = view.arch.mlp_norm(view.blocks[l])
        if view.arch.post_mlp_norm(view.blocks[l]) is not None:
            mods[("post", l)] = view.arch.post_mlp_norm(view.blocks[l])
    assert (arch != "gemma") == (("post", 0) in mods)  # Gemma 2/3 norm the MLP's output, Gemma 1 does not

    def keep(k):
        def hook(m, a, o):  # returns None: the module's output is left as it is
            ins[k], outs[k] = a[0], o
        return hook

    hooks = [m.register_forward_hook(keep(k)) for k, m in mods.items()]
    hooks += [view.model.get_submodule(view.mlp_site(l)).register_forward_pre_hook(
        lambda m, a, l=l: mlp_in.__setitem__(l, a[0])) for l in range(view.n_layers)]
    try:
        with torch.no_grad():
            view.model.base_model(input_ids=torch.randint(0, 97, (2, 9)))
    finally:
        for h in hooks:
            h.remove()
    for k, mod in mods.items():
        p = view.final_norm() if k == "final" else (view.mlp_norm(k[1]) if k[0] == "pre" else view.post_mlp_norm(k[1]))
        torch.testing.assert_close(p.weight, mod.weight.detach() + 1.0)  # the stored w is centred on 0
        assert (p.weight - 1.0).abs().max() > 0.05  # randomised: a gain of w would fail above
        torch.testing.assert_close(_apply(p, ins[k]), outs[k], atol=1e-5, rtol=1e-5)
    for l in range(view.n_layers):
        torch.testing.assert_close(mlp_in[l], outs[("pre", l)])
        x = torch.randn(50)
        torch.testing.assert_close(view.activation_fn()(x), view._mlp(l).act_fn(x))
    assert view.act_name == "gelu_pytorch_tanh"


@pytest.mark.parametrize("arch", ARCHS)
def test_unembedding_is_the_unscaled_head(arch):
    """W_U is lm_head's weight (tied to the raw embedding); the sqrt(d_model) scale is applied by
    the embedding's forward only, and view.logits(final hidden) is the model's own logits."""
    model = tiny(arch)
    view = from_model(model, None)
    emb = model.get_input_embeddings()
    torch.testing.assert_close(view.W_U(), model.get_output_embeddings().weight.detach().T)
    torch.testing.assert_close(view.W_U(), emb.weight.detach().T)  # tied, and not multiplied by 8
    ids = torch.randint(1, 97, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(emb(ids), emb.weight[ids] * 64 ** 0.5)
        want = model(ids).logits
        torch.testing.assert_close(view.logits(view.trace(ids).hidden), want, atol=1e-5, rtol=1e-5)
    from discover.activations import model_context

    assert model_context(view) == 32  # the language model's positions, inside a multimodal wrapper too


@pytest.mark.parametrize("arch,cap", [("gemma2", 5.0), ("gemma3_text", 5.0), ("gemma3", None)])
def test_logits_are_capped_as_the_model_caps(arch, cap):
    """final_logit_softcapping=5: Gemma2/Gemma3ForCausalLM cap, so view.logits caps and equals
    the model's (capped) logits; Gemma3ForConditionalGeneration ignores the setting, so do we."""
    model = tiny(arch, softcap=5.0, head_scale=20.0)
    view = from_model(model, None)
    assert view.logit_softcap() == cap
    ids = torch.randint(1, 97, (2, 10))
    with torch.no_grad():
        hidden = view.trace(ids).hidden
        pre = model.get_output_embeddings()(hidden)
        got, want = view.logits(hidden), model(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if cap:
        assert pre.abs().max() > 6.0 and got.abs().max() <= 5.0  # the cap really bites
    else:
        torch.testing.assert_close(got, pre)


def test_softcapped_gemma2_patches_in_pre_cap_logits():
    """With a cap of 5, batched patching equals the hooked loop, both in pre-cap logits, and the
    clean / corrupted metrics are pre-cap logit differences (not the capped ones)."""
    from discover.patch import PatchConfig, patch_neurons

    model = tiny("gemma2", n_layer=2, softcap=5.0, head_scale=100.0)
    fc.batched_patching_equals_loop(model, "last")
    view = from_model(model, fc.make_tokenizer())
    res = patch_neurons(view, fc.CLEAN, fc.CORRUPT, "an", "a", PatchConfig(positions="last"), attribution=False)
    an, a = fc.AN, fc.VOCAB.index("a")
    with torch.no_grad():
        hidden = view.trace(torch.tensor([res.clean_tokens])).hidden[0, -1]
        pre, capped = model.get_output_embeddings()(hidden), view.logits(hidden)
    assert abs(res.m_clean - float(pre[an] - pre[a])) < 1e-4
    assert abs(float(pre[an] - pre[a]) - float(capped[an] - capped[a])) > 1e-3  # the two would differ


@pytest.mark.parametrize("arch", ["gemma", "gemma3_text", "gemma3"])
def test_bidirectional_gemma_is_refused(arch):
    """EmbeddingGemma-style configs (use_bidirectional_attention) predict no next token."""
    cfg = {"model_type": arch, "use_bidirectional_attention": True}
    if arch == "gemma3":
        cfg = {"model_type": arch, "text_config": {"model_type": "gemma3_text", "use_bidirectional_attention": True}}
    with pytest.raises(UnsupportedModel, match="bidirectionally"):
        family_for(cfg)
    assert family_for({**cfg, "use_bidirectional_attention": False, "text_config": {}}).name.startswith("gemma")


def test_legacy_gemma_gelu_is_the_tanh_gelu():
    """Gemma 1 checkpoints say hidden_act="gelu"; GemmaConfig maps it to the tanh approximation
    GemmaMLP runs, and the family reads the mapped value."""
    from transformers import GemmaConfig

    cfg = GemmaConfig(hidden_act="gelu", num_hidden_layers=1, hidden_size=64, intermediate_size=128, vocab_size=97)
    assert family_for(cfg).act_name(cfg) == "gelu_pytorch_tanh"
