"""The checks every architecture family passes, on a tiny random model of that family built from
config (no downloads). A family's test module builds its models and calls these:

- `planted_neurons_found`: +U[:, t] and -U[:, t] written into two neurons' raw w_out (divided by
  a post-MLP norm's gain where there is one) are the top-1 prediction and suppression neurons of
  a real scan of the saved model;
- `hooked_activations_equal_manual_mlp`: the activations the corpus pass records equal
  act(x W_in + b) [* (x W_up + b)] computed by hand from the MLP's input;
- `batched_patching_equals_loop`: batched patching (both position modes) equals one hooked full
  forward pass per neuron;
- `ablation_equals_hooked_forward`: verify's batched mean ablation equals a hooked forward pass;
- `matches_transformerlens`: processed weights and hook_post equal TransformerLens 4.3's.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import torch
from conftest import VOCAB, make_tokenizer, save

from discover.adapter import from_model

AN = VOCAB.index("an")
CLEAN = "I climbed up the pear tree and picked a pear . I climbed up the apple tree and picked"
CORRUPT = CLEAN.replace("apple", "lemon")


def randomise_norms(model, scale: float = 0.3):
    """Non-trivial norm gains and biases, so that folding them in matters."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            low = name.lower()
            if "norm" in low or "ln_" in low or "layernorm" in low:
                if name.endswith("weight"):
                    p.copy_((1.0 if p.mean() > 0.5 else 0.0) + scale * torch.randn_like(p))
                else:
                    p.copy_(0.1 * torch.randn_like(p))
    return model.eval()


def plant(view, layer: int, neuron: int, direction):
    """Write `direction` as neuron's processed w_out: raw w_out = direction / post-MLP gain."""
    d = torch.as_tensor(np.asarray(direction), dtype=torch.float32)
    post = view.post_mlp_norm(layer)
    if post is not None:
        d = d / post.weight
    with torch.no_grad():
        view.raw_w_out(layer)[neuron] = d


def planted_neurons_found(model, tmp_path, layer: int = 1):
    from discover.query import query_roles, query_token
    from discover.scan import scan_model
    from discover.store import Store

    view = from_model(model, make_tokenizer())
    U = view.processed_unembed().double().numpy()
    u = U[:, AN] / np.linalg.norm(U[:, AN])
    plant(view, layer, 5, 3.0 * u)
    plant(view, layer, 6, -3.0 * u)
    np.testing.assert_allclose(view.processed_W_out(layer)[5].double().numpy(), 3.0 * u, atol=1e-5)
    path = save(model, tmp_path / "model")
    with Store(tmp_path / "store") as store:
        assert scan_model(str(path), store, progress=False).status == "scanned"
        top = query_token(store, str(path), token_id=AN, top=3)["results"][0]
        assert (top["neuron"], top["role"]) == (f"L{layer}.N5", "prediction"), top
        bottom = query_token(store, str(path), token_id=AN, top=3, negative=True)["results"][0]
        assert (bottom["neuron"], bottom["role"]) == (f"L{layer}.N6", "suppression"), bottom
        assert bottom["congruence"] < 0
        assert query_roles(store, str(path), "prediction", top=1)[0]["neuron"] == f"L{layer}.N5"


def hooked_activations_equal_manual_mlp(model):
    from discover import activations as A

    view = from_model(model, None)
    ids = torch.randint(0, 97, (3, 11))
    mlp_in = {}
    hooks = [view.mlp_input_module(l).register_forward_pre_hook(
        lambda m, a, l=l: mlp_in.__setitem__(l, a[0].detach().clone())) for l in range(view.n_layers)]
    try:
        with torch.no_grad(), A.capture(view) as got:
            view.model.base_model(input_ids=ids)
    finally:
        for hk in hooks:
            hk.remove()
    act = view.activation_fn()
    for l in range(view.n_layers):
        x = mlp_in[l].double()
        pre = x @ view.W_in(l).double().T
        if view.b_in(l) is not None:
            pre = pre + view.b_in(l).double()
        manual = act(pre)
        if view.gated:
            up = x @ view.W_up(l).double().T
            if view.b_up(l) is not None:
                up = up + view.b_up(l).double()
            manual = manual * up
        assert manual.abs().max() > 1e-3
        assert got["acts"][l].shape == (3, 11, view.d_mlp)
        torch.testing.assert_close(got["acts"][l].double(), manual, atol=2e-5, rtol=1e-4)
    assert all(not m._forward_pre_hooks and not m._forward_hooks and not hasattr(m, "_discover_site")
               for m in view.model.modules()), "a hook was left behind"


def batched_patching_equals_loop(model, positions: str):
    from discover.patch import PatchConfig, patch_loop, patch_neurons

    view = from_model(model, make_tokenizer())
    cfg = PatchConfig(positions=positions, batch_size=48)  # batches that do not divide d_mlp
    res = patch_neurons(view, CLEAN, CORRUPT, "an", "a", cfg)
    neurons = list(range(0, view.d_mlp, 3))
    moved = 0.0
    for layer in range(view.n_layers):
        ref = patch_loop(view, CLEAN, CORRUPT, "an", "a", layer, neurons, cfg)
        moved = max(moved, float(np.abs(ref).max()))
        np.testing.assert_allclose(res.recovery[layer][neurons], ref, atol=1e-4, err_msg=f"layer {layer}")
    assert moved > 1e-3, "patching changed nothing: the test would be vacuous"
    if positions == "all":  # no BOS, first tokens differ: every position reruns (no KV cache)
        cfg = PatchConfig(positions="all", bos=False, batch_size=48)
        clean, corrupt = "apple tree and picked", "lemon tree and picked"
        res = patch_neurons(view, clean, corrupt, "an", "a", cfg, attribution=False)
        for layer in range(view.n_layers):
            ref = patch_loop(view, clean, corrupt, "an", "a", layer, neurons[::2], cfg)
            np.testing.assert_allclose(res.recovery[layer][neurons[::2]], ref, atol=1e-4, err_msg=f"layer {layer}")


def ablation_equals_hooked_forward(model, n_seqs: int = 3, T: int = 12):
    """verify's batched mean ablation (blocks after the layer rerun from the cached residual stream)
    against a full forward pass with a hook that sets the neuron to its mean, per sequence."""
    from discover.verify import Ablator

    view = from_model(model, make_tokenizer())
    g = torch.Generator().manual_seed(1)
    seqs = [[0] + torch.randint(1, 97, (T,), generator=g).tolist() for _ in range(n_seqs)]
    targets = np.array([VOCAB.index("tree"), VOCAB.index("pear")])
    for s in seqs:  # make sure the targets are next somewhere
        s[4], s[9] = int(targets[0]), int(targets[1])
    next_token = np.concatenate([np.array(s[2:] + [-1]) for s in seqs])  # next token of each counted row
    data = SimpleNamespace(seqs=[(s, i * T, T) for i, s in enumerate(seqs)], next_token=next_token)
    rng = np.random.default_rng(0)
    means = rng.normal(0, 0.5, (view.n_layers, view.d_mlp))
    neurons = [(0, 3), (0, 10), (view.n_layers - 1, 7)]
    got, n_pos = Ablator(view, data).effects(targets, neurons, means, max_seqs=n_seqs)
    assert n_pos >= 2 * n_seqs

    def logp(layer=None, neuron=None):
        out = []
        for i, s in enumerate(seqs):
            hook = None
            if layer is not None:
                def pre(mod, args):
                    a = args[0].clone()
                    a[:, 1:, neuron] = float(means[layer, neuron])  # every position but BOS
                    return (a,) + tuple(args[1:])
                hook = view.act_module(layer).register_forward_pre_hook(pre)
            try:
                with torch.no_grad():
                    h = view.model.base_model(input_ids=torch.tensor([s])).last_hidden_state[0]
                    lp = torch.log_softmax(view.logits(h).double(), -1)
            finally:
                if hook:
                    hook.remove()
            for r in np.flatnonzero(np.isin(next_token[i * T:(i + 1) * T], targets)):
                out.append(float(torch.logsumexp(lp[r + 1, torch.tensor(targets)], -1)))
        return np.array(out)

    base = logp()
    want = np.array([float((logp(l, n) - base).mean()) for l, n in neurons])
    assert np.abs(want).max() > 1e-4, "ablation changed nothing: the test would be vacuous"
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=2e-6)
    # a layer's job reruns its controls on groups of sequences cut after their last X-next position,
    # with a one-row trace's block arguments (forced here: two sequences together, then one)
    abl = Ablator(view, data)
    abl._cut = lambda need, T, suffix: [(np.arange(len(need) - 1), int(need[:-1].max())),
                                        (np.array([len(need) - 1]), int(need[-1]))]
    cut, _ = abl.effects(targets, neurons[:2], means, max_seqs=n_seqs)
    assert len(abl._shapes) >= 1  # the cut path ran
    np.testing.assert_allclose(cut, want[:2], rtol=1e-3, atol=2e-6)


def matches_transformerlens(model, tmp_path, ids=None):
    """Processed W_U, W_out, W_in (W_gate and W_in for gated MLPs) and hook_post equal
    TransformerLens 4.3's (fold_ln, center_writing_weights, center_unembed), once three TL
    conventions are undone on TL's side (each is a no-op where TL already does what we do, so a
    discrepancy of ours still fails):

    - post-MLP norms: TL keeps W_out raw (its ln2_post sees the MLP's output); ours is
      g_post * w_out, so ours is compared divided by g_post;
    - gate centring: folding a LayerNorm, TL centres W_in over d_model but never W_gate; ours
      centres both (the normed input has zero mean, the pre-activations are the same): TL's gate
      is compared centred;
    - final-norm fold: TL skips folding ln_final into W_U where the norm has no weight (OLMo) or
      the adapter says `supports_fold_ln = False` (OLMo 2/3); we fold it (METHODS.md), so TL's
      W_U is compared as g_f * W_U, centred over d_model for LayerNorm models.
    """
    from transformer_lens.model_bridge import TransformerBridge

    tol = dict(rtol=1e-4, atol=1e-5)
    ids = torch.tensor([[3, 4, 6, 11, 12, 9, 10, 2]]) if ids is None else ids
    model_dir = save(model, tmp_path / "tl")
    view = from_model(model, make_tokenizer())
    bridge = TransformerBridge.boot_transformers(str(model_dir), hf_model=copy.deepcopy(model),
                                                 tokenizer=make_tokenizer(), device="cpu")
    bridge.enable_compatibility_mode(disable_warnings=True, fold_ln=True, center_writing_weights=True,
                                     center_unembed=True)
    fn = view.final_norm()
    with torch.no_grad():
        W_U = bridge.W_U[:, :view.d_vocab]
        lf_w = getattr(getattr(bridge, "ln_final", None), "weight", None)
        if not getattr(bridge.adapter, "supports_fold_ln", True) and lf_w is not None \
                and not torch.allclose(lf_w, torch.ones_like(lf_w)):  # TL left the gain unfolded
            W_U = fn.weight[:, None] * W_U
        if fn.kind == "layernorm":
            W_U = W_U - W_U.mean(0, keepdim=True)
        torch.testing.assert_close(W_U, view.processed_unembed(), **tol)
        for layer in range(view.n_layers):
            mlp = bridge.blocks[layer].mlp
            W_out = view.processed_W_out(layer)
            post = view.post_mlp_norm(layer)
            if post is not None:
                W_out = W_out / post.weight[None, :]
            torch.testing.assert_close(mlp.W_out, W_out, **tol)
            norm = view.mlp_norm(layer)
            gate = mlp.W_gate if view.gated else mlp.W_in  # (d_model, neuron)
            if norm is not None and norm.kind == "layernorm":
                gate = gate - gate.mean(0, keepdim=True)
            torch.testing.assert_close(gate, view.processed_W_in(layer).T, **tol)
            if view.gated:
                torch.testing.assert_close(mlp.W_in, view.processed_W_in(layer, "up").T, **tol)
        acts = {}
        handles = [view.act_module(l).register_forward_pre_hook(
            lambda m, a, l=l: acts.__setitem__(l, a[0].detach().clone())) for l in range(view.n_layers)]
        try:
            view.model(ids)
        finally:
            for h in handles:
                h.remove()
        _, cache = bridge.run_with_cache(ids)
        for layer in range(view.n_layers):
            torch.testing.assert_close(cache[f"blocks.{layer}.mlp.hook_post"], acts[layer], **tol)
