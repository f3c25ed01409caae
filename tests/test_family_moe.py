"""Mixtures of experts (Mixtral, OLMoE, Qwen2-MoE with its shared expert, Qwen3-MoE): the
flattened expert weights rebuild the MoE block's own forward pass; planted expert and
shared-expert neurons are found top-1 under their names `L1.E2.N5` / `L1.S.N3`; a dense name on a
mixture-of-experts layer is one clear error naming the right form; the hooked expert activations
equal a manual computation and the recomputed block equals the model's; batched patching (writes
through the corrupted run's routing) equals one hooked forward pass per neuron; universality, whose
correlations need tokens every neuron sees, refuses with one line, store unchanged (statistics
over routed tokens: test_moe_statistics.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import family_checks as fc
from conftest import make_tokenizer, save
from test_cli import assert_one_error_line, run, run_json, snapshot

from discover.adapter import from_model
from discover.errors import QueryError

ARCHS = ["mixtral", "olmoe", "qwen2_moe", "qwen3_moe"]
E, I, S = 4, 32, 16  # experts, neurons per expert, shared-expert neurons (Qwen2-MoE)


def tiny(arch: str, n_layer: int = 2):
    import transformers as tf

    common = dict(num_hidden_layers=n_layer, hidden_size=64, num_attention_heads=4, vocab_size=97,
                  max_position_embeddings=32, num_experts_per_tok=2, tie_word_embeddings=False, pad_token_id=0,
                  bos_token_id=0, eos_token_id=0)
    if arch == "mixtral":
        cfg = tf.MixtralConfig(num_key_value_heads=2, intermediate_size=I, num_local_experts=E, **common)
        return fc.randomise_norms(tf.MixtralForCausalLM(cfg))
    if arch == "olmoe":
        cfg = tf.OlmoeConfig(intermediate_size=I, num_experts=E, **common)
        return fc.randomise_norms(tf.OlmoeForCausalLM(cfg))
    if arch == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(num_key_value_heads=2, intermediate_size=96, moe_intermediate_size=I,
                                shared_expert_intermediate_size=S, num_experts=E, **common)
        return fc.randomise_norms(tf.Qwen2MoeForCausalLM(cfg))
    cfg = tf.Qwen3MoeConfig(num_key_value_heads=2, head_dim=16, intermediate_size=96, moe_intermediate_size=I,
                            num_experts=E, **common)
    return fc.randomise_norms(tf.Qwen3MoeForCausalLM(cfg))


@pytest.mark.parametrize("arch", ARCHS)
def test_flattened_experts_rebuild_the_moe_forward(arch):
    """The block's output equals sum over routed experts of weight * act(x W_in_e) * (x W_up_e)
    @ W_out_e (+ sigmoid gate * the shared expert), every W_* the view's slice e*I:(e+1)*I."""
    model = tiny(arch)
    view = from_model(model, None)
    lay = view.layout
    assert (lay.experts, lay.expert_size, lay.shared) == (E, I, S if arch == "qwen2_moe" else 0)
    assert view.d_mlp == E * I + lay.shared
    mlp = model.model.layers[1].mlp
    x = torch.randn(7, 64)
    act = view.activation_fn()
    W_in, W_up, W_out = view.W_in(1).double(), view.W_up(1).double(), view.W_out(1).double()
    with torch.no_grad():
        want = mlp(x[None])[0].double()
        _, weights, chosen = mlp.gate(x)
        xd = x.double()
        a = act(xd @ W_in.T) * (xd @ W_up.T)  # (tokens, neurons): every expert on every token
        got = torch.zeros_like(want)
        for t in range(x.shape[0]):
            for w, e in zip(weights[t].tolist(), chosen[t].tolist()):
                sl = slice(e * I, (e + 1) * I)
                got[t] += w * (a[t, sl] @ W_out[sl])
        if lay.shared:
            sl = slice(E * I, E * I + S)
            got += torch.sigmoid(xd @ mlp.shared_expert_gate.weight.double().T) * (a[:, sl] @ W_out[sl])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def _plant(model, arch, view):
    """+U[:, an] into expert 2's neuron 5 of layer 1, -U[:, an] into expert 0's neuron 7, and
    (Qwen2-MoE) +U[:, the] into shared neuron 3; raw parameters, written in place."""
    U = view.processed_unembed().double().numpy()
    unit = lambda t: torch.tensor(U[:, t] / np.linalg.norm(U[:, t]), dtype=torch.float32)  # noqa: E731
    an, the = fc.AN, fc.VOCAB.index("the")
    mlp = model.model.layers[1].mlp
    with torch.no_grad():
        mlp.experts.down_proj[2, :, 5] = 3.0 * unit(an)
        mlp.experts.down_proj[0, :, 7] = -3.0 * unit(an)
        if arch == "qwen2_moe":
            mlp.shared_expert.down_proj.weight[:, 3] = 3.0 * unit(the)


@pytest.mark.parametrize("arch", ARCHS)
def test_planted_expert_neurons_are_found_by_name(arch, tmp_path):
    from discover.query import query_neuron, query_token
    from discover.scan import scan_model
    from discover.store import Store

    model = tiny(arch)
    _plant(model, arch, from_model(model, make_tokenizer()))
    path = save(model, tmp_path / arch)
    with Store(tmp_path / "store") as store:
        assert scan_model(str(path), store, progress=False).status == "scanned"
        top = query_token(store, str(path), token_id=fc.AN, top=3)["results"][0]
        assert (top["neuron"], top["role"], top["neuron_index"]) == ("L1.E2.N5", "prediction", 2 * I + 5)
        bottom = query_token(store, str(path), token_id=fc.AN, top=3, negative=True)["results"][0]
        assert (bottom["neuron"], bottom["role"]) == ("L1.E0.N7", "suppression")
        n = query_neuron(store, str(path), "L1.E2.N5")
        assert n["neuron"] == "L1.E2.N5" and n["top_tokens"][0]["token_id"] == fc.AN
        if arch == "qwen2_moe":
            the = query_token(store, str(path), token_id=fc.VOCAB.index("the"), top=1)["results"][0]
            assert (the["neuron"], the["neuron_index"]) == ("L1.S.N3", E * I + 3)
            assert query_neuron(store, str(path), "L1.S.N3")["top_tokens"][0]["token"] == "the"
        with pytest.raises(QueryError, match=r"L1\.E<expert>\.N<index>"):
            query_neuron(store, str(path), "L1.N5")
        with pytest.raises(QueryError, match="out of range"):
            query_neuron(store, str(path), f"L1.E{E}.N0")


def test_dense_model_rejects_expert_names(tmp_path):
    from conftest import make_model

    from discover.query import query_neuron
    from discover.scan import scan_model
    from discover.store import Store

    path = save(make_model("llama"), tmp_path / "llama")
    with Store(tmp_path / "store") as store:
        scan_model(str(path), store, progress=False)
        with pytest.raises(QueryError, match=r"dense; write it as L1\.N5"):
            query_neuron(store, str(path), "L1.E2.N5")


@pytest.mark.parametrize("arch", ARCHS)
def test_hooked_expert_activations_equal_manual_mlp(arch):
    fc.hooked_activations_equal_manual_mlp(tiny(arch))


@pytest.mark.parametrize("arch", ARCHS)
def test_the_hooked_block_is_the_models_block(arch):
    """While an activation hook is on, the MoE block is recomputed from the neurons: its output
    and the model's logits equal the unhooked model's (and the hook is gone afterwards)."""
    model = tiny(arch)
    view = from_model(model, None)
    ids = torch.randint(1, 97, (2, 9))
    with torch.no_grad():
        want = model(ids).logits
        seen = []
        h = view.act_module(1).register_forward_pre_hook(lambda m, a: seen.append(a[0].shape))
        try:
            got = model(ids).logits
        finally:
            h.remove()
        assert seen == [(2, 9, view.d_mlp)]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        # and the recomputed output is the one used: zero activations are a block that writes nothing
        h = view.act_module(1).register_forward_pre_hook(lambda m, a: torch.zeros_like(a[0]))
        try:
            zeroed = model(ids).logits
        finally:
            h.remove()
        mlp = model.model.layers[1].mlp
        skip = mlp.register_forward_hook(lambda m, a, o: torch.zeros_like(o))
        try:
            torch.testing.assert_close(zeroed, model(ids).logits, rtol=1e-5, atol=1e-6)
        finally:
            skip.remove()
        assert not torch.allclose(zeroed, want, atol=1e-3)
        assert not hasattr(model.model.layers[1].mlp, "_discover_site") and not model.model.layers[1].mlp._forward_hooks


@pytest.mark.parametrize("positions", ["last", "all"])
@pytest.mark.parametrize("arch", ARCHS)
def test_batched_patching_equals_loop(arch, positions):
    fc.batched_patching_equals_loop(tiny(arch, 3), positions)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_last_position_patching_with_prompts_of_different_lengths(arch):
    from discover.patch import PatchConfig, patch_loop, patch_neurons

    view = from_model(tiny(arch, 3), make_tokenizer())
    clean, corrupt = "I climbed up the apple tree and picked", "I climbed up the tall lemon tree and picked"
    res = patch_neurons(view, clean, corrupt, "an", "a", PatchConfig(batch_size=40), attribution=False)
    neurons = list(range(0, view.d_mlp, 5))
    for layer in range(view.n_layers):
        ref = patch_loop(view, clean, corrupt, "an", "a", layer, neurons, PatchConfig())
        np.testing.assert_allclose(res.recovery[layer][neurons], ref, atol=1e-4)


def test_universality_refuses_experts_from_the_config(tmp_path, capsys):
    """Universality correlates neurons over common tokens, which experts do not share: one line,
    store unchanged, decided from the config before any weight is read."""
    path = save(tiny("mixtral"), tmp_path / "mixtral")
    store = tmp_path / "store"
    rc, _, err = run(capsys, "scan", str(path), "--store", str(store))
    assert rc == 0, err
    before = snapshot(store)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("I climbed up the apple tree and picked an apple . " * 30)
    other = save(tiny("mixtral"), tmp_path / "other")
    for f in path.glob("*.safetensors"):  # there is no weight file left to read
        f.unlink()
    rc, _, err = run(capsys, "universality", str(path), str(other), "--corpus", str(corpus), "--tokens", "200",
                     "--store", str(store))
    assert_one_error_line(rc, err, "universality is not defined", "routed to it", "activations, verify and patch work")
    assert snapshot(store) == before


def test_report_cards_carry_expert_names(tmp_path, capsys):
    """A scan-only report of a mixture of experts: the planted neurons' cards, named by expert."""
    import json

    model = tiny("qwen2_moe")
    _plant(model, "qwen2_moe", from_model(model, make_tokenizer()))
    path = save(model, tmp_path / "m")
    store = tmp_path / "store"
    assert run(capsys, "scan", str(path), "--store", str(store))[0] == 0
    out = tmp_path / "r.json"
    rc, _, err = run(capsys, "report", str(path), "--store", str(store), "--format", "json", "--out", str(out))
    assert rc == 0, err
    names = {c["neuron"] for c in json.loads(out.read_text())["cards"]}
    assert {"L1.E2.N5", "L1.E0.N7"} <= names


def test_patch_cli_names_experts(tmp_path, capsys):
    path = save(tiny("qwen2_moe"), tmp_path / "m")
    rc, out, err = run(capsys, "patch", str(path), "--clean", "I climbed up the apple tree and picked",
                       "--corrupted", "I climbed up the lemon tree and picked", "--target", "an", "--contrast", "a",
                       "--store", str(tmp_path / "store"), "--top", "40")
    assert rc == 0, err
    import re

    names = re.findall(r"^(L\d+\.\S+)\s", out, re.M)
    assert names and all(re.fullmatch(r"L\d+\.(E\d+|S)\.N\d+", n) for n in names), names[:5]
    res = run_json(capsys, "patch", str(path), "--clean", "I climbed up the apple tree and picked",
                   "--corrupted", "I climbed up the lemon tree and picked", "--target", "an", "--contrast", "a",
                   "--store", str(tmp_path / "store"), "--json")
    from discover.names import Layout

    layout = Layout(**res["neuron_layout"])
    assert (layout.experts, layout.expert_size, layout.shared) == (E, I, S)
    rec = {layout.name(int(l), n): v for l, d in res["layers"].items() for n, v in enumerate(d["recovery"])}
    assert "L1.S.N0" in rec and f"L1.E{E - 1}.N{I - 1}" in rec and len(rec) == 2 * (E * I + S)
    # a shared-expert neuron is routed everywhere: it moves the metric; some routed expert does not
    assert any(abs(v) > 0 for k, v in rec.items() if ".S." in k)
    assert any(v == 0 for k, v in rec.items() if ".E" in k)
