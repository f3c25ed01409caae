"""The scanner against independent numpy/scipy references, and planted neurons it must find."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch
from conftest import VOCAB, make_model, make_tokenizer, save

from discover.adapter import from_model, load_model
from discover.errors import ModelLoadError
from discover.query import query_neuron, query_roles, query_token, similar_neurons
from discover.scan import RoleThresholds, ScanConfig, TokenTopK, assign_roles, scan, scan_model
from discover.store import Store

ARCHS = ["gpt2", "gpt_neox", "llama", "mistral", "qwen2"]
AN = VOCAB.index("an")


# ----------------------------------------------------------- independent reference
def raw_parts(model):
    """(W_U (d, V), final (gain, bias|None, is_ln), [(W_in, W_out, mlp gain, mlp bias)] per layer),
    read straight from the modules with numpy, independently of discover.adapter."""
    t = lambda x: x.detach().double().numpy().copy()  # noqa: E731
    mt = model.config.model_type
    if mt == "gpt2":
        blocks, fn = model.transformer.h, model.transformer.ln_f
        layers = [(t(b.mlp.c_fc.weight).T, t(b.mlp.c_proj.weight), t(b.ln_2.weight), True) for b in blocks]
        ln = True
    elif mt == "gpt_neox":
        blocks, fn = model.gpt_neox.layers, model.gpt_neox.final_layer_norm
        layers = [(t(b.mlp.dense_h_to_4h.weight), t(b.mlp.dense_4h_to_h.weight).T,
                   t(b.post_attention_layernorm.weight), True) for b in blocks]
        ln = True
    else:
        blocks, fn = model.model.layers, model.model.norm
        layers = [(t(b.mlp.gate_proj.weight), t(b.mlp.down_proj.weight).T,
                   t(b.post_attention_layernorm.weight), False) for b in blocks]
        ln = False
    W_U = t(model.get_output_embeddings().weight).T
    return W_U, t(fn.weight), ln, layers


def reference(model, k=5):
    W_U, gamma, ln, layers = raw_parts(model)
    U = gamma[:, None] * W_U
    if ln:
        U = U - U.mean(0, keepdims=True)
    U = U - U.mean(1, keepdims=True)
    out = []
    for W_in, W_out, g2, _ in layers:
        Wo = W_out - W_out.mean(1, keepdims=True) if ln else W_out
        Wi = W_in * g2[None, :]
        if ln:
            Wi = Wi - Wi.mean(1, keepdims=True)
        G = Wo @ U
        C = G / np.linalg.norm(Wo, axis=1)[:, None] / np.linalg.norm(U, axis=0)[None, :]
        out.append({
            "G": G,
            "vocab_mean": C.mean(1),
            "vocab_var": C.var(1),
            "vocab_skew": scipy.stats.skew(C, axis=1),
            "vocab_kurt": scipy.stats.kurtosis(C, axis=1, fisher=False),
            "w_out_norm": np.linalg.norm(Wo, axis=1),
            "w_in_norm": np.linalg.norm(Wi, axis=1),
            "cos_in_out": (Wi * Wo).sum(1) / np.linalg.norm(Wi, axis=1) / np.linalg.norm(Wo, axis=1),
            "Wo": Wo,
        })
    return U, out


@pytest.mark.parametrize("backend", ["numba", "torch"])
@pytest.mark.parametrize("arch", ARCHS)
def test_statistics_equal_numpy_reference(arch, backend, monkeypatch):
    model = make_model(arch, n_layer=2, d_model=64, d_mlp=96)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    view = from_model(model, make_tokenizer())
    cfg = ScanConfig(top_k=5, token_top_k=7, chunk_rows=40, block_rows=16, backend=backend)
    # make the torch path cross its warm-up and several merges on this tiny model
    monkeypatch.setattr(TokenTopK, "WARM_ROWS", 40)
    monkeypatch.setattr(TokenTopK, "MAX_BUFFER", 300)
    res = scan(view, cfg, progress=False)
    U, ref = reference(model)
    for lr, r in zip(res.layers, ref):
        for key in ("vocab_mean", "vocab_var", "vocab_skew", "vocab_kurt", "w_out_norm", "w_in_norm", "cos_in_out"):
            np.testing.assert_allclose(lr.stats[key], r[key], rtol=2e-4, atol=1e-6, err_msg=f"{arch} {key}")
        ref_top = -np.sort(-r["G"], axis=1)[:, :5]
        np.testing.assert_allclose(lr.top_vals, ref_top, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(np.take_along_axis(r["G"], lr.top_ids, 1), ref_top, rtol=1e-4, atol=1e-6)
        ref_bot = np.sort(r["G"], axis=1)[:, :5]
        np.testing.assert_allclose(lr.bottom_vals, ref_bot, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(np.take_along_axis(r["G"], lr.bottom_ids, 1), ref_bot, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(lr.w_out_unit, axis=1), 1.0, rtol=1e-5)
    # per-token neuron ranking over the whole model (ties between fp32 and fp64 aside: every
    # returned id must carry the reference value of its rank)
    G_all = np.concatenate([r["G"] for r in ref])  # (neuron, vocab), global id = layer * d_mlp + neuron
    cols = np.arange(G_all.shape[1])[None, :]
    for (ids, vals), ref_vals in ((res.token_top, -np.sort(-G_all, axis=0)[:7]),
                                  (res.token_bottom, np.sort(G_all, axis=0)[:7])):
        np.testing.assert_allclose(vals, ref_vals, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(G_all[ids, cols], ref_vals, rtol=1e-4, atol=1e-6)
        assert all(len(set(ids[:, t])) == ids.shape[0] for t in range(ids.shape[1]))  # no repeats
    # the scan never touches the model's parameters
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "llama"])
def test_adapter_matches_the_forward_pass(arch):
    """W_in / W_out orientation: the MLP module's output equals act(x W_in^T + b) [* up] @ W_out + b."""
    model = make_model(arch)
    view = from_model(model, make_tokenizer())
    x = torch.randn(5, view.d_model)
    mlp = view._blocks[1].mlp
    pre = x @ view.W_in(1).T + (view.b_in(1) if view.b_in(1) is not None else 0)
    act = view.activation_fn()(pre)
    if view.gated:
        act = act * (x @ view.W_up(1).T)
    out = act @ view.W_out(1) + (view.b_out(1) if view.b_out(1) is not None else 0)
    with torch.no_grad():
        torch.testing.assert_close(out, mlp(x), rtol=1e-4, atol=1e-5)
    assert view.act_site(1) in dict(model.named_modules())


def _plant(model, layer, neuron, direction, *, w_in=None):
    """Write raw w_out (and optionally w_in) rows of one neuron, per architecture."""
    d = torch.tensor(direction, dtype=torch.float32)
    mt = model.config.model_type
    with torch.no_grad():
        if mt == "gpt2":
            mlp = model.transformer.h[layer].mlp
            mlp.c_proj.weight[neuron] = d
            if w_in is not None:
                mlp.c_fc.weight[:, neuron] = torch.tensor(w_in, dtype=torch.float32)
        elif mt == "gpt_neox":
            mlp = model.gpt_neox.layers[layer].mlp
            mlp.dense_4h_to_h.weight[:, neuron] = d
            if w_in is not None:
                mlp.dense_h_to_4h.weight[neuron] = torch.tensor(w_in, dtype=torch.float32)
        else:
            mlp = model.model.layers[layer].mlp
            mlp.down_proj.weight[:, neuron] = d
            if w_in is not None:
                mlp.gate_proj.weight[neuron] = torch.tensor(w_in, dtype=torch.float32)


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "llama"])
def test_planted_neurons_are_found(arch, tmp_path):
    """Prediction (+U_an), suppression (-U_an) and memory-management (w_in = -w_out) plants."""
    model = make_model(arch, n_layer=2, d_model=64, d_mlp=128)
    U, _ = reference(model)
    u = U[:, AN] / np.linalg.norm(U[:, AN])
    _plant(model, 1, 5, 3.0 * u)
    _plant(model, 1, 6, -3.0 * u)
    # memory management: processed w_in = gain * raw w_in (centred) = -processed w_out
    _, _, ln, layers = raw_parts(model)
    g2 = layers[0][2]
    other = np.random.default_rng(1).standard_normal(64)
    other -= other.mean()
    other /= np.linalg.norm(other)
    _plant(model, 0, 7, 2.0 * other, w_in=-2.0 * other / g2)
    path = save(model, tmp_path / arch)
    with Store(tmp_path / "store") as store:
        summary = scan_model(str(path), store, progress=False)
        assert summary.status == "scanned"
        res = query_token(store, str(path), "an", top=3)
        assert res["results"][0]["neuron"] == "L1.N5"
        assert res["results"][0]["role"] == "prediction"
        assert res["results"][0]["top_tokens"][0] == "an"
        neg = query_token(store, str(path), "an", top=3, negative=True)
        assert neg["results"][0]["neuron"] == "L1.N6"
        assert neg["results"][0]["role"] == "suppression"
        assert neg["results"][0]["congruence"] < 0
        preds = [r["neuron"] for r in query_roles(store, str(path), "prediction", top=5)]
        assert preds[0] == "L1.N5"
        mm = query_roles(store, str(path), "memory_management", top=3)
        assert mm[0]["neuron"] == "L0.N7" and mm[0]["cos_in_out"] == pytest.approx(-1.0, abs=1e-4)
        n5 = query_neuron(store, str(path), "L1.N5")
        assert n5["stats"]["vocab_kurt"] > 10 and n5["stats"]["vocab_skew"] > 0
        assert n5["bottom_tokens"][0]["congruence"] < n5["top_tokens"][0]["congruence"]


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "llama"])
def test_planted_partition_neuron(arch, tmp_path):
    """A vocabulary split in two along a direction e; the neuron writing along e is a partition
    neuron (high vocabulary variance, not kurtotic) and tops the ranking for a token of the + half."""
    model = make_model(arch, n_layer=2, d_model=64, d_mlp=128)
    rng = np.random.default_rng(2)
    e = rng.standard_normal(64)
    e -= e.mean()
    e /= np.linalg.norm(e)
    sign = np.where(rng.random(97) < 0.5, 1.0, -1.0)
    sign[AN] = 1.0
    emb = model.get_output_embeddings().weight
    W_U, gamma, ln, _ = raw_parts(model)
    with torch.no_grad():
        emb += torch.tensor(np.outer(sign, e / gamma), dtype=torch.float32)  # U gains +-e after the gain
    U, _ = reference(model)
    direction = U @ sign
    _plant(model, 1, 9, 2.0 * direction / np.linalg.norm(direction))
    path = save(model, tmp_path / arch)
    with Store(tmp_path / "store") as store:
        scan_model(str(path), store, progress=False)
        parts = query_roles(store, str(path), "partition", top=3)
        assert parts and parts[0]["neuron"] == "L1.N9"
        assert parts[0]["vocab_kurt"] < 10
        assert query_neuron(store, str(path), "L1.N9")["stats"]["role"] == "partition"
        assert query_token(store, str(path), "an", top=1)["results"][0]["neuron"] == "L1.N9"


def test_token_topk_is_exact_through_warmup_and_merges(monkeypatch):
    rng = np.random.default_rng(0)
    G = rng.standard_normal((3000, 57)).astype(np.float32)
    G[2500, 3] = 50.0  # a late, extreme entry
    monkeypatch.setattr(TokenTopK, "WARM_ROWS", 100)
    monkeypatch.setattr(TokenTopK, "MAX_BUFFER", 500)
    tk = TokenTopK(57, 25)
    for s in range(0, 3000, 64):
        g = torch.from_numpy(G[s : s + 64])
        ids = torch.arange(s, min(s + 64, 3000))
        if tk.warm:
            tk.add_candidates(g, ids, g.amax(0))
        else:
            tk.add_dense(g, ids)
    ids, vals = tk.result()
    np.testing.assert_array_equal(ids, np.argsort(-G, axis=0, kind="stable")[:25])
    np.testing.assert_array_equal(vals, -np.sort(-G, axis=0)[:25])
    assert ids[0, 3] == 2500
    # the numba heap kernel on the same data, in uneven blocks, both signs at once
    from discover._kernels import new_heaps, sorted_heaps, token_heaps_update

    pos, neg = new_heaps(57, 25), new_heaps(57, 25)
    for s, e in ((0, 7), (7, 1000), (1000, 1001), (1001, 3000)):
        token_heaps_update(np.ascontiguousarray(G[s:e]), s, *pos, *neg)
    ids, vals = sorted_heaps(*pos)
    np.testing.assert_array_equal(ids, np.argsort(-G, axis=0, kind="stable")[:25])
    np.testing.assert_array_equal(vals, -np.sort(-G, axis=0)[:25])
    ids, vals = sorted_heaps(*neg)
    np.testing.assert_array_equal(ids, np.argsort(G, axis=0, kind="stable")[:25])
    np.testing.assert_array_equal(-vals, np.sort(G, axis=0)[:25])


def test_similar_neurons_equal_brute_force(tmp_path):
    m1 = make_model("gpt2", n_layer=3, d_model=64, d_mlp=64)
    m2 = make_model("gpt2", n_layer=2, d_model=64, d_mlp=96)
    with torch.no_grad():  # a neuron of m2 copies one of m1: it must be found across checkpoints
        m2.transformer.h[1].mlp.c_proj.weight[10] = 1.7 * m1.transformer.h[2].mlp.c_proj.weight[33]
    p1, p2 = save(m1, tmp_path / "a"), save(m2, tmp_path / "b")
    with Store(tmp_path / "store") as store:
        scan_model(str(p1), store, progress=False)
        scan_model(str(p2), store, progress=False)
        ck = store.resolve_model(str(p1))
        got = similar_neurons(store, ck, 2, 33, k=8)
    # brute force over both checkpoints with numpy
    units = []
    for m, tag in ((m1, "a"), (m2, "b")):
        _, ref = reference(m)
        for layer, r in enumerate(ref):
            W = r["Wo"] / np.linalg.norm(r["Wo"], axis=1, keepdims=True)
            units += [(tag, f"L{layer}.N{i}", W[i]) for i in range(len(W))]
    q = [u for t, n, u in units if t == "a" and n == "L2.N33"][0]
    scored = sorted(((float(u @ q), t, n) for t, n, u in units if not (t == "a" and n == "L2.N33")), reverse=True)
    best_a = [(n, c) for c, t, n in scored if t == "a"][:8]
    best_b = [(n, c) for c, t, n in scored if t == "b"][:8]
    got_a = [(r["neuron"], r["cosine"]) for r in got if r["same_checkpoint"]]
    got_b = [(r["neuron"], r["cosine"]) for r in got if not r["same_checkpoint"]]
    assert [n for n, _ in got_a] == [n for n, _ in best_a]
    assert [n for n, _ in got_b] == [n for n, _ in best_b]
    np.testing.assert_allclose([c for _, c in got_a], [c for _, c in best_a], rtol=1e-4)
    assert got_b[0][0] == "L1.N10" and got_b[0][1] == pytest.approx(1.0, abs=1e-5)


def test_roles_rules_on_synthetic_stats():
    d = 100
    stats = {
        "vocab_kurt": np.array([20.0, 20.0, 3.0, 3.0, 3.0, 3.0, 3.0]),
        "vocab_skew": np.array([2.0, -2.0, 0.0, 0.0, 0.0, 0.0, 0.0]),
        "vocab_var": np.array([0.01, 0.01, 0.2, 0.001, 0.01, 0.01, 0.01]),
        "w_out_norm": np.r_[np.ones(3), 40.0, np.ones(3)] + np.linspace(0, 0.1, 7),
        "cos_in_out": np.array([0.0, 0.0, 0.0, 0.0, -0.9, 0.9, 0.1]),
    }
    rows, primary = assign_roles(stats, d, RoleThresholds(entropy_norm_z=2.0))
    assert list(primary) == ["prediction", "suppression", "partition", "entropy", "memory_management",
                             "signal_boosting", None]
    rows, primary = assign_roles(stats, d, RoleThresholds(kurtosis=30.0, entropy_norm_z=2.0))
    assert primary[0] is None and primary[1] is None
    with pytest.raises(ValueError, match="io_cos"):
        RoleThresholds(io_cos=1.5)


def test_load_model_roundtrip_and_hash(tmp_path):
    m = make_model("gpt_neox")
    p = save(m, tmp_path / "neox")
    v1 = load_model(str(p))
    v2 = load_model(str(p))
    assert v1.checkpoint_id == v2.checkpoint_id
    assert v1.describe()["architecture"] == "gpt_neox" and v1.d_vocab == 97
    torch.testing.assert_close(v1.W_out(0), m.gpt_neox.layers[0].mlp.dense_4h_to_h.weight.T)
    m2 = make_model("gpt_neox")
    with torch.no_grad():
        m2.load_state_dict(m.state_dict())
        m2.gpt_neox.layers[0].mlp.dense_4h_to_h.weight[0, 0] += 1e-3
    assert load_model(str(save(m2, tmp_path / "neox2"))).checkpoint_id != v1.checkpoint_id


def test_query_token_fast_path_equals_the_catalog(tmp_path):
    """query_token reads memory-mapped arrays; they must say what the catalog's tables say."""
    model = make_model("gpt2", n_layer=3, d_model=64, d_mlp=64)
    path = save(model, tmp_path / "m")
    with Store(tmp_path / "store") as store:
        scan_model(str(path), store, ScanConfig(token_top_k=12, roles=RoleThresholds(kurtosis=3.0)), progress=False)
        scan_model(str(path), store, ScanConfig(token_top_k=12, roles=RoleThresholds(kurtosis=3.5)), progress=False)
        cid = store.resolve_model(str(path))["checkpoint_id"]
        for tok in (0, 5, 96):
            for sign, negative in ((1, False), (-1, True)):
                res = query_token(store, str(path), token_id=tok, top=12, negative=negative)
                rows = store.con.execute(
                    "SELECT t.layer, t.neuron, t.congruence, n.role FROM token_neurons t JOIN neurons n "
                    "USING (checkpoint_id, layer, neuron) WHERE checkpoint_id = ? AND token_id = ? AND sign = ? "
                    "ORDER BY rank", [cid, tok, sign]).fetchall()
                assert [(r["layer"], r["neuron_index"], r["role"]) for r in res["results"]] == \
                    [(r[0], r[1], r[3]) for r in rows]
                np.testing.assert_allclose([r["congruence"] for r in res["results"]], [r[2] for r in rows])
                top = store.con.execute(
                    "SELECT token FROM neuron_tokens WHERE checkpoint_id = ? AND layer = ? AND neuron = ? "
                    "AND side = 'top' ORDER BY rank LIMIT 5", [cid, rows[0][0], rows[0][1]]).fetchall()
                assert res["results"][0]["top_tokens"] == [t[0] for t in top]


def test_inapplicable_statistics_are_null_and_broken_weights_refused(tmp_path):
    model = make_model("gpt2")
    path = save(model, tmp_path / "m")
    with Store(tmp_path / "store") as store:
        scan_model(str(path), store, progress=False)
        n_null, n_gt = store.con.execute(
            "SELECT count(*) FILTER (WHERE cos_up_out IS NULL), count(*) FILTER (WHERE cos_up_out > 0.5) "
            "FROM neurons").fetchone()
        assert (n_null, n_gt) == (2 * 128, 0)  # GPT-2 has no up row: NULL, never NaN
    with torch.no_grad():
        model.transformer.h[1].mlp.c_proj.weight[3, 5] = float("nan")
    bad = save(model, tmp_path / "nan")
    with Store(tmp_path / "store") as store:
        before = store.con.execute("SELECT count(*) FROM neurons").fetchone()
        with pytest.raises(ModelLoadError, match="NaN or infinite"):
            scan_model(str(bad), store, progress=False)
        assert store.con.execute("SELECT count(*) FROM neurons").fetchone() == before
