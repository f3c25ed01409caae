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
inline). `MoESite` stands in for one: while a hook is registered on it, the block's output is
recomputed from its input with every neuron's activation `act(x W_in) * (x W_up)` laid out
(batch, pos, neuron) for the hooks to read or replace, and written through the routing the
router chose for that input: `sum_e w_e(x) * a_e W_out_e` (+ the shared expert's
`sigmoid(g x) * a_s W_out_s`). An activation is defined for every expert at every position (what
the expert computes there); a patched activation of an expert the token was not routed to
writes nothing (its weight is 0): patching holds the routing of the run it patches, as freezing a
norm's scale. Forward hooks also receive that scale: the corpus pass and verification count, for
each expert, only the tokens routed to it. Universality refuses in one line
(`require_correlations`). Layers must all be mixtures with one shape
(Qwen's `mlp_only_layers` / `decoder_sparse_step` mixes are refused)."""

from discover.adapter.families.base import Family
from discover.errors import UnsupportedModel


def _cat(parts):
    import torch

    return torch.cat([p for p in parts if p is not None], 0)


class MoE(Family):
    name = "moe"
    model_types = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe")
    label = "mixtures of experts: Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE (all but universality)"
    in_proj, up_proj, out_proj = "", "experts", "experts"  # the MoE block's input is what neurons read

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
        mlp = self.mlp(block)
        if path.endswith(".experts"):  # the activation site
            return MoESite(self, mlp)
        return model.get_submodule(path)

    def write_scale(self, mlp, x):
        """(tokens, neurons): what each neuron's activation is multiplied by before its W_out row
        is added, for input rows `x` (tokens, d_model): the routing weight of its expert (0 where
        the token is not routed there), the shared expert's sigmoid gate."""
        import torch

        E, twoI, _ = mlp.experts.gate_up_proj.shape
        I = twoI // 2
        _, weights, chosen = mlp.gate(x)  # (tokens, k) each
        per_expert = torch.zeros(x.shape[0], E, dtype=x.dtype, device=x.device)
        per_expert.scatter_add_(1, chosen, weights.to(x.dtype))
        scale = per_expert.repeat_interleave(I, dim=1)
        shared = self._shared(mlp)
        if shared is not None:
            g = torch.sigmoid(mlp.shared_expert_gate(x))  # (tokens, 1)
            scale = torch.cat([scale, g.expand(-1, shared.gate_proj.weight.shape[0])], 1)
        return scale

    def require_correlations(self) -> None:
        raise UnsupportedModel(
            f"universality is not defined for {self.model_type}'s experts: an expert's neuron has an activation "
            "only on the tokens routed to it, so neurons of two models share no common set of tokens to correlate "
            "over, and the rotated baseline would mix experts; scan, query, activations, verify and patch work")


class _Handle:
    def __init__(self, site, kind, fn):
        self.site, self.kind, self.fn = site, kind, fn

    def remove(self) -> None:
        self.site._remove(self.kind, self.fn)


class MoESite:
    """A stand-in for the module whose input is the experts' activations (batch, pos, neuron): its
    hooks are served by one forward hook on the MoE block that recomputes the block's output (see
    the module docstring). Pre-hooks see (module, (acts,)) and may return replaced acts; forward
    hooks see (module, (acts,), scale) with the per-token write scale (batch, pos, neuron)."""

    def __init__(self, family: MoE, mlp):
        self.family, self.mlp = family, mlp

    def _state(self) -> dict:
        st = getattr(self.mlp, "_discover_site", None)
        if st is None:
            st = {"pre": [], "post": [], "handle": None}
            self.mlp._discover_site = st
        return st

    def _add(self, kind, fn):
        st = self._state()
        st[kind].append(fn)
        if st["handle"] is None:
            st["handle"] = self.mlp.register_forward_hook(self._recompute)
        return _Handle(self, kind, fn)

    def _remove(self, kind, fn):
        st = getattr(self.mlp, "_discover_site", None)
        if st is None:  # already removed
            return
        if fn in st[kind]:
            st[kind].remove(fn)
        if not st["pre"] and not st["post"] and st["handle"] is not None:
            st["handle"].remove()
            del self.mlp._discover_site

    def register_forward_pre_hook(self, fn):
        return self._add("pre", fn)

    def register_forward_hook(self, fn):
        return self._add("post", fn)

    def _recompute(self, mlp, args, out):
        import torch

        fam, st = self.family, self._state()
        x = args[0]
        B, T, d = x.shape
        flat = x.reshape(-1, d)
        gu, down = mlp.experts.gate_up_proj, mlp.experts.down_proj  # (E, 2I, d), (E, d, I)
        E, I = gu.shape[0], gu.shape[1] // 2
        act = mlp.experts.act_fn  # the experts' own nonlinearity (the shared expert uses the same)
        # views of the parameters, never copies: a backward pass keeps what the forward used
        h = (flat @ gu.reshape(E * 2 * I, d).T).view(-1, E, 2, I)  # every expert on every token
        parts = [(act(h[:, :, 0]) * h[:, :, 1]).reshape(-1, E * I)]
        shared = fam._shared(mlp)
        if shared is not None:
            parts.append(act(shared.gate_proj(flat)) * shared.up_proj(flat))
        acts = torch.cat(parts, 1).reshape(B, T, -1)
        for fn in list(st["pre"]):
            got = fn(mlp, (acts,))
            if got is not None:
                acts = got[0] if isinstance(got, tuple) else got
        scale = fam.write_scale(mlp, flat).reshape(B, T, -1)
        for fn in list(st["post"]):
            fn(mlp, (acts,), scale)
        w = (acts * scale).reshape(-1, acts.shape[-1])
        y = torch.einsum("tei,edi->td", w[:, :E * I].reshape(-1, E, I), down)
        if shared is not None:
            y = y + shared.down_proj(w[:, E * I:])
        return y.reshape(B, T, d).to(out.dtype)
