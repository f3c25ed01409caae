"""The token study (`discover study`): on a tiny GPT-2 with a planted circuit (L1.N7 reads "apple"
and writes "tree"; the final norm's bias makes "pear" the default prediction), the study mines
prompts where "tree" is predicted, finds single-token counterfactuals flipping it to "pear", and
ranks L1.N7 first with recovery ~1 and "tree" as its most congruent token. Pairs, recoveries and
the logit lens are checked against plain forward passes of the model; the CLI stores the study
in one transaction and refuses bad input in one line; the study also runs on the embedded
default model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import VOCAB, save
from test_cli import assert_one_error_line, run, run_json, snapshot, sql_rows
from test_verify import _apple_corpus, _prediction_model

from discover.adapter import load_model
from discover.corpus import open_corpus
from discover.study import StudyConfig, study

TREE, PEAR = VOCAB.index("tree"), VOCAB.index("pear")
CFG = StudyConfig(tokens=3000, window=8, pairs=6, top=5)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    import transformers

    d = tmp_path_factory.mktemp("study")
    _prediction_model(d / "base", ("tree",))
    m = transformers.AutoModelForCausalLM.from_pretrained(str(d / "base"))
    with torch.no_grad():  # "pear" is what the model says when L1.N7 is silent
        w = m.lm_head.weight[PEAR]
        m.transformer.ln_f.bias += 1.0 * w / (w @ w)
    path = save(m, d / "model")
    corpus = _apple_corpus(d / "corpus", ("tree",))
    view = load_model(str(path))
    return view, path, corpus, study(view, open_corpus(str(corpus)), "tree", CFG)


def _logits(view, ids):
    with torch.no_grad():
        return view.model(torch.tensor([ids])).logits[0, -1].double()


def test_planted_neuron_ranks_first_from_mined_prompts(planted):
    view, _, _, res = planted
    assert res.target == (TREE, "tree") and res.contrast == (PEAR, "pear")  # the model's usual second choice
    c = res.counts
    assert c["found"] == len(res.pairs) >= 3 and c["tried"] > c["found"]
    assert c["predicted_and_next"] <= min(c["predicted"], c["occurs"]) and 0 < c["predicted"] <= c["positions"]
    top = res.top[0]
    assert (top["neuron"], top["token_rank"]) == ("L1.N7", 1)
    assert top["recovery"] > 0.9 and res.top[1]["recovery"] < 0.5
    assert res.layers["mlp"][1] > 0.9 and max(abs(a) for a in res.layers["attn"]) < 0.2


def test_pairs_are_single_token_flips(planted):
    """Each pair: equal lengths, one substituted position; the clean prompt's top prediction is the
    target and the corrupted one's the contrast (plain forward passes of the model)."""
    view, _, _, res = planted
    for p in res.pairs:
        assert len(p.clean) == len(p.corrupted) == CFG.window + 1 and p.clean[0] == p.corrupted[0] == 0
        diff = [i for i, (a, b) in enumerate(zip(p.clean, p.corrupted)) if a != b]
        assert diff == [p.position]
        lc, lx = _logits(view, p.clean), _logits(view, p.corrupted)
        assert int(lc.argmax()) == TREE and int(lx.argmax()) == PEAR
        assert p.m_clean == pytest.approx(float(lc[TREE] - lc[PEAR]), abs=1e-4)
        assert p.m_corrupted == pytest.approx(float(lx[TREE] - lx[PEAR]), abs=1e-4)


def test_recovery_equals_one_hooked_forward_pass_per_neuron(planted):
    """Mean recovery over the pairs, against a hook that gives each neuron its clean activation at
    the last position of the corrupted run."""
    view, _, _, res = planted
    site = view.act_module(1)
    for n in (7, 0, 50):
        vals = []
        for p in res.pairs:
            got = {}
            h = site.register_forward_pre_hook(lambda m, a: got.__setitem__("a", a[0].detach().clone()))
            try:
                _logits(view, p.clean)
            finally:
                h.remove()

            def patch(m, a, n=n):
                x = a[0].clone()
                x[0, -1, n] = got["a"][0, -1, n]
                return (x,)

            h = site.register_forward_pre_hook(patch)
            try:
                lp = _logits(view, p.corrupted)
            finally:
                h.remove()
            vals.append((float(lp[TREE] - lp[PEAR]) - p.m_corrupted) / (p.m_clean - p.m_corrupted))
        assert res.recovery_mean[1, n] == pytest.approx(np.mean(vals), abs=1e-4)
        assert res.recovery_sd[1, n] == pytest.approx(np.std(vals, ddof=1), abs=1e-4)


def test_logit_lens_ends_at_the_models_logits(planted):
    view, _, _, res = planted
    for which in ("clean", "corrupted"):
        lg = [_logits(view, getattr(p, which)) for p in res.pairs]
        want = np.mean([float(lgt[TREE] - lgt[PEAR]) for lgt in lg])
        assert res.logit_lens[which][-1] == pytest.approx(want, abs=1e-4)
    assert res.logit_lens["clean"][-1] > 0 > res.logit_lens["corrupted"][-1]


def test_cli_stores_the_study_and_prints_json(planted, tmp_path, capsys):
    _, path, corpus, res = planted
    store = tmp_path / "store"
    out = run_json(capsys, "study", "tree", str(path), "--corpus", str(corpus), "--tokens", "3000", "--window", "8",
                   "--pairs", "6", "--top", "5", "--store", store, "--json")
    assert out["target"]["token"] == "tree" and out["contrast"]["token"] == "pear"
    assert out["neurons"][0]["neuron"] == "L1.N7" and out["neurons"][0]["recovery"] > 0.9
    assert len(out["pairs"]) == len(res.pairs) and all("clean" in p and "corrupted" in p for p in out["pairs"])
    examined = out["neurons"][:5]  # --examine 5: a corpus pass, mean ablation, a verdict each
    assert [n["verdict"] for n in examined][0] == "confirmed" and out["pass_id"]
    ev = examined[0]["evidence"]
    assert ev["ablation_z"] <= -3 and ev["ablation_delta_logp"] < 0 and ev["curve_bins"] > 0
    assert all(n["verdict"] != "confirmed" for n in examined[1:])
    curve = sql_rows(store, "SELECT sum(positions), sum(top_prediction) FROM prediction_curves WHERE pass_id = ? AND "
                            "layer = 1 AND neuron = 7 AND token_id = ? AND source = 'study'", [out["pass_id"], TREE])
    assert curve[0][0] > 0 and curve[0][1] > 0
    sid = out["study_id"]
    (n_rows, best), = sql_rows(store, "SELECT count(*), arg_max(layer || '.' || neuron, recovery) FROM study_neurons "
                                      "WHERE study_id = ?", [sid])
    assert (n_rows, best) == (2 * 128, "1.7")
    (target, counts), = sql_rows(store, "SELECT target, counts FROM study_runs WHERE study_id = ?", [sid])
    assert target == "tree" and json.loads(counts)["found"] == len(res.pairs)


def test_hand_written_prompts(planted, capsys, tmp_path):
    _, path, _, _ = planted
    out = run_json(capsys, "study", "tree", str(path), "--clean", "I climbed up the apple", "--corrupted",
                   "I climbed up the lemon", "--contrast", "pear", "--top", "3", "--no-store", "--json")
    assert out["neurons"][0]["neuron"] == "L1.N7" and out["pairs"][0]["source"] == "given"
    assert out["pairs"][0]["substituted"] == ["apple", "lemon"]


@pytest.mark.parametrize("argv, needles", [
    (["tree trunk"], ["TOKEN", "not one token"]),
    (["tree", "--contrast", "tree"], ["same token"]),
    (["tree", "--clean", "I climbed up the apple"], ["--clean and --corrupted go together"]),
    (["tree", "--clean", "the apple", "--corrupted", "the red lemon"], ["equal length"]),
    (["tree", "--pairs", "0"], ["pairs must be >= 1"]),
    (["tree", "--clean", "the apple", "--corrupted", "the apple"], ["same tokens"]),
    (["tree", "--window", "300"], ["--window 300", "positions"]),
    (["tree", "--corpus", "/nonexistent/corpus"], ["does not exist"]),
])
def test_bad_input_is_one_line_and_changes_nothing(planted, argv, needles, capsys, tmp_path):
    _, path, corpus, _ = planted
    store = tmp_path / "store"
    store.mkdir()
    before = snapshot(store)
    extra = [] if "--corpus" in argv or "--clean" in argv else ["--corpus", str(corpus)]
    rc, _, err = run(capsys, "study", argv[0], str(path), *argv[1:], *extra, "--tokens", "500", "--store", store)
    assert_one_error_line(rc, err, *needles)
    assert snapshot(store) == before


def test_study_on_the_embedded_default_model(capsys, tmp_path):
    """The default model and the built-in corpus: " the" is predicted and flipped; the ranked
    neurons' recoveries are the stored ones, in order."""
    out = run_json(capsys, "study", " the", "--tokens", "3000", "--pairs", "2", "--top", "5", "--store",
                   tmp_path / "store", "--json")
    assert out["counts"]["predicted"] > 0 and out["counts"]["found"] == len(out["pairs"]) >= 1
    rec = [n["recovery"] for n in out["neurons"]]
    assert rec == sorted(rec, reverse=True)
    stored = [r[0] for r in sql_rows(tmp_path / "store", "SELECT recovery FROM study_neurons WHERE study_id = ? "
                                                           "ORDER BY recovery DESC LIMIT 5", [out["study_id"]])]
    np.testing.assert_allclose(rec, stored, rtol=1e-12)


def test_report_shows_the_study(planted, tmp_path, capsys):
    """The report's JSON carries the latest study of each token, its neurons get cards, and the
    HTML page draws the study panel in a real browser (when Chromium is installed)."""
    import shutil
    import subprocess

    _, path, corpus, _ = planted
    store = tmp_path / "store"
    run_json(capsys, "study", "tree", str(path), "--corpus", str(corpus), "--tokens", "1500", "--window", "8",
             "--pairs", "3", "--top", "5", "--examine", "2", "--store", store, "--json")
    out = tmp_path / "r.json"
    rc, _, err = run(capsys, "report", str(path), "--store", store, "--format", "json", "--out", out)
    assert rc == 0, err
    rep = json.loads(out.read_text())
    (st,) = rep["studies"]
    assert st["target"] == "tree" and st["neurons"][0]["neuron"] == "L1.N7" and st["pairs"][0]["clean_text"]
    curve = {c["neuron"]: c for c in st["curves"]}["L1.N7"]  # drawn from the study's own corpus pass
    assert sum(b["positions"] for b in curve["bins"]) > 0 and sum(b["top_prediction"] for b in curve["bins"]) > 0
    assert "L1.N7" in {c["neuron"] for c in rep["cards"]}
    page = tmp_path / "r.html"
    assert run(capsys, "report", str(path), "--store", store, "--out", page)[0] == 0
    browser = shutil.which("chromium")
    if browser is None:
        pytest.skip("chromium is not installed: run tests/setup_system.sh (CI does)")
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                          f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    assert "Token study: \u201ctree\u201d against \u201cpear\u201d" in dom and "Logit lens" in dom
    assert "the study's corpus pass" in dom


def test_report_of_a_catalog_written_before_studies(planted, tmp_path, capsys):
    """A read-only report on a catalog without the study tables (an older version's): no study
    panel, no error."""
    from discover.store import Store

    _, path, _, _ = planted
    store = tmp_path / "store"
    assert run(capsys, "scan", str(path), "--store", store)[0] == 0
    with Store(store) as st:
        st.con.execute("DROP TABLE study_runs")
        st.con.execute("DROP TABLE study_neurons")
    from discover.report import build_report

    with Store(store, read_only=True) as st:
        assert not st.has_table("study_runs")
        assert build_report(st, str(path))["studies"] == []
