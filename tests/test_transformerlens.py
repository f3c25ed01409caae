"""Our weight processing equals TransformerLens' reference numerics (METHODS.md, "Weight processing").

TransformerLens 4.x has no HookedTransformer; its HookedTransformer-equivalent processing is
`TransformerBridge.boot_transformers(...)` followed by `enable_compatibility_mode()` (fold_ln,
center_writing_weights, center_unembed, fold_value_biases). The bridge boots offline from a local
directory when handed the HF model object, so it runs on the tiny random models of conftest.

Checked per architecture (all five families we support boot offline in TL 4.3.0):
- TL `W_U` (d_model, vocab)             == `processed_unembed()`
- TL `blocks.l.mlp.W_out` (d_mlp, d_model) == `processed_W_out(l)`
- TL `blocks.l.mlp.W_in` (d_model, d_mlp)  == `processed_W_in(l).T` (plain MLPs)
  TL `W_gate` == `processed_W_in(l).T` and TL `W_in` == `processed_W_in(l, "up").T` (gated MLPs)
- TL cache `blocks.l.mlp.hook_post` == the input of the HF module `view.act_site(l)`
  (the neuron activations our scanner records).

The bridge wraps (and, when processing, rewrites) the HF model it is given, so it gets a deep
copy; our view reads the untouched original.
"""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import make_model, make_tokenizer, save

tl = pytest.importorskip("transformer_lens")

ARCHS = ["gpt2", "gpt_neox", "llama", "mistral", "qwen2"]
TOL = dict(rtol=1e-4, atol=1e-5)
# Explicit ids (not a tokenizer call): AutoTokenizer on a qwen2 directory picks Qwen2Tokenizer and
# tokenizes our word-level vocabulary differently; the weights are what is under test here.
IDS = torch.tensor([[3, 4, 6, 11, 12, 9, 10, 2]])


def _bridge(model, model_dir):
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(
        str(model_dir), hf_model=copy.deepcopy(model), tokenizer=make_tokenizer(), device="cpu"
    )
    bridge.enable_compatibility_mode(
        disable_warnings=True, fold_ln=True, center_writing_weights=True, center_unembed=True
    )
    return bridge


@pytest.mark.parametrize("arch", ARCHS)
def test_processed_weights_and_activations_match_transformerlens(arch, tmp_path):
    from discover.adapter import ModelView

    model = make_model(arch)
    model_dir = save(model, tmp_path / arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    view = ModelView(model, make_tokenizer(), spec=str(model_dir), checkpoint_id="test")
    bridge = _bridge(model, model_dir)
    # TL processed its own copy; ours is untouched.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    with torch.no_grad():
        # The comparison is not vacuous: TL really processed the weights.
        assert not torch.allclose(bridge.W_U, view.W_U(), **TOL)
        torch.testing.assert_close(bridge.W_U, view.processed_unembed(), **TOL)
        for layer in range(view.n_layers):
            mlp = bridge.blocks[layer].mlp
            torch.testing.assert_close(mlp.W_out, view.processed_W_out(layer), **TOL)
            if view.gated:
                torch.testing.assert_close(mlp.W_gate, view.processed_W_in(layer).T, **TOL)
                torch.testing.assert_close(mlp.W_in, view.processed_W_in(layer, "up").T, **TOL)
            else:
                torch.testing.assert_close(mlp.W_in, view.processed_W_in(layer).T, **TOL)

        # Activations: the input of act_site (after the nonlinearity, and `* up` for gated MLPs).
        acts = {}
        handles = [
            view.model.get_submodule(view.act_site(layer)).register_forward_pre_hook(
                lambda mod, args, layer=layer: acts.__setitem__(layer, args[0].detach().clone())
            )
            for layer in range(view.n_layers)
        ]
        try:
            hf_logits = view.model(IDS).logits
        finally:
            for h in handles:
                h.remove()
        tl_logits, cache = bridge.run_with_cache(IDS)
        for layer in range(view.n_layers):
            post = cache[f"blocks.{layer}.mlp.hook_post"]
            assert post.shape == (1, IDS.shape[1], view.d_mlp)
            torch.testing.assert_close(post, acts[layer], **TOL)
        # Processing changes logits only by a per-position constant (center_unembed).
        torch.testing.assert_close(
            torch.log_softmax(tl_logits, -1), torch.log_softmax(hf_logits, -1), rtol=1e-4, atol=1e-4
        )
