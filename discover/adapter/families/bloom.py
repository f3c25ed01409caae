"""BLOOM: `transformer.h`, LayerNorm before attention (`input_layernorm`) and before the MLP
(`post_attention_layernorm`), `dense_h_to_4h` -> BLOOM's tanh-approximated GELU ->
`dense_4h_to_h`, final `transformer.ln_f`, unembedding tied to the word embeddings.

Conventions:
- The activation is the input of `dense_4h_to_h`, `bloom_gelu_forward(dense_h_to_4h(x))`. BLOOM
  has no activation key in its config; the function is fixed in `BloomMLP` (named `bloom_gelu`).
- `word_embeddings_layernorm` acts on the embeddings before block 0: it is part of how the
  residual stream starts, not of any neuron's weights.
- ALiBi is a per-row tensor (batch * heads, 1, key) that the model builds once and passes to
  every block: `expand_block_kwargs` repeats the recorded row for a batch of edited streams.
- `pretraining_tp > 1` together with `slow_but_exact` is refused: `BloomMLP` then multiplies
  slices of `dense_4h_to_h.weight` without calling the module, so no hook on it sees (or can
  replace) the activation.
"""

from discover.adapter.families.base import Family
from discover.errors import UnsupportedModel


class Bloom(Family):
    name = "bloom"
    model_types = ("bloom",)
    label = "BLOOM (bloom)"
    blocks_paths = ("transformer.h",)
    final_norm_paths = ("transformer.ln_f",)
    in_proj, up_proj, out_proj = "dense_h_to_4h", None, "dense_4h_to_h"
    mlp_norm_path = "post_attention_layernorm"
    norm_kind = "layernorm"
    act_key = None  # no config key: BloomMLP always applies BloomGelu

    def check_config(self, cfg: dict, where: str) -> None:
        at = f" in {where}" if where else ""
        if cfg.get("apply_residual_connection_post_layernorm"):
            # every block carries ln(x), not x, forward: the stream is renormalised at each block
            raise UnsupportedModel(
                f"this BLOOM config{at} sets apply_residual_connection_post_layernorm: each block passes its "
                "LayerNorm's output on as the residual stream, so a neuron's write is renormalised by every "
                "later block and its direct effect through W_U is not defined (as for post-LN OPT); released "
                "BLOOM checkpoints leave it false")
        if (cfg.get("pretraining_tp") or 1) > 1 and cfg.get("slow_but_exact"):
            raise UnsupportedModel(
                f"this BLOOM config{at} sets pretraining_tp={cfg['pretraining_tp']} with slow_but_exact: its MLP "
                "multiplies slices of dense_4h_to_h's weight without calling the module, so the neuron "
                "activations cannot be read or patched; set \"slow_but_exact\": false in config.json (the same "
                "sum, computed in one matmul)")

    def act_name(self, config) -> str:
        return "bloom_gelu"

    def activation_fn(self, config):
        # BloomGelu wraps this in an autograd Function (a hand-written backward); the forward is it.
        from transformers.models.bloom.modeling_bloom import bloom_gelu_forward

        return bloom_gelu_forward

    def expand_block_kwargs(self, kwargs: dict, batch: int) -> dict:
        # Recorded on one row, `alibi` is (heads, 1, key); BloomAttention views the scores as
        # (batch * heads, q, key), batch-major as the model's own `alibi.repeat(batch, 1, 1)`.
        alibi = kwargs.get("alibi")
        if alibi is None:
            return kwargs
        return {**kwargs, "alibi": alibi.repeat(batch, 1, 1)}
