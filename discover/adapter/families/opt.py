"""OPT (`opt`, pre-LN sizes: 125m, 1.3b, 2.7b, 6.7b, 13b, 30b, 66b): `model.decoder.layers`,
LayerNorm (gain and bias) before attention (`self_attn_layer_norm`), before the MLP
(`final_layer_norm` of each layer, despite its name) and at the end
(`model.decoder.final_layer_norm`); plain `fc1 -> relu -> fc2` MLP with biases; the head is tied
to the token embedding.

The MLP is not a submodule: `fc1` and `fc2` live on the decoder layer itself, so `mlp_path` is
"" (`block.get_submodule("")` is the block) and module paths must skip that empty segment. The
layer flattens its hidden states to (batch*pos, d_model) before `final_layer_norm` and views
them back after the residual add, so the activation site's input is (batch*pos, neuron), not
(batch, pos, neuron). `site_module` returns `FlatSite`, a stand-in for such a module whose hooks
see (batch, pos, ...) tensors, as every other family's do (TransformerLens 4.3's OPT adapter
unflattens its MLP hooks the same way); `ModelView.act_module` routes hooks through it.

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


class _Handles:
    """Several hook handles removed as one."""

    def __init__(self, *handles):
        self.handles = handles

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class FlatSite:
    """A module that the decoder layer runs on (batch*pos, features) rows, with hooks that see
    (batch, pos, features): a pre-hook on the layer notes (batch, pos) for each call, the
    module's hooks view their tensors with that shape and flatten what they return."""

    def __init__(self, block, module):
        self.block, self.module = block, module

    def _stamp(self):
        bt = {}

        def note(_m, args, kwargs):
            bt["shape"] = tuple((args[0] if args else kwargs["hidden_states"]).shape[:2])
        return bt, self.block.register_forward_pre_hook(note, with_kwargs=True)

    def register_forward_pre_hook(self, hook):
        bt, stamp = self._stamp()

        def pre(m, args):
            x = args[0].view(*bt["shape"], args[0].shape[-1])  # (B, T, F), a view of the rows
            out = hook(m, (x,) + tuple(args[1:]))
            new = (x,) + tuple(args[1:]) if out is None else (out if isinstance(out, tuple) else (out,))
            # always pass the 3-D view on (flattened): a gradient taken w.r.t. what the hook saw
            # must find it in the graph
            return (new[0].reshape(-1, new[0].shape[-1]),) + tuple(new[1:])
        return _Handles(self.module.register_forward_pre_hook(pre), stamp)

    def register_forward_hook(self, hook):
        bt, stamp = self._stamp()

        def post(m, args, out):
            x = args[0].view(*bt["shape"], args[0].shape[-1])
            got = hook(m, (x,) + tuple(args[1:]), out.view(*bt["shape"], out.shape[-1]))
            return None if got is None else got.reshape(-1, got.shape[-1])
        return _Handles(self.module.register_forward_hook(post), stamp)


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

    def site_module(self, model, block, path: str):
        """What hooks on the module at `path` (inside `block`) must be registered on: for OPT a
        `FlatSite`, whose hooks see (batch, pos, ...) instead of the layer's flattened rows."""
        return FlatSite(block, model.get_submodule(path))

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
