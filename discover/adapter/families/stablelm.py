"""StableLM (`stablelm`: StableLM-2, StableLM-3B-4E1T, StableCode): Llama's blocks and gated
SwiGLU MLP (`act(gate_proj x) * up_proj x` into `down_proj`) with LayerNorms (gain and bias)
before attention, before the MLP and at the end.

With `use_parallel_residual` (StableLM-2-12B) a block computes `x + attn(ln1(x)) + mlp(ln1(x))`:
the MLP reads `input_layernorm`, the same norm attention reads, and the block has no
`post_attention_layernorm` at all. Otherwise (the sequential default) the MLP reads
`post_attention_layernorm` of the residual stream after attention. `mlp_norm` picks per block.
The optional per-head q/k LayerNorms (`qk_layernorm`) act inside attention, not on the MLP."""

from discover.adapter.families.base import Family


class StableLm(Family):
    name = "stablelm"
    model_types = ("stablelm",)
    label = "StableLM (stablelm)"
    norm_kind = "layernorm"

    def check_config(self, cfg: dict, where: str) -> None:
        self.parallel = bool(cfg.get("use_parallel_residual", False))  # informational: as GPT-J, Phi-2

    def mlp_norm(self, block):
        # parallel blocks build no post_attention_layernorm: the MLP shares attention's input norm
        return block.input_layernorm if getattr(block, "use_parallel_residual", False) else block.post_attention_layernorm
