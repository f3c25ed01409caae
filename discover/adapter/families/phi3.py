"""Phi-3 / Phi-3.5 / Phi-4 / Phi-4-mini (`phi3`): a Llama-like decoder whose gated MLP keeps
gate and up in ONE fused `gate_up_proj` (2N, d_model). transformers' Phi3MLP does
`gate, up = gate_up_proj(x).chunk(2, -1)` then `up * act(gate)`: the gate is the FIRST half of
the rows, up the second, and the activation is the input of `down_proj`, as for Llama. RMSNorm
before the MLP (`post_attention_layernorm`) and at the end (`model.norm`); untied `lm_head`."""

from discover.adapter.families.base import Family


class Phi3(Family):
    name = "phi3"
    model_types = ("phi3",)
    label = "Phi-3/3.5/4 (phi3)"
    in_proj, up_proj, out_proj = "gate_up_proj", "gate_up_proj", "down_proj"

    # Row slices of the fused parameter are views of it, so a caller that writes into them (the
    # tests plant neurons that way) writes into the model; the view copies before it reads.
    def _half(self, t, which: int):
        if t is None:
            return None
        n = t.shape[0] // 2
        return t[:n] if which == 0 else t[n:]

    def w_in(self, mlp):
        return self._half(mlp.gate_up_proj.weight, 0)

    def w_up(self, mlp):
        return self._half(mlp.gate_up_proj.weight, 1)

    def b_in(self, mlp):
        return self._half(getattr(mlp.gate_up_proj, "bias", None), 0)

    def b_up(self, mlp):
        return self._half(getattr(mlp.gate_up_proj, "bias", None), 1)
