"""GPT-J (`gptj`): `transformer.h`, attention and MLP in parallel on ONE shared LayerNorm
(`ln_1`), `x + attn(ln_1(x)) + mlp(ln_1(x))`, so the MLP's norm is `ln_1` (folded into W_in).
`fc_in`/`fc_out` are nn.Linear (not GPT-2's Conv1D); final norm `transformer.ln_f`. The untied
`lm_head` has a bias, constant per token: left out of per-neuron numbers (W_U is the weight
only; patching's logit-difference metric includes it)."""

from discover.adapter.families.base import Family


class GPTJ(Family):
    name = "gptj"
    model_types = ("gptj",)
    label = "GPT-J (gptj)"
    blocks_paths = ("transformer.h",)
    final_norm_paths = ("transformer.ln_f",)
    in_proj, up_proj, out_proj = "fc_in", None, "fc_out"
    mlp_norm_path = "ln_1"  # shared with attention: the block has no ln_2
    norm_kind = "layernorm"
    act_key = "activation_function"
    parallel = True
