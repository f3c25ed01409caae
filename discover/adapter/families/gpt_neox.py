"""GPT-NeoX / Pythia: `gpt_neox.layers`, untied `embed_out`, LayerNorm; with
`use_parallel_residual` attention and MLP read separate norms of the same residual stream, so the
MLP's norm is still `post_attention_layernorm`."""

from discover.adapter.families.base import Family


class GPTNeoX(Family):
    name = "gpt_neox"
    model_types = ("gpt_neox",)
    label = "GPT-NeoX/Pythia (gpt_neox)"
    blocks_paths = ("gpt_neox.layers",)
    final_norm_paths = ("gpt_neox.final_layer_norm",)
    in_proj, up_proj, out_proj = "dense_h_to_4h", None, "dense_4h_to_h"
    mlp_norm_path = "post_attention_layernorm"
    norm_kind = "layernorm"
