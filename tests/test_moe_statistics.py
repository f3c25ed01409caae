"""Statistics over routed tokens (mixtures of experts, METHODS.md: "statistics count only routed
tokens, and say how many"), against references computed here one sequence at a time from
`ModelView.trace` (every expert's activation and the routing's write scale at every position):

- the corpus pass: per neuron the number of tokens routed to its expert (a token goes to exactly
  `num_experts_per_tok` experts; the shared expert sees every token), moments, frequency, min,
  max and histogram over those tokens only; top examples by activation over routed positions and
  by direct logit attribution through the routing weight; curves counting routed positions;
- verification: the routed rows recorded by `features.collect`, per-expert means, feature
  scores over an expert's tokens equal to a direct AUROC over them, and mean ablation through
  the routing equal to a hooked full forward pass per sequence;
- the CLI: `run` end to end names experts in its verdicts, `query neuron` says how many tokens
  were routed, universality refuses in one line with the reason."""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.stats
import torch
from conftest import VOCAB, save
from test_activations import direct_curve
from test_cli import assert_one_error_line, run, snapshot, sql_rows
import family_checks as fc
from test_family_moe import E, I, tiny

import discover.activations as A
from discover import _act_kernels as K
from discover.adapter import load_model
from discover.corpus import open_corpus
from discover.store import Store

CONTEXT, BATCH, TOP_K = 16, 4, 2  # TOP_K: tiny()'s num_experts_per_tok
AN, THE = VOCAB.index("an"), VOCAB.index("the")


def _corpus(root: Path, n_docs: int = 24, seed: int = 3) -> Path:
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        n = rng.choice([5, 15, 16, 40])
        (root / f"d{i:02d}.txt").write_text(" ".join(rng.choice(VOCAB[1:40]) for _ in range(n)))
    return root


def _reference(path, corpus):
    """Per counted position: activations and write scales (L, N), DLA through the routing, top
    prediction, next token, document."""
    view = load_model(str(path))
    tok = view.tokenizer
    seqs = list(A.sequences(open_corpus(str(corpus)), "all", tok, CONTEXT, A.bos_id(tok)))
    U = view.processed_unembed().double().numpy()
    C = [view.processed_W_out(l).double().numpy() @ U for l in range(view.n_layers)]  # (N, vocab)
    fn = view.final_norm()
    rows = {k: [] for k in ("acts", "scale", "dla", "pred", "next", "doc")}
    for ordinal, _, _, ids, nxt in seqs:
        got = {}
        h = view.model.get_submodule(view.final_norm_site()).register_forward_pre_hook(
            lambda m, a: got.__setitem__("resid", a[0][0].double().numpy()))
        try:
            tr = view.trace(torch.tensor([ids]))
        finally:
            h.remove()
        with torch.no_grad():
            pred = view.logits(tr.hidden)[0].argmax(-1).numpy()
        r = got["resid"]
        inv = 1 / np.sqrt((r ** 2).mean(-1) + fn.eps)
        nexts = list(ids[1:]) + [nxt]
        for t in range(1, len(ids)):
            a = np.stack([tr.acts[l][0, t].double().numpy() for l in range(view.n_layers)])
            s = np.stack([tr.scales[l][0, t].double().numpy() for l in range(view.n_layers)])
            rows["acts"].append(a)
            rows["scale"].append(s)
            rows["dla"].append(np.stack([a[l] * s[l] * C[l][:, nexts[t]] * inv[t] for l in range(view.n_layers)])
                               if nexts[t] >= 0 else np.full_like(a, np.nan))
            rows["pred"].append(int(pred[t]))
            rows["next"].append(nexts[t])
            rows["doc"].append(ordinal)
    out = SimpleNamespace(**{k: np.array(v) for k, v in rows.items()})
    out.routed = out.scale != 0  # (R, L, N)
    return out


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe"])
def env(request, tmp_path_factory):
    arch = request.param
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp(arch)
    path = save(tiny(arch), d / "m")
    corpus = _corpus(d / "corpus")
    pairs = ('L1.E2.N5:"an"', "L0.E1.N3:the") + (("L1.S.N3:the",) if arch == "qwen2_moe" else ())
    cfg = A.ActivationConfig(tokens=10**9, batch_size=BATCH, context=CONTEXT, top_k=4, before=3, after=1,
                             pairs=pairs, save_every=0)
    with Store(d / "store") as st:
        summary = A.run_activations(str(path), st, cfg, corpus=str(corpus), progress=False)
    return SimpleNamespace(arch=arch, dir=d, path=path, corpus=corpus, store=d / "store", cfg=cfg, summary=summary,
                           ref=_reference(path, corpus))


def _stats(env):
    rows = sql_rows(env.store, "SELECT layer, neuron, act_tokens, act_mean, act_var, act_skew, act_kurt, act_freq, "
                               "act_min, act_max FROM neuron_activations ORDER BY layer, neuron")
    L, N = env.ref.acts.shape[1:]
    return np.array([[np.nan if v is None else v for v in r[2:]] for r in rows], np.float64).reshape(L, N, 8)


def test_counts_are_the_tokens_routed_to_each_expert(env):
    ref, got = env.ref, _stats(env)
    R, L, N = ref.acts.shape
    assert env.summary.tokens == R
    np.testing.assert_array_equal(got[..., 0], ref.routed.sum(0))
    routed = got[:, :E * I, 0].reshape(L, E, I)
    assert (routed == routed[:, :, :1]).all()  # one count per expert
    np.testing.assert_array_equal(routed[:, :, 0].sum(1), TOP_K * R)  # each token goes to TOP_K experts
    assert (routed < R).all() and (routed > 0).all()
    if env.arch == "qwen2_moe":
        np.testing.assert_array_equal(got[:, E * I:, 0], R)  # the shared expert sees every token


def test_moments_are_over_routed_tokens_only(env):
    ref, got = env.ref, _stats(env)
    R, L, N = ref.acts.shape
    for l in range(L):
        for n in range(N):
            x = ref.acts[ref.routed[:, l, n], l, n]
            want = [x.mean(), x.var(), scipy.stats.skew(x), scipy.stats.kurtosis(x, fisher=False), (x > 0).mean(),
                    x.min(), x.max()]
            np.testing.assert_allclose(got[l, n, 1:], want, rtol=2e-4, atol=1e-7, err_msg=f"L{l} n{n}")
    # and not the statistics of every position: the unrouted activations differ
    every = ref.acts[:, 1, 2 * I + 5].mean()
    assert abs(got[1, 2 * I + 5, 1] - every) > 1e-6


def test_histograms_bin_routed_tokens_only(env):
    ref = env.ref
    R, L, N = ref.acts.shape
    got = np.zeros((L, N, K.N_BINS), np.int64)
    for l, n, b, c in sql_rows(env.store, "SELECT layer, neuron, bin, count FROM activation_histograms"):
        got[l, n, b] = c
    for l in range(L):
        for n in range(N):
            x = ref.acts[ref.routed[:, l, n], l, n].astype(np.float32)
            np.testing.assert_array_equal(got[l, n], np.bincount(K.bin_index(x), minlength=K.N_BINS))


@pytest.mark.parametrize("kind", ["activation", "dla"])
def test_strongest_example_is_the_routed_maximum(env, kind):
    """Rank 0 holds the largest value over routed positions (DLA: activation x routing weight x
    congruence with the next token / final-norm scale), in a document that reaches it."""
    ref = env.ref
    vals = ref.acts if kind == "activation" else ref.dla
    got = {(l, n): (v, doc) for l, n, v, doc in sql_rows(
        env.store, "SELECT layer, neuron, value, doc_ordinal FROM activation_examples WHERE kind = ? AND rank = 0",
        [kind])}
    R, L, N = ref.acts.shape
    checked = 0
    for l in range(L):
        for n in range(N):
            ok = ref.routed[:, l, n] & np.isfinite(vals[:, l, n])
            if not ok.any():
                assert (l, n) not in got
                continue
            best = vals[ok, l, n].max()
            v, doc = got[(l, n)]
            assert abs(v - best) <= 1e-5 * max(1.0, abs(best)), (l, n, v, best)
            assert np.isclose(vals[ok & (ref.doc == doc), l, n].max(), v, rtol=1e-5, atol=1e-6)
            checked += 1
    assert checked > N


def test_curves_count_routed_positions(env):
    ref = env.ref
    for layer, neuron, token in [(1, 2 * I + 5, AN), (0, I + 3, THE)] + ([(1, E * I + 3, THE)] if env.arch == "qwen2_moe"
                                                                      else []):
        rows = sql_rows(env.store, "SELECT bin, positions, top_prediction, with_next, is_next FROM prediction_curves "
                                   "WHERE layer = ? AND neuron = ? AND token_id = ?", [layer, neuron, token])
        got = {r[0]: r[1:] for r in rows}
        rows_ = np.flatnonzero(ref.routed[:, layer, neuron])
        assert got == direct_curve(ref.acts[rows_, layer, neuron], ref.pred[rows_], ref.next[rows_], token)


def test_query_neuron_says_how_many_tokens_were_routed(env, capsys):
    n = int(env.ref.routed[:, 1, 2 * I + 5].sum())
    rc, out, err = run(capsys, "query", "neuron", "L1.E2.N5", "--model", str(env.path), "--examples", "--store", env.store)
    assert rc == 0, err
    assert f"activations over {env.summary.tokens:,} tokens ({n:,} routed to this expert)" in out


# ---------------------------------------------------------------------- verification
@pytest.fixture(scope="module")
def data(env):
    from discover.features import collect

    view = load_model(str(env.path))
    return view, collect(view, open_corpus(str(env.corpus)), [], tokens=600, context=CONTEXT, split="all")


def test_verify_rows_and_means_are_per_expert(env, data):
    from discover.verify import counted_means

    view, d = data
    ref = env.ref
    R = d.tokens
    assert R == min(600, len(ref.acts))
    np.testing.assert_allclose(np.asarray(d.acts).T.reshape(R, view.n_layers, -1), ref.acts[:R], atol=1e-5)
    for l in range(view.n_layers):
        for n in (0, I + 3, 2 * I + 5, E * I - 1) + ((E * I + 3,) if env.arch == "qwen2_moe" else ()):
            np.testing.assert_array_equal(d.counted(l, n), ref.routed[:R, l, n])
    means = counted_means(d).reshape(view.n_layers, -1)
    want = np.array([[ref.acts[:R][ref.routed[:R, l, n], l, n].mean() for n in range(view.d_mlp)]
                     for l in range(view.n_layers)])
    np.testing.assert_allclose(means, want, rtol=1e-6, atol=1e-7)


def test_feature_scores_of_an_expert_are_over_its_tokens(env, data):
    from discover.features import score
    from discover.verify import auroc_score

    view, d = data
    rng = np.random.default_rng(0)
    labels = np.stack([d.next_token == THE, rng.random(d.tokens) < 0.3], 1)
    d.rules = [SimpleNamespace(name="next the"), SimpleNamespace(name="random")]
    s = score(d, labels=labels, min_positives=4)
    for l, n in ((1, 2 * I + 5), (0, I + 3), (1, 0)):
        rows = d.counted(l, n)
        g = l * view.d_mlp + n
        assert s.counted[g] == rows.sum() < d.tokens
        x = np.asarray(d.acts[g], np.float64)[rows]
        for j in range(2):
            assert s.n_pos[g, j] == labels[rows, j].sum()
            assert s.auroc[g, j] == pytest.approx(auroc_score(x, labels[rows, j]), abs=1e-12)


def test_mean_ablation_writes_through_the_routing(env):
    """Batched mean ablation of expert neurons equals one hooked forward pass per sequence whose
    expert activation is set to its mean: the recomputed block writes it through the routing, so
    only positions routed to the expert change (`family_checks.ablation_equals_hooked_forward`)."""
    fc.ablation_equals_hooked_forward(tiny(env.arch))


# ---------------------------------------------------------------------- the CLI
def test_run_names_experts_and_universality_refuses(env, tmp_path, capsys):
    import json

    store = tmp_path / "store"
    out = tmp_path / "r.json"
    rc, _, err = run(capsys, "run", str(env.path), "--corpus", str(env.corpus), "--tokens", "400", "--verify-tokens",
                     "400", "--verify-split", "all", "--format", "json", "--out", str(out), "--store", store)
    assert rc == 0, err
    rows = sql_rows(store, "SELECT layer, neuron, kind, evidence FROM hypotheses")
    assert rows
    rc, text, err = run(capsys, "query", "verdicts", "--model", str(env.path), "--store", store, "--json")
    assert rc == 0, err
    names = [h["neuron"] for h in json.loads(text)["hypotheses"]]
    assert names and all(n.split(".")[1][0] in "ES" for n in names), names
    ev = [json.loads(e) for _, _, k, e in rows if k != "feature"]
    assert all("counted_tokens" in e and e["counted_tokens"] <= e["held_out_tokens"] for e in ev)
    assert all(c.split(".")[1][0] in "ES" for e in ev for c in e.get("controls", []))
    before = snapshot(store)
    other = save(tiny(env.arch), tmp_path / "other")
    rc, _, err = run(capsys, "universality", str(env.path), str(other), "--corpus", str(env.corpus), "--tokens", "200",
                     "--store", store)
    assert_one_error_line(rc, err, "universality is not defined", "routed to it")
    assert snapshot(store) == before


def test_watch_over_expert_checkpoints_tracks_them_by_name(env, tmp_path, capsys):
    """`discover watch` over two checkpoints of a mixture of experts: both processed (corpus pass
    and verify over routed tokens), and a neuron's history is followed under its expert name."""
    import json

    run_dir = tmp_path / "run"
    model = tiny(env.arch)
    save(model, run_dir / "checkpoint-1")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save(model, run_dir / "checkpoint-2")
    store = tmp_path / "store"
    rc, _, err = run(capsys, "watch", str(run_dir), "--once", "--corpus", str(env.corpus), "--tokens", "300",
                     "--verify-tokens", "300", "--verify-split", "all", "--candidates", "3", "--settle", "0", "--reports",
                     str(tmp_path / "reports"), "--store", store)
    assert rc == 0, err
    assert sql_rows(store, "SELECT count(*) FROM watch_checkpoints WHERE status = 'done'") == [(2,)]
    routed = sql_rows(store, "SELECT max(act_tokens), any_value(p.tokens) FROM neuron_activations "
                             "JOIN activation_passes p USING (pass_id) WHERE neuron < ? GROUP BY pass_id", [E * I])
    assert len(routed) == 2 and all(0 < most < total for most, total in routed)  # no expert saw every token
    rc, text, err = run(capsys, "query", "neuron", "L1.E2.N5", "--history", "--model", str(run_dir), "--store", store,
                        "--json")
    assert rc == 0, err
    hist = json.loads(text)
    assert hist["start"]["neuron"] == "L1.E2.N5" and len(hist["history"]) == 2
    assert all(p["neuron"].startswith("L1.E") for p in hist["history"])
