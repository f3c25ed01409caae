"""OLMo (`olmo`, the first release): Llama's layout (`model.layers`, gated SwiGLU MLP
`act(gate_proj x) * up_proj x` into `down_proj`) with a *non-parametric* LayerNorm before
attention, before the MLP and at the end: `OlmoLayerNorm` has no weight and no bias, so every gain
is ones and every bias zero (the base `Family.norm` reads a missing weight as ones), and its eps
is hard-coded to 1e-5 (the base default, since the module stores none). It is still a LayerNorm:
`norm_kind = "layernorm"`, so W_out and U are centred over d_model, and W_in is centred too
(folding a gain of ones changes nothing else)."""

from discover.adapter.families.base import Family


class Olmo(Family):
    name = "olmo"
    model_types = ("olmo",)
    label = "OLMo (olmo)"
    mlp_norm_path = "post_attention_layernorm"  # the weightless LayerNorm the MLP reads
    norm_kind = "layernorm"
