"""The verifier on planted neurons: a digit detector (w_in aligned with what digit tokens share
in the embedding) is confirmed for the number rule and for no unrelated rule; a planted "apple ->
tree" prediction neuron is confirmed by its AUROC and by mean ablation against same-layer
controls; a random model gets few confirmations; shuffled labels pass at most the FDR level;
verdicts, evidence and the decision rule are in the catalog and behind `query verdicts`."""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import VOCAB, make_model, save
from test_cli import assert_one_error_line, run, run_json, snapshot

from discover.store import Store
from discover.verify import VerifyConfig, query_verdicts, verify_model

D_MODEL, D_MLP = 64, 128
DIGIT_NEURON = 5
CFG = VerifyConfig(tokens=6000, split="all", candidates=5, controls=10, per_rule=3, min_positives=20)


def _text_corpus(root: Path, n_docs: int = 60, seed: int = 0) -> Path:
    """English-like sentences with numbers, dates and code, one document per file."""
    rng = random.Random(seed)
    words = ["the", "apple", "tree", "was", "green", "and", "we", "picked", "it", "They", "saw", "John", "in",
             "Paris", "on", "Monday", "with", "a", "dog", "cats", "ran", "quickly", "because", "of", "rain"]
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        lines = []
        for _ in range(rng.randint(4, 9)):
            sent = [rng.choice(words) for _ in range(rng.randint(4, 9))]
            for _ in range(rng.randint(0, 3)):
                sent.insert(rng.randrange(len(sent) + 1), str(rng.choice([7, 42, 1999, 2021, 365, 12, 3, 880])))
            lines.append(" ".join(sent).capitalize() + ".")
        if rng.random() < 0.5:
            lines.append(f"def f{i}(x, y):\n        return x + {rng.randint(1, 99)}  # add")
        (root / f"doc{i:03d}.txt").write_text("\n".join(lines) + "\n")
    return root


def _digit_model(tok_dir: Path, out: Path, plant: bool) -> Path:
    """A random 2-layer GPT-2 on the embedded model's BPE vocabulary; with `plant`, every
    token made only of digits gets a shared embedding direction u, and neuron L0.N5 reads u."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    torch.manual_seed(1)
    m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=D_MODEL, n_head=4, n_inner=D_MLP, vocab_size=len(tok),
                                   n_positions=256, bos_token_id=0, eos_token_id=0)).eval()
    if plant:
        digits = [i for i in range(len(tok)) if tok.decode([i]).strip().isdigit()]
        assert len(digits) > 10
        with torch.no_grad():
            u = torch.randn(D_MODEL)
            u /= u.norm()
            m.transformer.wte.weight[digits] += 0.2 * u  # the embeddings are ~N(0, 0.02): this dominates
            m.transformer.h[0].attn.c_proj.weight.mul_(0.0)  # layer 0's MLP then sees its own token
            m.transformer.wpe.weight.mul_(0.1)
            w = m.transformer.h[0].mlp.c_fc.weight  # Conv1D (d_model, d_mlp)
            w[:, DIGIT_NEURON] = 4.0 * u / m.transformer.h[0].ln_2.weight
            m.transformer.h[0].mlp.c_fc.bias[DIGIT_NEURON] = -2.0
    out.mkdir(parents=True, exist_ok=True)
    m.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from discover.scan import default_model_spec

    d = tmp_path_factory.mktemp("verify")
    corpus = _text_corpus(d / "corpus")
    planted = _digit_model(Path(default_model_spec()), d / "planted", plant=True)
    rand = _digit_model(Path(default_model_spec()), d / "random", plant=False)
    out = SimpleNamespace(dir=d, corpus=corpus, planted=planted, random=rand, store=d / "store")
    with Store(out.store) as st:
        out.planted_summary = verify_model(str(planted), st, CFG, corpus=str(corpus), progress=False)
        out.random_summary = verify_model(str(rand), st, CFG, corpus=str(corpus), progress=False)
        out.planted_verdicts = query_verdicts(st, str(planted), top=10_000)["hypotheses"]
        out.random_verdicts = query_verdicts(st, str(rand), top=10_000)["hypotheses"]
    return out


def test_planted_digit_detector_is_confirmed_for_numbers(env):
    mine = [h for h in env.planted_verdicts if h["neuron"] == f"L0.N{DIGIT_NEURON}"]
    by_rule = {h["subject"]: h for h in mine}
    assert "number" in by_rule, [h["subject"] for h in mine]
    h = by_rule["number"]
    assert h["verdict"] == "confirmed", h
    ev = h["evidence"]
    assert ev["auroc"] > 0.95 and ev["f1"] > 0.8 and ev["q"] < 1e-6
    assert h["decided_by"].startswith("q <= 0.05 and AUROC")
    unrelated = {"python_keyword", "capitalized_word", "comma", "noun", "verb", "end_of_sentence", "proper_noun",
                 "start_of_line", "determiner", "pronoun"}
    assert not [x for x in mine if x["subject"] in unrelated and x["verdict"] == "confirmed"]


def test_random_model_confirms_few_hypotheses(env):
    hyps = [h for h in env.random_verdicts if h["kind"] == "feature"]
    assert len(hyps) >= 30
    confirmed = [h for h in hyps if h["verdict"] == "confirmed"]
    assert len(confirmed) / len(hyps) < 0.05, [(h["neuron"], h["subject"]) for h in confirmed]


def test_shuffled_labels_pass_at_most_the_fdr_level(env):
    for s in (env.planted_summary, env.random_summary):
        assert s.shuffled["pairs"] > 1000
        assert s.shuffled["fraction"] <= CFG.alpha


def test_verdicts_are_stored_with_evidence(env, capsys):
    res = run_json(capsys, "query", "verdicts", "--model", env.planted, "--store", env.store, "--verdict", "confirmed")
    assert res["hypotheses"] and all(h["verdict"] == "confirmed" for h in res["hypotheses"])
    rows = snapshot(env.store)[0]
    runs = rows["verify_runs"]
    assert len(runs) == 2
    settings = json.loads(runs[0][6])
    assert settings["alpha"] == CFG.alpha and settings["min_auroc"] == CFG.min_auroc
    rc, out, err = run(capsys, "query", "verdicts", "--model", env.planted, "--store", env.store, "--top", 3)
    assert rc == 0 and "confirmed" in out and "decided by" in out


# ---------------------------------------------------------------- prediction neuron
def _prediction_model(out: Path, targets=("tree",), sign: float = 1.0, plant_l0: bool = False) -> Path:
    """Tiny word-level GPT-2 with L1.N7 planted: reads "apple", writes `sign` times the sum of the
    unit unembeddings of `targets` (one token, or a class of them). With `plant_l0`, L0.N9 does the
    opposite one layer earlier, so that its effect on the logits runs through block 1."""
    torch.manual_seed(0)
    m = make_model("gpt2", n_layer=2, d_model=D_MODEL, d_mlp=D_MLP)
    apple = VOCAB.index("apple")
    with torch.no_grad():
        ts = [m.lm_head.weight[VOCAB.index(w)] / m.lm_head.weight[VOCAB.index(w)].norm() for w in targets]
        q, _ = torch.linalg.qr(torch.stack(ts, 1))  # (d, k): the targets' span
        u = torch.randn(D_MODEL)
        u -= q @ (q.T @ u)  # tied embeddings: keep "apple"'s new direction out of the targets' unembeddings
        u /= u.norm()
        m.transformer.wte.weight[apple] += 1.5 * u
        ln = m.transformer.h[1].ln_2.weight
        m.transformer.h[1].mlp.c_fc.weight[:, 7] = 6.0 * u / ln
        m.transformer.h[1].mlp.c_fc.bias[7] = -3.0
        w = sum(ts)
        m.transformer.h[1].mlp.c_proj.weight[7] = sign * 3.0 * w / w.norm()
        if plant_l0:
            # small: its output must not drown "apple"'s direction before L1.N7 reads it
            m.transformer.h[0].mlp.c_fc.weight[:, 9] = 1.0 * u / m.transformer.h[0].ln_2.weight
            m.transformer.h[0].mlp.c_fc.bias[9] = -0.5
            m.transformer.h[0].mlp.c_proj.weight[9] = -0.3 * w / w.norm()  # against X: p(X) is not saturated
    return save(m, out)


def _apple_corpus(root: Path, targets) -> Path:
    rng = random.Random(0)
    root.mkdir()
    others = [w for w in VOCAB[1:] if w not in ("apple", *targets)]
    for i in range(40):
        words = []
        for _ in range(60):
            words += ["apple", rng.choice(targets)] if rng.random() < 0.15 else [rng.choice(others)]
        (root / f"d{i}.txt").write_text(" ".join(words))
    return root


@pytest.mark.parametrize("targets", [("tree",), ("tree", "pear")], ids=["one-token", "two-token-class"])
def test_planted_prediction_neuron_is_confirmed(tmp_path, targets):
    """The hypothesis tests the neuron's tail X: the one token it writes, or the class of tokens it
    writes equally (both standing out of the vocabulary distribution), and nothing else."""
    corpus = _apple_corpus(tmp_path / "corpus", targets)
    model = _prediction_model(tmp_path / "pred", targets)
    from discover.scan import RoleThresholds, ScanConfig, scan_model

    with Store(tmp_path / "store") as st:
        # 97 tokens in 64 dimensions: one token's direction stands out less than in a real vocabulary (the
        # planted neuron's kurtosis is 9.2 for one token and 6.3 for two; the next neuron's is 4.4)
        kurt = 8.0 if len(targets) == 1 else 6.0
        scan_model(str(model), st, ScanConfig(roles=RoleThresholds(kurtosis=kurt)), progress=False)
        from discover.activations import ActivationConfig, run_activations

        run_activations(str(model), st, ActivationConfig(tokens=2000, batch_size=8), corpus=str(corpus), progress=False)
        verify_model(str(model), st, VerifyConfig(tokens=3000, split="all", candidates=5, controls=12, per_rule=1),
                     corpus=str(corpus), progress=False)
        hyps = query_verdicts(st, str(model), kind="prediction")["hypotheses"]
    h = {x["neuron"]: x for x in hyps}["L1.N7"]
    ev = h["evidence"]
    assert sorted(ev["tokens"]) == sorted(targets) and ev["tail_size"] == len(targets), ev
    assert ev["tail_cut_z"] == pytest.approx(3.28, abs=0.01)  # Phi^-1(1 - 0.05 / 97)
    assert min(ev["tokens_z"]) > ev["tail_cut_z"]
    assert h["subject"] == ev["tokens"][0]  # the strongest token names the hypothesis; X is in the evidence
    assert h["verdict"] == "confirmed", h
    assert ev["auroc_next"] > 0.9 and ev["ablation_delta_logp"] < 0 and ev["ablation_z"] < -3
    assert ev["n_next"] >= 100 and len(ev["controls"]) == 12
    # the corpus pass recorded this candidate's curve: the top-prediction fraction rises with activation
    assert ev["curve_bins"] >= 3 and ev["curve_spearman"] > 0.5


def test_tail_of_a_suppression_neuron_is_its_bottom_class(tmp_path):
    """X is read from the whole vocabulary on the candidate's side: the bottom tokens for a
    suppression neuron; on the other side only the named token is there (nothing passes)."""
    from discover.adapter import load_model
    from discover.candidates import Tails

    view = load_model(str(_prediction_model(tmp_path / "m", ("tree", "pear"), sign=-1.0)))
    tails = Tails(view, 0.05)
    tree, pear = VOCAB.index("tree"), VOCAB.index("pear")
    ids, z, n = tails(1, 7, "suppression", tree)
    assert sorted(ids) == sorted([tree, pear]) and n == 2 and max(z) < -tails.cut
    ids, z, n = tails(1, 7, "suppression", pear)
    assert ids[0] == pear and sorted(ids) == sorted([tree, pear])
    ids, z, n = tails(1, 7, "prediction", tree)
    assert ids == [tree] and n == 1  # X is the named token only: nothing on the top side passes the cut
    assert tails.cut == pytest.approx(3.28, abs=0.01)


def test_one_line_descriptions_of_prediction_and_suppression_verdicts():
    from discover.pipeline import describe
    from discover.verify import subject_label

    card = {"top_tokens": [{"token": "up"}], "bottom_tokens": [{"token": "down"}]}
    ev = {"tokens": ["a", "b", "c", "d", "e", "f"], "tail_size": 300, "auroc_next": 0.0, "ablation_z": None}
    line = describe({"kind": "prediction", "subject": "a", "evidence": ev}, card)
    assert line.startswith("predicts 'a' 'b' 'c' 'd' (+296 more)") and "AUROC next 0.000" in line
    assert "ablation z nan" in line and line.endswith("writes 'up'")
    line = describe({"kind": "suppression", "subject": "a", "evidence": ev}, card)
    assert line.startswith("suppresses 'a'") and line.endswith("writes against 'down'")
    assert subject_label("a", ev) == "a +299" and subject_label("a", {"token_ids": [1]}) == "a"


def test_ablation_of_a_token_set_equals_a_hooked_forward_pass(tmp_path):
    """The batched ablation (residual stream cached after the layer, only later blocks rerun) against
    one full forward pass per sequence with a hook that sets the neuron to its mean, and log p(X) as
    the log of the summed probabilities of X's tokens."""
    from discover.adapter import load_model
    from discover.corpus import open_corpus
    from discover.features import collect
    from discover.verify import Ablator

    targets = ("tree", "pear")
    corpus = _apple_corpus(tmp_path / "corpus", targets)
    view = load_model(str(_prediction_model(tmp_path / "pred", targets, plant_l0=True)))
    data = collect(view, open_corpus(str(corpus)), [], tokens=1500, context=32, split="all")
    ids = np.array([VOCAB.index(w) for w in targets])
    means = np.asarray(data.acts, np.float64).mean(1).reshape(view.n_layers, view.d_mlp)
    neurons = [(1, 7), (0, 9), (1, 3), (0, 7)]  # planted in layer 1 and in layer 0 (rerun through block 1)
    got, n_pos = Ablator(view, data).effects(ids, neurons, means, max_seqs=4)

    assert all(len(seq) == m + 1 for seq, _, m in data.seqs)  # each sequence starts with BOS
    rows = np.flatnonzero(np.isin(data.next_token, ids))
    row0 = np.array([s[1] for s in data.seqs])
    seq_of = np.searchsorted(row0, rows, side="right") - 1
    chosen = list(dict.fromkeys(seq_of.tolist()))[:4]
    assert n_pos == int(np.isin(seq_of, chosen).sum()) > 4

    def logp(layer=None, neuron=None):
        vals = []
        for s in chosen:
            seq, first, _ = data.seqs[s]
            hook = None
            if layer is not None:
                def pre(mod, args):
                    a = args[0].clone()
                    a[:, 1:, neuron] = float(means[layer, neuron])  # every position but BOS
                    return (a,)
                hook = view.model.get_submodule(view.act_site(layer)).register_forward_pre_hook(pre)
            try:
                with torch.no_grad():
                    lp = torch.log_softmax(view.model(torch.tensor([seq])).logits[0].double(), -1)
            finally:
                if hook:
                    hook.remove()
            for r in rows[seq_of == s]:
                vals.append(float(torch.logsumexp(lp[r - first + 1, torch.tensor(ids)], -1)))
        return np.array(vals)

    base = logp()
    want = [float((logp(l, n) - base).mean()) for l, n in neurons]
    # the planted neurons matter (p(X) is near 1 after "apple", so log p(X) moves little) and are
    # compared to their own size; the random ones move log p(X) by ~1e-7, within float32 noise
    assert min(abs(want[0]), abs(want[1])) > 1e-3 and max(abs(want[2]), abs(want[3])) < 1e-4
    np.testing.assert_allclose(got[:2], want[:2], rtol=1e-3, atol=0)
    np.testing.assert_allclose(got[2:], want[2:], atol=1e-6)
    # one layer's neurons: the controls rerun on sequences cut after their last X-next position
    # (forced here: the even sequences together, the odd ones together), the same numbers
    abl = Ablator(view, data)
    abl._cut = lambda need, T, suffix: [(np.arange(p, len(need), 2), int(need[p::2].max())) for p in (0, 1)]
    layer0 = [(0, 9), (0, 7)]
    got0, _ = abl.effects(ids, layer0, means, max_seqs=4)
    assert len(abl._shapes) >= 1
    np.testing.assert_allclose(got0[0], want[1], rtol=1e-3)
    np.testing.assert_allclose(got0[1], want[3], atol=1e-6)


def test_cutting_sequences_for_the_controls_pays_only_before_the_last_layers():
    """Which groups `Ablator._cut` forms: none for the last layer (its rerun is the final norm);
    for an early layer of a deep model, short sequences apart from long ones."""
    from discover.verify import Ablator

    me = SimpleNamespace(view=SimpleNamespace(n_layers=30))
    need = np.array([256, 40, 250, 30, 35, 256])
    assert [(r.tolist(), t) for r, t in Ablator._cut(me, need, 256, 0)] == [(list(range(6)), 256)]
    groups = Ablator._cut(me, need, 256, 28)
    assert sorted(int(i) for r, _ in groups for i in r) == list(range(6))  # every sequence once
    assert len(groups) == 2 and all(t == need[r].max() for r, t in groups)
    assert {tuple(r) for r, _ in groups} == {(0, 2, 5), (1, 3, 4)}


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize("extra, needles", [
    (["--tokens", 0], ["tokens must be a positive"]),
    (["--alpha", 2], ["alpha"]),
    (["--rules", "/nonexistent/rules"], ["does not exist"]),
    (["--corpus", "/nonexistent/corpus"], ["does not exist"]),
])
def test_verify_bad_input(env, extra, needles, capsys, tmp_path):
    before = snapshot(env.store)
    rc, out, err = run(capsys, "verify", env.planted, "--store", env.store, *extra)
    assert_one_error_line(rc, err, *needles)
    assert snapshot(env.store) == before


def test_malformed_user_rule_file_is_one_line(env, capsys, tmp_path):
    (tmp_path / "mine.toml").write_text("[[rule]]\nname='bad'\nkind='regex'\npattern='(oops'\n")
    rc, out, err = run(capsys, "verify", env.planted, "--store", tmp_path / "s", "--rules", tmp_path)
    assert_one_error_line(rc, err, "mine.toml", "rule 'bad'", "invalid regex")
    assert not (tmp_path / "s").exists()


def test_query_verdicts_before_verify(env, capsys, tmp_path):
    from discover.cli import main

    assert main(["scan", str(env.random), "--store", str(tmp_path / "s"), "--json"]) == 0
    capsys.readouterr()
    rc, out, err = run(capsys, "query", "verdicts", "--model", env.random, "--store", tmp_path / "s")
    assert_one_error_line(rc, err, "no verdicts", "discover verify")
    np.testing.assert_equal(rc, 2)


def _negative_gated_model(out: Path) -> Path:
    """Tiny Llama (SwiGLU) with L1.N5 planted to act through NEGATIVE activations: its gate reads
    "apple" (silu(gate) large) and its up row reads it negated, so act = silu(gate) * up is strongly
    negative after "apple"; its w_out points AGAINST "tree". The weights say "suppresses tree";
    its effective direction, -w_out, predicts "tree" after "apple"."""
    torch.manual_seed(0)
    m = make_model("llama", n_layer=2, d_model=D_MODEL, d_mlp=D_MLP)
    apple, tree = VOCAB.index("apple"), VOCAB.index("tree")
    with torch.no_grad():
        t = m.lm_head.weight[tree] / m.lm_head.weight[tree].norm()
        u = torch.randn(D_MODEL)
        u -= t * (t @ u)
        u /= u.norm()
        emb = m.model.embed_tokens.weight
        emb[apple] = 4.0 * emb[apple].norm() * u  # "apple" is mostly u
        g = m.model.layers[1].post_attention_layernorm.weight
        mlp = m.model.layers[1].mlp
        mlp.gate_proj.weight[5] = 0.5 * u / g  # small: p(tree) must not saturate
        mlp.up_proj.weight[5] = -0.5 * u / g
        mlp.down_proj.weight[:, 5] = -1.0 * t
    return save(m, out)


def test_gated_neuron_acting_through_negative_activations_is_confirmed_in_its_effective_direction(tmp_path):
    from discover.scan import RoleThresholds, ScanConfig, scan_model

    corpus = _apple_corpus(tmp_path / "corpus", ("tree",))
    model = _negative_gated_model(tmp_path / "neg")
    with Store(tmp_path / "store") as st:
        scan_model(str(model), st, ScanConfig(roles=RoleThresholds(kurtosis=8.0)), progress=False)
        roles = dict(((l, n), r) for l, n, r in st.con.execute("SELECT layer, neuron, role FROM roles").fetchall())
        assert roles.get((1, 5)) == "suppression"  # what the weights alone say
        verify_model(str(model), st, VerifyConfig(tokens=3000, split="all", candidates=5, controls=12, per_rule=1),
                     corpus=str(corpus), progress=False)
        hyps = query_verdicts(st, str(model))["hypotheses"]
    h = {x["neuron"]: x for x in hyps if x["kind"] != "feature"}["L1.N5"]
    ev = h["evidence"]
    assert (ev["weights_role"], ev["tail_sign"], ev["direction"]) == ("suppression", -1, -1), h
    assert (h["kind"], h["subject"], h["verdict"]) == ("prediction", "tree", "confirmed"), h
    assert ev["auroc_next"] > 0.9 and ev["ablation_z"] < -3 and not ev.get("revised")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_random_models_confirm_few_prediction_hypotheses(arch, tmp_path):
    """Random-init models (3 seeds; GELU and signed SwiGLU activations) on text whose next token is
    independent of everything before it (i.i.d. words), so that no neuron can predict or suppress
    it: every candidate of every source tested with the effective direction and the revision
    step; at most 5% confirmed. (On the apple corpus, "tree next" is "the current token is
    apple": a random neuron that happens to respond to "apple" and to point at "tree" really does
    raise p(tree) there, and is rightly confirmed.)"""
    from discover.scan import RoleThresholds, ScanConfig, scan_model

    rng = random.Random(0)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"d{i}.txt").write_text(" ".join(rng.choice(VOCAB[1:]) for _ in range(80)))
    tested = confirmed = 0
    for seed in range(3):
        torch.manual_seed(seed)
        model = save(make_model(arch, n_layer=2, d_model=D_MODEL, d_mlp=D_MLP), tmp_path / f"m{seed}")
        with Store(tmp_path / f"store{seed}") as st:
            scan_model(str(model), st, ScanConfig(roles=RoleThresholds(kurtosis=3.5)), progress=False)
            verify_model(str(model), st, VerifyConfig(tokens=2000, split="all", candidates=20, controls=10, per_rule=1),
                         corpus=str(corpus), progress=False)
            hyps = [h for h in query_verdicts(st, str(model), top=1000)["hypotheses"] if h["kind"] != "feature"]
        tested += len(hyps)
        confirmed += sum(h["verdict"] == "confirmed" for h in hyps)
    assert tested >= 30
    assert confirmed / tested <= 0.05, (confirmed, tested)


def _reference_stats(A, part, qs):
    """What `_kernels.activation_stats` computes, the slow way: scipy's average ranks, numpy's
    quantiles of part A, searchsorted bins and the detectors' predicted positives."""
    from scipy.stats import rankdata

    ranks = rankdata(A.T.astype(np.float64), axis=0, method="average")
    tie = [(c ** 3 - c).sum() for c in (np.unique(a, return_counts=True)[1].astype(np.float64) for a in A)]
    X = A.T.astype(np.float64)
    XA, XB = X[part == 0], X[part == 1]
    thr = np.quantile(XA, qs, axis=0)
    K, B = thr.shape
    out = [ranks, np.array(tie), thr]
    for Xp in (XA, XB):
        idx = np.stack([np.searchsorted(thr[:, j], Xp[:, j], side="left") for j in range(B)], 1)
        out.append(idx)
        out.append(np.stack([(Xp > thr[k]).sum(0) for k in range(K)]).astype(np.float64))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_activation_stats_kernel_equals_scipy_and_numpy(seed):
    """One radix sort per neuron gives scipy's average ranks and tie terms, numpy.quantile's
    thresholds (method "linear") and searchsorted's bins, bit for bit: ties, a constant row,
    -0.0 beside +0.0, negative values, parts of uneven and tiny sizes."""
    from discover._kernels import activation_stats

    rng = np.random.default_rng(seed)
    B, R = 23, [3000, 257, 5][seed]
    A = rng.standard_normal((B, R)).astype(np.float32) * 3
    A[:8] = np.round(A[:8], 1)  # many ties
    A[8] = 0.0  # constant
    A[9, ::2] = -0.0
    A[9, 1::2] = 0.0
    A[10] = np.abs(A[10]) * 1e-30  # tiny positives
    part = rng.integers(0, 2, R).astype(np.int8)
    part[:2] = (0, 1)
    qs = np.linspace(0.5, 0.999, 64)
    got = activation_stats(A, part, qs)
    want = _reference_stats(A, part, qs)
    for name, g, w in zip(("ranks", "tie", "thr", "idx_a", "pp_a", "idx_b", "pp_b"), got, want):
        assert g.shape == w.shape and np.array_equal(g, w), name
    none = activation_stats(A, np.ones(R, np.int8), qs)  # no part-A token: no thresholds
    assert np.array_equal(none[0], want[0]) and none[2].shape == (0, B) and none[3].shape == (0, B)


def test_true_positive_counts_equal_numpy_bincount():
    """`features._counts` (the `_kernels.true_positives` kernel; a rule labelling most tokens counts
    its unlabelled ones and subtracts) against one numpy bincount per rule."""
    from discover._kernels import activation_stats
    from discover.features import _counts

    rng = np.random.default_rng(5)
    B, R, K = 13, 900, 16
    A = np.round(rng.standard_normal((B, R)), 1).astype(np.float32)
    part = (rng.random(R) < 0.5).astype(np.int8)
    _, _, _, ia, pa, _, _ = activation_stats(A, part, np.linspace(0.5, 0.999, K))
    RA = ia.shape[0]
    Y = np.stack([rng.random(RA) < 0.05, rng.random(RA) < 0.9, np.zeros(RA, bool), np.ones(RA, bool),
                  A[3, part == 0] > 0.4], 1).astype(np.float64)
    flat = ia + (K + 1) * np.arange(B)[None, :]
    pos = np.stack([np.bincount(flat[Y[:, r] > 0].ravel(), minlength=(K + 1) * B).reshape(B, K + 1)
                    for r in range(Y.shape[1])])
    want = np.cumsum(pos[:, :, ::-1], axis=2)[:, :, ::-1][:, :, 1:].transpose(2, 0, 1)
    tp, pp = _counts(ia, pa, Y)
    assert np.array_equal(tp, want) and pp is pa
    assert np.array_equal(tp[:, 3, :], pa)  # a rule labelling every token: every predicted positive


def test_scoring_label_sets_in_one_pass_equals_one_by_one():
    """`score_sets` shares the activations' ranks, ties and thresholds between label sets (the
    rules' and their shuffle): each result equals `score` of its labels alone, bit for bit."""
    from discover.features import FeatureData, score, score_sets, shuffled_labels
    from discover.verify import auroc_score

    rng = np.random.default_rng(3)
    G, R = 70, 3000
    acts = rng.standard_normal((G, R)).astype(np.float32)
    acts[acts < 0] *= 0.01
    acts[:20] = np.round(acts[:20], 1)  # many ties
    acts[5] = 0.0  # a constant neuron
    labels = np.stack([acts[7] > 0.5, rng.random(R) < 0.05, np.zeros(R, bool)], 1)
    data = FeatureData(rules=[SimpleNamespace(name=n) for n in ("x7", "noise", "never")], skipped=[], labels=labels,
                       part=(rng.random(R) < 0.5).astype(np.int8), acts=acts, n_layers=1, d_mlp=G, documents=1)
    shuffled = shuffled_labels(data, 0)
    both = score_sets(data, [labels, shuffled], block=32)  # blocks that do not divide 70
    for got, lab in zip(both, [labels, shuffled]):
        alone = score(data, labels=lab, block=16)
        for k in ("auroc", "p", "q", "threshold", "precision", "recall", "f1", "f1_a", "n_pos", "tested"):
            assert np.array_equal(getattr(got, k), getattr(alone, k), equal_nan=True), k
    assert both[0].auroc[7, 0] == pytest.approx(auroc_score(acts[7].astype(np.float64), labels[:, 0]), abs=1e-12)
    assert both[0].auroc[7, 0] > 0.99 and not both[0].tested[:, 2].any()


def test_disk_matrix_reads_what_was_written(tmp_path):
    """verify's activations live in a file read and written with explicit I/O (not a memory
    map, whose touched pages would count in the process's memory): rows, slices and the first-n
    columns view equal the numpy matrix written column block by column block."""
    from discover.features import DiskMatrix

    rng = np.random.default_rng(0)
    ref = rng.standard_normal((37, 100)).astype(np.float32)
    m = DiskMatrix(tmp_path / "a.f32", 37, 100)
    for c0, c1 in ((0, 30), (30, 31), (31, 100)):
        m.write_columns(c0, ref[:, c0:c1])
    assert m.shape == (37, 100) and np.array_equal(np.asarray(m), ref)
    assert np.array_equal(m[5], ref[5]) and np.array_equal(m[-1], ref[-1]) and np.array_equal(m[3:20], ref[3:20])
    head = m[:, :60]
    assert head.shape == (37, 60) and np.array_equal(head[10:12], ref[10:12, :60])
    with pytest.raises(IndexError):
        m[::2]
    with pytest.raises(IndexError):
        m[37]
