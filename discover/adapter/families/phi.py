"""Phi-1, Phi-1.5, Phi-2 (`phi`): attention and MLP run in parallel on ONE shared LayerNorm
(`input_layernorm`) of the residual stream, `x + attn(ln(x)) + mlp(ln(x))`, so the MLP's norm is
that shared norm and its gain and bias fold into W_in. Plain `fc1 -> act -> fc2` MLP; final
norm `model.final_layernorm`. `lm_head` has a bias: it adds the same vector to every position's
logits whatever the neurons do, so it is no part of any per-neuron number (W_U is the head's
weight only; patching's logit-difference metric includes it)."""

from discover.adapter.families.base import Family


class Phi(Family):
    name = "phi"
    model_types = ("phi",)
    label = "Phi-1/1.5/2 (phi)"
    final_norm_paths = ("model.final_layernorm",)
    in_proj, up_proj, out_proj = "fc1", None, "fc2"
    mlp_norm_path = "input_layernorm"  # shared with attention: the block has no second norm
    norm_kind = "layernorm"
    parallel = True
