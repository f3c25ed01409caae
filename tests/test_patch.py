"""Neuron activation patching: the batched path (from the cached residual stream, a KV cache for
the last position) equals one full forward pass per neuron for every architecture and both
position modes; attribution patching is the first-order term of exact patching; one result
equals TransformerLens' hook-based patching; the CLI reproduces the "an" experiment and turns
bad input into one line."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import make_model, make_tokenizer, save
from test_cli import assert_one_error_line, run, run_json

from discover.adapter import from_model
from discover.patch import PatchConfig, _runner, attribution_patching, patch_loop, patch_neurons

CLEAN = "I climbed up the pear tree and picked a pear . I climbed up the apple tree and picked"
CORRUPT = CLEAN.replace("apple", "lemon")
ARCHS = ["gpt2", "gpt_neox", "llama", "mistral", "qwen2"]


def _view(arch, n_layer=3):
    torch.manual_seed(0)
    return from_model(make_model(arch, n_layer=n_layer), make_tokenizer())


@pytest.mark.parametrize("positions", ["last", "all"])
@pytest.mark.parametrize("arch", ARCHS)
def test_batched_patching_equals_one_forward_per_neuron(arch, positions):
    view = _view(arch)
    cfg = PatchConfig(positions=positions, batch_size=48)  # batches that do not divide 128
    res = patch_neurons(view, CLEAN, CORRUPT, "an", "a", cfg)
    neurons = list(range(0, view.d_mlp, 3))
    for layer in range(view.n_layers):
        ref = patch_loop(view, CLEAN, CORRUPT, "an", "a", layer, neurons, cfg)
        assert np.abs(ref).max() > 1e-3 or layer == 0, "patching changed nothing: the test would be vacuous"
        np.testing.assert_allclose(res.recovery[layer][neurons], ref, atol=1e-4)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("positions", ["last", "all"])
def test_attribution_is_the_first_order_term(arch, positions):
    """(m(a_corr + eps * da) - m_corr) / eps -> attribution as eps -> 0, for every layer; for the
    last layer's neurons attribution and exact patching agree closely at eps = 1."""
    view = _view(arch)
    cfg = PatchConfig(positions=positions)
    r = _runner(view, CLEAN, CORRUPT, "an", "a", cfg)
    att = attribution_patching(view, r, positions)
    eps = 0.1  # float32: smaller steps drown in rounding (m_clean - m_corr is small in a random model)
    denom = r.m_clean - r.m_corr
    with torch.inference_mode():
        for layer in range(view.n_layers):
            W = r.W_out[layer]
            if positions == "last":
                da = r.a_clean[layer][-1] - r.a_corr[layer][-1]
                h = r.run_suffix_from(layer, (r.resid_corr[layer][-1][None] + eps * da[:, None] * W)[:, None],
                                      r.T - 1)
            else:
                da = (r.a_clean[layer] - r.a_corr[layer]).T
                h = r.run_from(layer, r.resid_corr[layer][None] + eps * da[:, :, None] * W[:, None])
            fd = (r.metric(h).double().numpy() - r.m_corr) / eps / denom
            np.testing.assert_allclose(fd, att[layer], atol=1e-2 * np.abs(att[layer]).max())
    last = patch_neurons(view, CLEAN, CORRUPT, "an", "a", PatchConfig(positions=positions, layers=(2,)))
    assert np.corrcoef(last.recovery[2], att[2])[0, 1] > 0.99


def test_patching_matches_transformerlens(tmp_path):
    """One neuron patched with TransformerLens hooks (hook_post) gives our recovery."""
    pytest.importorskip("transformer_lens")
    from transformer_lens.model_bridge import TransformerBridge

    torch.manual_seed(0)
    model = make_model("gpt2", n_layer=3)
    d = save(model, tmp_path / "gpt2")
    view = from_model(model, make_tokenizer())
    res = patch_neurons(view, CLEAN, CORRUPT, "an", "a", PatchConfig(positions="all"))
    layer = 1
    n = int(np.argmax(np.abs(res.recovery[layer])))
    bridge = TransformerBridge.boot_transformers(str(d), hf_model=copy.deepcopy(model), tokenizer=make_tokenizer(),
                                                 device="cpu")
    tok = make_tokenizer()
    clean = torch.tensor([[tok.eos_token_id] + tok.encode(CLEAN)])
    corr = torch.tensor([[tok.eos_token_id] + tok.encode(CORRUPT)])
    an, a = tok.convert_tokens_to_ids("an"), tok.convert_tokens_to_ids("a")
    with torch.no_grad():
        _, cache = bridge.run_with_cache(clean)
        clean_post = cache[f"blocks.{layer}.mlp.hook_post"]

        def metric(logits):
            return float(logits[0, -1, an] - logits[0, -1, a])

        m_clean, m_corr = metric(bridge(clean)), metric(bridge(corr))

        def hook(act, hook):
            act[:, :, n] = clean_post[:, :, n]
            return act

        patched = bridge.run_with_hooks(corr, fwd_hooks=[(f"blocks.{layer}.mlp.hook_post", hook)])
    tl_recovery = (metric(patched) - m_corr) / (m_clean - m_corr)
    assert abs(res.recovery[layer][n]) > 0.01
    assert tl_recovery == pytest.approx(res.recovery[layer][n], abs=1e-4)
    assert m_clean == pytest.approx(res.m_clean, abs=1e-4) and m_corr == pytest.approx(res.m_corrupted, abs=1e-4)


# ------------------------------------------------------------------------------ CLI
AN_CLEAN = "I climbed up the pear tree and picked a pear. I climbed up the apple tree and picked"
AN_CORR = AN_CLEAN.replace("apple", "lemon")


def test_cli_an_experiment_on_the_default_model(capsys, tmp_path):
    """The "an" study's prompts on the embedded model: whatever it does, the numbers are
    consistent (exact recovery of the strongest neuron equals a one-neuron forward pass), and
    the experiment is recorded in the store."""
    from test_cli import sql_rows

    store = tmp_path / "store"
    res = run_json(capsys, "patch", "--clean", AN_CLEAN, "--corrupted", AN_CORR, "--target", " an",
                   "--contrast", " a", "--store", store)
    assert res["positions"] == "last" and res["direction"] == "denoising"
    assert res["m_clean"] != res["m_corrupted"]
    rec = {int(l): np.array(v["recovery"]) for l, v in res["layers"].items()}
    layer = max(rec, key=lambda l: np.abs(rec[l]).max())
    n = int(np.argmax(np.abs(rec[layer])))
    from discover.adapter import load_model
    from discover.scan import default_model_spec

    view = load_model(default_model_spec())
    ref = patch_loop(view, AN_CLEAN, AN_CORR, " an", " a", layer, [n])
    assert ref[0] == pytest.approx(rec[layer][n], abs=1e-4)
    (stored,), = sql_rows(store, "SELECT recovery FROM patch_results WHERE experiment_id = ? AND layer = ? AND "
                                 "neuron = ?", [res["experiment_id"], layer, n])
    assert stored == pytest.approx(rec[layer][n])
    assert sql_rows(store, "SELECT target, positions, m_clean FROM patch_experiments") == [
        (" an", "last", pytest.approx(res["m_clean"]))]
    rc, out, err = run(capsys, "patch", "--clean", AN_CLEAN, "--corrupted", AN_CORR, "--target", " an",
                       "--contrast", " a", "--layers", 1, "--top", 5, "--no-store")
    assert rc == 0, err
    assert "recovery" in out and "attribution screen" in out


@pytest.mark.parametrize("extra, needles", [
    (["--target", " anx"], ["--target", "not one token"]),
    (["--target", " a"], ["same token"]),
    (["--layers", 7], ["--layers 7", "out of range"]),
    (["--positions", "all", "--corrupted", "I climbed up the lemon tree"], ["equal length", "--positions last"]),
    (["--corrupted", ""], ["empty"]),
    (["--corrupted", AN_CLEAN], ["same logit difference"]),
    (["--batch-size", 0], ["batch_size"]),
    (["--corrupted", "tree " * 300], ["longer than this model's", "positions"]),
])
def test_cli_bad_input(extra, needles, capsys, tmp_path):
    base = {"--clean": AN_CLEAN, "--corrupted": AN_CORR, "--target": " an", "--contrast": " a",
            "--store": tmp_path / "store"}
    argv = ["patch"]
    given = dict(zip(extra[::2], extra[1::2]))
    for k, v in {**base, **given}.items():
        argv += [k, v]
    rc, out, err = run(capsys, *argv)
    assert_one_error_line(rc, err, *needles)
    assert out == "" and not (tmp_path / "store").exists()


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "llama"])
def test_prompts_differing_at_the_first_token(arch):
    """No shared prefix (no BOS, the first word differs): every position reruns from block l+1."""
    view = _view(arch)
    cfg = PatchConfig(positions="all", bos=False)
    clean, corrupt = "apple tree and picked", "lemon tree and picked"
    res = patch_neurons(view, clean, corrupt, "an", "a", cfg)
    for layer in range(view.n_layers):
        ref = patch_loop(view, clean, corrupt, "an", "a", layer, range(0, view.d_mlp, 5), cfg)
        np.testing.assert_allclose(res.recovery[layer][::5], ref, atol=1e-4)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_last_position_patching_with_prompts_of_different_lengths(arch):
    """--positions last patches the final position of each prompt into the other: lengths may differ."""
    view = _view(arch)
    cfg = PatchConfig(positions="last")
    clean, corrupt = "the apple tree and I picked", "a lemon tree picked"
    res = patch_neurons(view, clean, corrupt, "an", "a", cfg)
    assert len(res.clean_tokens) != len(res.corrupted_tokens)
    for layer in range(view.n_layers):
        ref = patch_loop(view, clean, corrupt, "an", "a", layer, range(0, view.d_mlp, 4), cfg)
        np.testing.assert_allclose(res.recovery[layer][::4], ref, atol=1e-4)
    assert res.attribution.shape == (view.n_layers, view.d_mlp) and np.isfinite(res.attribution).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_patching_raises_no_deprecation_warnings(arch):
    """transformers' FutureWarnings (the `past_key_values` argument, removed in 5.40) and torch's
    warnings would become errors in a later release: patching through a KV cache raises none."""
    import warnings

    view = _view(arch, n_layer=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        patch_neurons(view, CLEAN, CORRUPT, "an", "a", PatchConfig(positions="last"))
    bad = [f"{w.category.__name__}: {w.message}" for w in caught
           if issubclass(w.category, (FutureWarning, DeprecationWarning, UserWarning))]
    assert not bad, bad
