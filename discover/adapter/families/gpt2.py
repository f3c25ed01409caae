"""GPT-2: `transformer.h`, Conv1D projections stored (in, out), LayerNorm, tied unembedding."""

from discover.adapter.families.base import Family


class GPT2(Family):
    name = "gpt2"
    model_types = ("gpt2",)
    label = "GPT-2 (gpt2)"
    blocks_paths = ("transformer.h",)
    final_norm_paths = ("transformer.ln_f",)
    in_proj, up_proj, out_proj = "c_fc", None, "c_proj"
    conv1d = True  # Conv1D stores (in, out): c_fc is (d_model, neuron), c_proj (neuron, d_model)
    mlp_norm_path = "ln_2"
    norm_kind = "layernorm"
    act_key = "activation_function"

    def act_name(self, config) -> str:
        return config.activation_function
