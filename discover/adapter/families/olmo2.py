"""OLMo 2 and OLMo 3 (`olmo2`, `olmo3`): Llama's blocks and gated SwiGLU MLP, but the norms sit
*after* each sublayer (inside the residual branch): `x + post_attention_layernorm(attn(x))`, then
`x + post_feedforward_layernorm(mlp(x))`, all RMSNorm with a gain, plus a final RMSNorm.

- There is no norm before the MLP (`mlp_norm_path = None`): neurons read the raw residual
  stream, so W_in gets no gain folded in and is not centred.
- The post-feedforward RMSNorm writes `g_post * m / rms(m)` for the layer's MLP output m: the
  weight-only direction of neuron n is `g_post * w_out[n]` (folded in `processed_W_out`); the
  1/rms(m) is per token, shared by the layer's neurons and data dependent (METHODS.md).
- OLMo 3 differs only in attention (sliding-window layers with their own rotary tables); the
  blocks are replayed with the arguments the model recorded, so that needs nothing here.
- The q/k RMSNorms act inside attention, not on the MLP."""

from discover.adapter.families.base import Family


class Olmo2(Family):
    name = "olmo2"
    model_types = ("olmo2", "olmo3")
    label = "OLMo 2, OLMo 3 (olmo2, olmo3)"
    mlp_norm_path = None  # the MLP reads the residual stream as is
    post_mlp_norm_path = "post_feedforward_layernorm"
    norm_kind = "rmsnorm"
