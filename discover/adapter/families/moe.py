"""Mixtures of experts (`mixtral`, `olmoe`, `qwen2_moe`, `qwen3_moe`): Llama's blocks whose MLP
is a router over E experts, each a gated MLP `act(gate x) * up x` into `down`, plus (Qwen2-MoE)
a shared expert whose output is scaled by `sigmoid(shared_expert_gate x)`.

transformers 5 fuses the routed experts into two 3-D parameters, `experts.gate_up_proj`
(E, 2I, d_model; the gate is the first half of each expert's rows) and `experts.down_proj`
(E, d_model, I). The layer's neuron axis lays the experts end to end (expert e's neuron n at
`e * I + n`), then the shared expert's S neurons: `names.Layout` names them `L{l}.E{e}.N{n}` and
`L{l}.S.N{n}`. Per unit activation a neuron writes its `down` column, as a dense neuron does;
the routing weight (and the shared expert's sigmoid gate) is a per-token scalar, like a norm's
1/rms, so the weight statistics of the scan and `query token` are those of every expert.

The routed experts have no module whose input is their activation (the fused forward computes it
inline), so the corpus pass, patching and verification cannot hook them yet: `site_module`
refuses with one line. Layers must all be mixtures with one shape (Qwen's `mlp_only_layers` /
`decoder_sparse_step` mixes are refused)."""

from discover.adapter.families.base import Family
from discover.errors import UnsupportedModel


def _cat(parts):
    import torch

    return torch.cat([p for p in parts if p is not None], 0)


class MoE(Family):
    name = "moe"
    model_types = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe")
    label = "mixtures of experts: Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE (scan and query)"
    in_proj, up_proj, out_proj = "experts", "experts", "experts"

    def check_config(self, cfg: dict, where: str) -> None:
        at = f" in {where}" if where else ""
        if cfg.get("mlp_only_layers") or (cfg.get("decoder_sparse_step") or 1) != 1:
            raise UnsupportedModel(f"{self.model_type}{at} mixes dense and mixture-of-experts layers "
                                   "(mlp_only_layers / decoder_sparse_step); every layer must be a mixture")

    # -- the layer's neuron axis: experts end to end, then the shared expert ---------------
    def layout(self, model):
        from discover.names import Layout

        mlp = self.mlp(model.get_submodule(self.blocks_path(model))[0])
        E, twoI, _ = mlp.experts.gate_up_proj.shape
        shared = getattr(mlp, "shared_expert", None)
        return Layout(experts=int(E), expert_size=int(twoI // 2),
                      shared=0 if shared is None else int(shared.gate_proj.weight.shape[0]))

    @staticmethod
    def _shared(mlp):
        return getattr(mlp, "shared_expert", None)

    def w_in(self, mlp):
        g = mlp.experts.gate_up_proj  # (E, 2I, d): the gate is each expert's first I rows
        I = g.shape[1] // 2
        s = self._shared(mlp)
        return _cat([g[:, :I].reshape(-1, g.shape[2]), None if s is None else s.gate_proj.weight])

    def w_up(self, mlp):
        g = mlp.experts.gate_up_proj
        I = g.shape[1] // 2
        s = self._shared(mlp)
        return _cat([g[:, I:].reshape(-1, g.shape[2]), None if s is None else s.up_proj.weight])

    def w_out(self, mlp):
        d = mlp.experts.down_proj  # (E, d_model, I) -> (E * I, d_model)
        s = self._shared(mlp)
        return _cat([d.transpose(1, 2).reshape(-1, d.shape[1]), None if s is None else s.down_proj.weight.T])

    def b_in(self, mlp):
        return None

    def b_up(self, mlp):
        return None

    def b_out(self, mlp):
        return None

    def site_module(self, model, block, path: str):
        raise UnsupportedModel(
            f"the experts of {self.model_type} have no module whose input is their activation (transformers "
            "fuses them), so the corpus pass, patching and verification of mixture-of-experts models are not "
            "supported yet; scan and query work")
