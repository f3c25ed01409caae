"""Llama-style decoders with a gated (SwiGLU) MLP: `act(gate_proj x) * up_proj x` into
`down_proj`, RMSNorm before the MLP and at the end. Mistral, Qwen2 and Qwen3 (whose q/k norms
change attention, not the MLP) share the layout."""

from discover.adapter.families.base import Family


class Llama(Family):
    name = "llama"
    model_types = ("llama", "mistral", "qwen2", "qwen3")
    label = "Llama, Mistral, Qwen2, Qwen3"
