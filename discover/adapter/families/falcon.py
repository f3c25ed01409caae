"""Falcon: `transformer.h`, `dense_h_to_4h` -> `act` (config key `activation`, GELU in every
released checkpoint) -> `dense_4h_to_h` (FalconLinear, an nn.Linear: weights (out, in); biases
only with `bias`), final `transformer.ln_f`, unembedding tied by default. Rotary or ALiBi.

Which LayerNorm the MLP reads depends on the layout (FalconDecoderLayer.forward):
- new decoder architecture, two norms (Falcon-40B/180B; `num_ln_in_parallel_attn` 2 or unset):
  `ln_attn` for attention, `ln_mlp` for the MLP, both of the same residual stream;
- new decoder architecture, one norm (`num_ln_in_parallel_attn=1`, Falcon2-11B), and the old
  parallel layout (`parallel_attn`, Falcon-7B): `input_layernorm`, shared with attention;
- sequential (`parallel_attn=False`, Falcon-RW): `post_attention_layernorm`, after attention's add.
The norm is picked by which of these modules the block has (the modules the layer builds are
exactly the ones its forward reads, for the layouts `check_config` accepts).

With `alibi`, the model passes every block an `alibi` tensor with one row per sequence (and folds
it into `attention_mask` too, as (1, heads, q, key), which broadcasts): `expand_block_kwargs`
repeats that row for a batch of edited streams.
"""

from discover.adapter.families.base import Family, submodule
from discover.errors import UnsupportedModel

#: the MLP's norm, by layout, most specific first (see the module docstring)
_MLP_NORMS = ("ln_mlp", "post_attention_layernorm", "input_layernorm")


class Falcon(Family):
    name = "falcon"
    model_types = ("falcon",)
    label = "Falcon (falcon)"
    blocks_paths = ("transformer.h",)
    final_norm_paths = ("transformer.ln_f",)
    in_proj, up_proj, out_proj = "dense_h_to_4h", None, "dense_4h_to_h"
    mlp_norm_path = None  # per layout: see mlp_norm
    norm_kind = "layernorm"
    act_key = "activation"

    def check_config(self, cfg: dict, where: str) -> None:
        at = f" in {where}" if where else ""
        new, par = bool(cfg.get("new_decoder_architecture")), cfg.get("parallel_attn", True)
        n_ln = cfg.get("num_ln_in_parallel_attn")
        # Combinations whose modules and forward disagree in transformers (the forward reads a
        # norm the layer never built, so the model cannot run): refused here with the reason.
        if new and not par:
            raise UnsupportedModel(f"this Falcon config{at} sets new_decoder_architecture with parallel_attn=false; "
                                   "transformers' FalconDecoderLayer cannot run that combination")
        if not new and par and n_ln == 2:
            raise UnsupportedModel(f"this Falcon config{at} sets num_ln_in_parallel_attn=2 without "
                                   "new_decoder_architecture; transformers' FalconDecoderLayer cannot run it")
        if new and n_ln not in (None, 1, 2):
            raise UnsupportedModel(f"this Falcon config{at} sets num_ln_in_parallel_attn={n_ln}; only 1 or 2 "
                                   "are defined")
        # informational: attention and MLP read the very same norm output (Falcon-7B, Falcon2-11B)
        self.parallel = bool(par) and (not new or n_ln == 1)

    def mlp_norm(self, block):
        for path in _MLP_NORMS:
            mod = submodule(block, path)
            if mod is not None:
                return mod
        raise UnsupportedModel(f"no MLP norm ({', '.join(_MLP_NORMS)}) in this Falcon block")

    def expand_block_kwargs(self, kwargs: dict, batch: int) -> dict:
        alibi = kwargs.get("alibi")
        if alibi is None:  # rotary: cos/sin and the mask broadcast over the batch
            return kwargs
        # (1, heads, 1, key) where the mask is 4-D (the model reshapes it to fold it in), else
        # (heads, 1, key); FalconAttention's eager path views it as (batch, heads, 1, key).
        alibi = alibi.expand(batch, *alibi.shape[1:]) if alibi.dim() == 4 else alibi.repeat(batch, 1, 1)
        return {**kwargs, "alibi": alibi}
