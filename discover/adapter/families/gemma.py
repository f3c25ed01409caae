"""Gemma 1, 2 and 3 (transformers' `gemma`, `gemma2`, `gemma3_text`, and `gemma3`, the language
model inside Gemma3ForConditionalGeneration).

Conventions (what changes the per-neuron numbers):

- Gated MLP `act(gate_proj x) * up_proj x` into `down_proj`; the activation is tanh-approximated
  GELU (`gelu_pytorch_tanh`), read from the config key the MLP itself reads: `hidden_act` in
  Gemma 1, `hidden_activation` in Gemma 2 and 3.
- Every RMSNorm multiplies by `1 + w` (weights are stored centred on zero): block norms, the
  final norm, Gemma 3's q/k norms and its multimodal projector's norm alike, so the effective
  gain is `w + 1` (`gain_offset`) wherever a gain is folded.
- The MLP reads `post_attention_layernorm` (Gemma 1) or `pre_feedforward_layernorm` (Gemma 2/3).
  Gemma 2/3 also norm the MLP's output (`post_feedforward_layernorm`) before the residual add:
  a neuron's weight-only direction is `g_post * w_out[n]`, and patching goes through that norm.
- The input embedding is multiplied by sqrt(d_model) inside the embedding module's forward, so
  it never touches the weights: `W_U` is the lm_head weight (tied to the raw embedding), unscaled.
- Gemma 2's final tanh soft-cap (`final_logit_softcapping`) is applied by the head's caller, not
  the head: per-neuron effects are pre-cap logits; only `ModelView.logits` caps (probabilities).
  Gemma3ForCausalLM caps too where its config sets it; Gemma3ForConditionalGeneration never caps
  (its forward ignores the setting), so neither do we there.
"""

from discover.adapter.families.base import Family
from discover.errors import UnsupportedModel

LABEL = "Gemma 1/2/3 (gemma, gemma2, gemma3_text, gemma3)"


class Gemma(Family):
    """Gemma 1: Llama's layout with (1 + w) norms."""

    name = "gemma"
    model_types = ("gemma",)
    label = LABEL
    gain_offset = 1.0  # GemmaRMSNorm: x / rms(x) * (1 + w)
    act_key = "hidden_act"  # GemmaMLP reads hidden_act (the config maps legacy "gelu" to the tanh GELU)

    def check_config(self, cfg: dict, where: str) -> None:
        tc = cfg.get("text_config") or cfg
        if tc.get("use_bidirectional_attention"):
            at = f" in {where}" if where else ""
            raise UnsupportedModel(f"this {self.model_type} model{at} attends bidirectionally (an encoder such as "
                                   "EmbeddingGemma), not causally: it predicts no next token; use a causal Gemma")


class Gemma2(Gemma):
    """Gemma 2 and Gemma 3 (text): a norm before and a norm after both attention and MLP."""

    name = "gemma2"
    model_types = ("gemma2", "gemma3_text")
    mlp_norm_path = "pre_feedforward_layernorm"
    post_mlp_norm_path = "post_feedforward_layernorm"
    act_key = "hidden_activation"  # Gemma2MLP / Gemma3MLP read hidden_activation, not hidden_act

    def logit_softcap(self, config) -> float | None:
        return getattr(self.text_config(config), "final_logit_softcapping", None) or None


class Gemma3(Gemma2):
    """Gemma3ForConditionalGeneration: the Gemma 3 text model under `model.language_model`,
    its config under `text_config`; the vision tower only fills image-token embeddings."""

    name = "gemma3"
    model_types = ("gemma3",)
    blocks_paths = ("model.language_model.layers",)
    final_norm_paths = ("model.language_model.norm",)

    def text_config(self, config):
        return config.text_config

    def logit_softcap(self, config) -> float | None:
        # Gemma3ForConditionalGeneration.forward returns lm_head(hidden) as is, whatever
        # text_config.final_logit_softcapping says: match the model, not the config
        return None
