"""GPT-Neo (`gpt_neo`): GPT-2's layout (`transformer.h`, `ln_1` -> attention, `ln_2` -> MLP,
`transformer.ln_f`, unembedding tied to `wte`) but `c_fc`/`c_proj` are nn.Linear, stored
(out, in), not GPT-2's Conv1D. Local (sliding-window) and global attention layers alternate;
the block builds its own window from a per-layer buffer, so rerunning a block with its recorded
arguments reproduces it and nothing here needs to know which layer is which."""

from discover.adapter.families.base import Family


class GPTNeo(Family):
    name = "gpt_neo"
    model_types = ("gpt_neo",)
    label = "GPT-Neo (gpt_neo)"
    blocks_paths = ("transformer.h",)
    final_norm_paths = ("transformer.ln_f",)
    in_proj, up_proj, out_proj = "c_fc", None, "c_proj"
    mlp_norm_path = "ln_2"
    norm_kind = "layernorm"
    act_key = "activation_function"
