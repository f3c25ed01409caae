"""OPT (`opt`, pre-LN sizes: 125m, 1.3b, 2.7b, 6.7b, 13b, 30b, 66b): `model.decoder.layers`,
LayerNorm (gain and bias) before attention (`self_attn_layer_norm`), before the MLP
(`final_layer_norm` of each layer, despite its name) and at the end
(`model.decoder.final_layer_norm`); plain `fc1 -> relu -> fc2` MLP with biases; the head is tied
to the token embedding.

The MLP is not a submodule: `fc1` and `fc2` live on the decoder layer itself, so `mlp_path` is
"" (`block.get_submodule("")` is the block) and module paths must skip that empty segment. The
layer flattens its hidden states to (batch*pos, d_model) before `final_layer_norm` and views
them back after the residual add, so the activation site's input is (batch*pos, neuron), not
(batch, pos, neuron).

Refused, with the reason (`check_config`):
- post-LN (`do_layer_norm_before=False`, opt-350m): the LayerNorm after each block renormalises
  the whole residual stream, so a neuron's write is rescaled (and re-centred, re-gained) by
  every later block's norm: there is no fixed direct path `w_out -> final norm -> W_U` to read
  a neuron's logit effect from weights;
- `word_embed_proj_dim != hidden_size` (opt-350m again): `project_out` maps the final hidden
  state to the embedding width after the final norm (the unembedding is `W_U @ P_out`) and
  `project_in` before the first block; the view's final norm -> `W_U` path has no slot for it;
- `_remove_final_layer_norm` (checkpoints fine-tuned before transformers 4.20.1): no final norm.
"""

from discover.adapter.families.base import Family
from discover.errors import UnsupportedModel


class OPT(Family):
    name = "opt"
    model_types = ("opt",)
    label = "OPT, pre-LN (opt)"
    blocks_paths = ("model.decoder.layers",)
    final_norm_paths = ("model.decoder.final_layer_norm",)
    mlp_path = ""  # fc1/fc2 hang off the decoder layer itself
    in_proj, up_proj, out_proj = "fc1", None, "fc2"
    mlp_norm_path = "final_layer_norm"  # the layer's pre-MLP norm (the model's final one is elsewhere)
    norm_kind = "layernorm"
    act_key = "activation_function"
    d_mlp_key = "ffn_dim"

    def check_config(self, cfg: dict, where: str) -> None:
        at = f" in {where}" if where else ""
        if not cfg.get("do_layer_norm_before", True):
            raise UnsupportedModel(
                f"post-LN OPT{at} (do_layer_norm_before=false, e.g. opt-350m) is refused: the LayerNorm after "
                "each block rescales the whole residual stream, so a neuron's direct effect through W_U is "
                "not defined as it is for pre-LN models; use a pre-LN OPT (125m, 1.3b, 2.7b, ...)")
        d, proj = cfg.get("hidden_size"), cfg.get("word_embed_proj_dim")
        if proj is not None and d is not None and proj != d:
            raise UnsupportedModel(
                f"OPT{at} with word_embed_proj_dim={proj} != hidden_size={d} is refused: its project_out "
                "after the final norm is not part of the unembedding the analysis reads")
        if cfg.get("_remove_final_layer_norm", False):
            raise UnsupportedModel(f"OPT{at} without a final LayerNorm (_remove_final_layer_norm) is refused")
