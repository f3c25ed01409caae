"""Candidates from every source (`discover.candidates`): a neuron aimed at a family of tokens is
found by its standardised-cosine tail even when the kurtosis roles miss it; the studied neurons
and the most congruent neurons of the tokens the model predicts far less often than they occur join; the budget is shared round robin,
each source strongest first, each (neuron, role) once with all its sources; the z values equal a
direct computation from the weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import VOCAB, save
from test_verify import _prediction_model

from discover.adapter import load_model
from discover.candidates import Tails, bonferroni_cut, candidates, underpredicted
from discover.scan import RoleThresholds, ScanConfig, scan_model
from discover.store import Store

FAMILY = ("tree", "pear", "lemon", "apple", "an")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("cands")
    path = _prediction_model(d / "base", ("tree",))
    import transformers

    m = transformers.AutoModelForCausalLM.from_pretrained(str(path))
    with torch.no_grad():  # L1.N20 writes a family of five tokens equally: no single token dominates
        w = sum(m.lm_head.weight[VOCAB.index(t)] / m.lm_head.weight[VOCAB.index(t)].norm() for t in FAMILY)
        m.transformer.h[1].mlp.c_proj.weight[20] = 2.0 * w / w.norm()
    path = save(m, d / "model")
    store = Store(d / "store")
    # kurtosis roles made strict: only the sharpest neurons get one
    scan_model(str(path), store, ScanConfig(roles=RoleThresholds(kurtosis=40.0)), progress=False)
    yield store, load_model(str(path))
    store.close()


def test_tail_source_finds_a_family_neuron_the_roles_miss(env):
    store, view = env
    roles = {(l, n) for l, n in store.con.execute("SELECT layer, neuron FROM roles").fetchall()}
    assert (1, 20) not in roles
    cands = candidates(store, view.checkpoint_id, 200)
    by = {(c["layer"], c["neuron"], c["role"]): c for c in cands}
    c = by[(1, 20, "prediction")]
    assert "tail" in c["sources"] and VOCAB[c["token_id"]] in FAMILY
    tails = Tails(view, 0.05)
    z = tails.z(1, 20)
    assert c["z"] == pytest.approx(float(z[c["token_id"]]), rel=1e-4)  # the scan's cosines, standardised
    assert sum(z[VOCAB.index(t)] > tails.cut for t in FAMILY) >= 2  # several tokens of the family pass the cut
    assert tails.cut == pytest.approx(bonferroni_cut(0.05, len(VOCAB)))


def test_budget_is_shared_by_the_sources_each_strongest_first(env):
    store, view = env
    every = candidates(store, view.checkpoint_id, 10_000)
    keys = [(c["layer"], c["neuron"], c["role"]) for c in every]
    assert len(keys) == len(set(keys))  # one entry per (neuron, role), with all its sources
    for src in ("kurtosis", "tail"):  # each source's own entries come strongest first
        z = [abs(c["z"]) for c in every if c["sources"][0] == src]
        assert z == sorted(z, reverse=True)
    top = candidates(store, view.checkpoint_id, 3)
    assert top == every[:3] and (1, 7) in {(c["layer"], c["neuron"]) for c in top[:2]}  # the planted "tree" neuron
    assert all(abs(c["z"]) > bonferroni_cut(0.05, len(VOCAB)) for c in every if c["sources"] == ["tail"])


def test_study_and_corpus_sources(env):
    store, view = env
    tails = Tails(view, 0.05)
    tree = VOCAB.index("tree")
    import json

    store.con.execute("INSERT INTO study_runs (study_id, checkpoint_id, target, target_id, neurons, created_at) "
                      "VALUES ('s1', ?, 'tree', ?, ?, now())",
                      [view.checkpoint_id, tree, json.dumps([{"layer": 0, "neuron_index": 3, "recovery": 0.4},
                                                             {"layer": 0, "neuron_index": 4, "recovery": 0.01}])])
    the = VOCAB.index("the")
    interesting = [{"token_id": the, "occurs": 500, "predicted": 20, "z": 21.0},
                   {"token_id": tree, "occurs": 30, "predicted": 3, "z": 4.7}]
    got = candidates(store, view.checkpoint_id, 10_000, tails=tails, interesting=interesting)
    by = {(c["layer"], c["neuron"], c["role"]): c for c in got}
    study = [c for c in got if "study" in c["sources"]]
    # not examined: the study's 3 strongest (both here), with the studied token
    assert sorted((c["layer"], c["neuron"], c["token_id"]) for c in study) == [(0, 3, tree), (0, 4, tree)]
    assert {c["neuron"]: c["z"] for c in study}[3] == pytest.approx(float(tails.z(0, 3)[tree]))
    # a study's neurons are reached within a small budget, whatever their |z|
    small = candidates(store, view.checkpoint_id, 4, tails=tails, interesting=interesting[:1])
    assert any("study" in c["sources"] for c in small)
    best = store.con.execute("SELECT layer, neuron FROM token_neurons WHERE token_id = ? AND sign = 1 AND rank = 0",
                             [the]).fetchone()
    c = by[(best[0], best[1], "prediction")]
    assert "corpus" in c["sources"] and (c["token_id"] == the or "tail" in c["sources"] or "kurtosis" in c["sources"])
    if c["sources"][0] == "corpus":
        assert c["underpredicted"] == interesting[0]
    assert np.isfinite([c["z"] for c in got]).all()


def test_underpredicted_tokens_equal_direct_counts():
    """The corpus source's tokens: next often, the model's top prediction rarely, ranked by the
    z of the two counts' difference; counted here position by position."""
    rng = np.random.default_rng(0)
    nxt = rng.integers(0, 30, 4000)
    top = np.where(rng.random(4000) < 0.7, nxt, rng.integers(0, 30, 4000))
    top[nxt == 7] = 3  # token 7: never predicted where it occurs (the seed's " an")
    nxt[::50] = -1  # positions without a next token do not count
    got = underpredicted(nxt, top, k=30)
    occurs = {t: int(sum(1 for a in nxt if a == t)) for t in range(30)}
    predicted = {t: int(sum(1 for a, b in zip(nxt, top) if a >= 0 and b == t)) for t in range(30)}
    want = sorted(((occurs[t] - predicted[t]) / np.sqrt(occurs[t] + predicted[t]), -t) for t in range(30)
                  if occurs[t] > predicted[t] and occurs[t] >= 5)[::-1]
    assert [g["token_id"] for g in got] == [-t for _, t in want]
    assert got[0]["token_id"] == 7 and got[0]["occurs"] == occurs[7] and got[0]["predicted"] == predicted[7]
    assert [g["z"] for g in got] == pytest.approx([z for z, _ in want])
    assert 3 not in [g["token_id"] for g in got]  # over-predicted: not interesting here
    assert underpredicted(nxt, top, k=2) == got[:2] and underpredicted(np.full(5, -1), np.zeros(5, int)) == []
