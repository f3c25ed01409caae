"""The corpus pass against references computed here from the full activation matrix:
hooked activations vs a manual MLP, streaming moments vs numpy/scipy, histograms vs direct
binning, top-k examples (by activation and by direct logit attribution) vs brute force,
activation-vs-prediction curves vs a direct count; resume, extension and bad input."""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.stats
import torch
from conftest import VOCAB, make_model, save
from test_cli import assert_one_error_line, run, run_json, snapshot, sql_rows

import discover.activations as A
from discover import _act_kernels as K
from discover import pass_store
from discover.adapter import load_model
from discover.corpus import open_corpus
from discover.store import Store

CONTEXT, BATCH = 16, 4
AN = VOCAB.index("an")


def _corpus(root: Path, n_docs: int = 36, seed: int = 1) -> Path:
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        n = rng.choice([3, 9, 15, 16, 40, 75])  # shorter than, equal to and longer than one piece
        (root / f"d{i:02d}.txt").write_text(" ".join(rng.choice(VOCAB[1:]) for _ in range(n)))
    return root


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("act")
    model = save(make_model("gpt2"), d / "gpt2")
    corpus = _corpus(d / "corpus")
    store = d / "store"
    cfg = A.ActivationConfig(tokens=10**9, batch_size=BATCH, context=CONTEXT, top_k=5, before=4, after=2, shard_batches=2,
                             pairs=('L1.N3:"an"', "L0.N7:the"), save_every=0)
    with Store(store) as st:
        summary = A.run_activations(str(model), st, cfg, corpus=str(corpus), progress=False)
    return SimpleNamespace(dir=d, model=model, corpus=corpus, store=store, cfg=cfg, summary=summary,
                           ref=_reference(model, corpus, cfg))


def _reference(model_dir, corpus_dir, cfg):
    """Every counted position's activations (all layers), DLA, top prediction, document, position."""
    view = load_model(str(model_dir))
    tok = view.tokenizer
    bos = A.bos_id(tok)
    seqs = list(A.sequences(open_corpus(str(corpus_dir)), "all", tok, CONTEXT, bos))
    U = view.processed_unembed().double().numpy()
    G = [view.processed_W_out(l).double().numpy() @ U for l in range(view.n_layers)]  # (N, vocab)
    fn = view.final_norm()
    rows = {k: [] for k in ("acts", "dla", "pred", "next", "doc", "chunk", "pos", "seq")}
    for si, (ordinal, _, chunk, ids, nxt) in enumerate(seqs):  # one sequence per forward: no padding
        got = {}
        hooks = [view.model.get_submodule(view.act_site(l)).register_forward_hook(
            lambda m, a, o, l=l: got.__setitem__(l, a[0][0].double().numpy())) for l in range(view.n_layers)]
        hooks.append(view.model.get_submodule(view.final_norm_site()).register_forward_hook(
            lambda m, a, o: got.__setitem__("resid", a[0][0].double().numpy())))
        with torch.no_grad():
            logits = view.model(torch.tensor([ids])).logits[0]
        for h in hooks:
            h.remove()
        resid = got["resid"]
        inv = 1 / np.sqrt(resid.var(-1) + fn.eps)
        nexts = list(ids[1:]) + [nxt]
        for t in range(1, len(ids)):  # position 0 is the BOS: never counted
            a = np.stack([got[l][t] for l in range(view.n_layers)])  # (L, N)
            rows["acts"].append(a)
            rows["dla"].append(np.stack([a[l] * G[l][:, nexts[t]] * inv[t] for l in range(view.n_layers)])
                               if nexts[t] >= 0 else np.full_like(a, np.nan))
            rows["pred"].append(int(logits[t].argmax()))
            rows["next"].append(nexts[t])
            rows["doc"].append(ordinal)
            rows["chunk"].append(chunk)
            rows["pos"].append(t)
            rows["seq"].append(si)
    out = {k: np.array(v) for k, v in rows.items()}
    out["seqs"] = seqs
    return SimpleNamespace(**out)


def _rows(store, query, params=()):
    return sql_rows(store, query, params)


# ------------------------------------------------------------------------- hooks
@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "llama", "mistral", "qwen2"])
def test_hooked_activations_equal_manual_mlp(arch):
    """The captured site is act(x W_in + b) (times x W_up for gated MLPs) of the MLP's input x
    (family_checks), and the captured residual gives the final norm's output."""
    from family_checks import hooked_activations_equal_manual_mlp

    from discover.adapter import from_model

    torch.manual_seed(0)
    model = make_model(arch)
    hooked_activations_equal_manual_mlp(model)
    view = from_model(model, None)
    with torch.no_grad(), A.capture(view) as got:
        h = view.model.base_model(input_ids=torch.randint(0, 97, (3, 11))).last_hidden_state
    fn = view.final_norm()
    r = got["resid"].double()
    if fn.kind == "layernorm":
        normed = (r - r.mean(-1, keepdim=True)) / torch.sqrt(r.var(-1, unbiased=False, keepdim=True) + fn.eps)
        normed = normed * fn.weight.double() + fn.bias.double()
    else:
        normed = r / torch.sqrt(r.pow(2).mean(-1, keepdim=True) + fn.eps) * fn.weight.double()
    torch.testing.assert_close(normed, h.double(), atol=2e-5, rtol=1e-5)
    assert all(len(m._forward_pre_hooks) == 0 for m in view.model.modules()), "a hook was left behind"


def test_sequences_cover_every_document_token_once(env):
    view = load_model(str(env.model))
    tok = view.tokenizer
    corp = open_corpus(str(env.corpus))
    by_doc = {}
    for ordinal, doc_id, chunk, ids, nxt in A.sequences(corp, "all", tok, CONTEXT, 0):
        assert ids[0] == 0 and 2 <= len(ids) <= CONTEXT
        by_doc.setdefault(doc_id, []).append((chunk, ids[1:], nxt))
    for doc in corp.iter_documents():
        want = tok(doc.text, add_special_tokens=False)["input_ids"]
        pieces = by_doc[doc.doc_id]
        assert [c for c, _, _ in pieces] == list(range(len(pieces)))
        assert sum((p for _, p, _ in pieces), []) == want
        for i, (_, p, nxt) in enumerate(pieces):  # the token after each piece, -1 after the last
            assert nxt == (pieces[i + 1][1][0] if i + 1 < len(pieces) else -1)


def test_batched_padding_does_not_leak(env):
    """Right-padded batches give the activations of one-sequence forward passes."""
    view = load_model(str(env.model))
    runner = A.PassRunner(view, env.cfg, [], CONTEXT, BATCH)
    seqs = env.ref.seqs[:BATCH]
    T = max(len(s[3]) for s in seqs)
    ids = torch.tensor([s[3] + [0] * (T - len(s[3])) for s in seqs])
    acts, inv, pred, _ = runner.forward(ids)
    for b, s in enumerate(seqs):
        m = (env.ref.seq == b)
        pos = env.ref.pos[m]
        np.testing.assert_allclose(acts[1][b, pos].numpy(), env.ref.acts[m][:, 1], atol=2e-6)


# ------------------------------------------------------------------- statistics
def test_summary_counts_every_token(env):
    s = env.summary
    assert s.status == "ran" and s.exhausted
    assert s.tokens == len(env.ref.acts) and s.sequences == len(env.ref.seqs)
    assert s.documents == 36
    (tokens, seqs, docs, exhausted), = _rows(env.store, "SELECT tokens, sequences, documents, exhausted "
                                                       "FROM activation_passes")
    assert (tokens, seqs, docs, exhausted) == (s.tokens, s.sequences, 36, True)


def test_moments_equal_numpy_scipy(env):
    X = env.ref.acts  # (R, L, N) float64 of float32 values
    rows = _rows(env.store, "SELECT layer, neuron, act_mean, act_var, act_skew, act_kurt, act_freq, act_min, "
                            "act_max FROM neuron_activations ORDER BY layer, neuron")
    got = np.array([r[2:] for r in rows], dtype=np.float64).reshape(X.shape[1], X.shape[2], 7)
    np.testing.assert_allclose(got[..., 0], X.mean(0), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(got[..., 1], X.var(0), rtol=1e-5)
    np.testing.assert_allclose(got[..., 2], scipy.stats.skew(X, axis=0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got[..., 3], scipy.stats.kurtosis(X, axis=0, fisher=False), rtol=1e-4)
    np.testing.assert_array_equal(got[..., 4], (X > 0).mean(0))
    np.testing.assert_allclose(got[..., 5], X.min(0), rtol=1e-6)
    np.testing.assert_allclose(got[..., 6], X.max(0), rtol=1e-6)


def test_moments_are_exact_for_the_same_batches(env):
    """Fed the very activations the pass saw, the float64 streaming moments match a two-pass
    float64 computation to ~1e-12: the Chan merge loses nothing measurable."""
    rng = np.random.default_rng(0)
    L, N, k = 1, 70, 3
    state = A.PassState(L, N, k, 3, 0)
    chunks = [rng.gamma(0.5, 2.0, size=(2, 9, N)).astype(np.float32) - 0.3 + 50 for _ in range(7)]  # offset 50
    a = state.a
    for i, x in enumerate(chunks):
        B, T, _ = x.shape
        K.activation_update(
            x, x.view(np.int32), np.full(B, T, np.int32), 1, np.arange(B, dtype=np.int64) + 10 * i,
            np.full((B, T), -1, np.int32), np.ones((B, T), np.float32), np.zeros((1, N), np.float32),
            np.ones((B, T, 1), np.float32), np.zeros(N, np.int32), a["count"][0], a["mean"][0], a["m2"][0], a["m3"][0], a["m4"][0], a["amin"][0], a["amax"][0],
            a["n_pos"][0], a["hist"][0], a["av"][0], a["adoc"][0], np.full((N, k), -1, np.int32), a["apos"][0],
            a["dv"][0], a["ddoc"][0], np.full((N, k), -1, np.int32), a["dpos"][0])
        state.meta["tokens"] += B * (T - 1)
    X = np.concatenate([c[:, 1:].reshape(-1, N) for c in chunks]).astype(np.float64)
    m = state.moments()
    np.testing.assert_allclose(m["act_mean"][0], X.mean(0), rtol=1e-13)
    np.testing.assert_allclose(m["act_var"][0], X.var(0), rtol=1e-10)
    np.testing.assert_allclose(m["act_skew"][0], scipy.stats.skew(X, axis=0), rtol=1e-8)
    np.testing.assert_allclose(m["act_kurt"][0], scipy.stats.kurtosis(X, axis=0, fisher=False), rtol=1e-8)


def test_dense_kernel_path_equals_the_general_path():
    """A dense MLP's branch-free path (`dense=True`: every position counts, scale 1) leaves every
    array of the state (moments, counts, min / max, histograms, both top-k tables with their rows
    and positions) equal, bit for bit, to the general path's, over batches of uneven lengths,
    ties, zeros, negatives and positions with and without a known next token."""
    rng = np.random.default_rng(5)
    L, N, k = 1, 150, 3  # 150 neurons: blocks of 64, 64 and 22
    states = {d: A.PassState(L, N, k, 3, 0) for d in (False, True)}
    srcs = {d: [] for d in (False, True)}
    for i in range(6):
        B, T = 3, 17
        x = (rng.standard_normal((B, T, N)) * rng.choice([0.01, 1.0, 30.0], N)).astype(np.float32)
        x[:, :, :10] = np.round(x[:, :, :10])  # ties and exact zeros
        x[0, 3, 20:30] = -0.0
        lens = rng.integers(1, T + 1, B).astype(np.int32)
        nxt = rng.integers(-1, 4, (B, T)).astype(np.int32)
        ct = rng.standard_normal((4, N)).astype(np.float32)
        inv = rng.uniform(0.5, 2.0, (B, T)).astype(np.float32)
        docs = np.arange(B, dtype=np.int64) + 2 * i  # consecutive batches share documents
        for dense, st in states.items():
            a = st.a
            asrc, dsrc = np.full((N, k), -1, np.int32), np.full((N, k), -1, np.int32)
            K.activation_update(
                x, x.view(np.int32), lens, 1, docs, nxt, inv, ct, np.ones((B, T, 1), np.float32), np.zeros(N, np.int32),
                a["count"][0], a["mean"][0], a["m2"][0], a["m3"][0], a["m4"][0], a["amin"][0], a["amax"][0],
                a["n_pos"][0], a["hist"][0], a["av"][0], a["adoc"][0], asrc, a["apos"][0], a["dv"][0], a["ddoc"][0],
                dsrc, a["dpos"][0], dense=dense)
            srcs[dense] += [asrc, dsrc]
    for name, arr in states[False].a.items():
        assert np.array_equal(arr, states[True].a[name], equal_nan=True), name
    for g, d in zip(srcs[False], srcs[True]):
        assert np.array_equal(g, d)
    assert states[True].a["count"][0].sum() > 0 and (states[True].a["dv"][0] > K.EMPTY).any()


def test_histograms_equal_direct_binning(env):
    X = env.ref.acts.astype(np.float32)
    L, N = X.shape[1:]
    got = np.zeros((L, N, K.N_BINS), np.int64)
    for l, n, b, c in _rows(env.store, "SELECT layer, neuron, bin, count FROM activation_histograms"):
        got[l, n, b] = c
    want = np.stack([np.stack([np.bincount(K.bin_index(X[:, l, n]), minlength=K.N_BINS) for n in range(N)])
                     for l in range(L)])
    np.testing.assert_array_equal(got, want)
    edges = K.bin_edges()
    flat = X.ravel()
    b = K.bin_index(flat)
    assert np.all(edges[b] <= flat) and np.all(flat <= edges[b + 1])  # the bins' edges are right
    lo, hi = _rows(env.store, "SELECT lo, hi FROM activation_histograms WHERE bin = 100 LIMIT 1")[0]
    assert (lo, hi) == (edges[100], edges[101])


def _doc_max(values, docs):
    """Per neuron: {document: its maximum value} (brute force over every position)."""
    out = []
    for n in range(values.shape[1]):
        best = {}
        for r in range(values.shape[0]):
            v = values[r, n]
            if not np.isnan(v) and (docs[r] not in best or v > best[docs[r]]):
                best[docs[r]] = v
        out.append(best)
    return out


@pytest.mark.parametrize("kind", ["activation", "dla"])
def test_top_examples_equal_brute_force(env, kind):
    """The k documents with the largest maxima, each at a position holding that maximum.
    (Equal values - the same token after the BOS in two documents - may differ in the last bit
    between a padded batch and the one-sequence reference, so ties at the cut may go either way.)"""
    ref = env.ref
    vals = ref.acts if kind == "activation" else ref.dla
    k, tol = env.cfg.top_k, 1e-6
    for layer in (0, 1):
        best = _doc_max(vals[:, layer], ref.doc)
        rows = _rows(env.store, "SELECT neuron, rank, value, doc_ordinal, chunk, position FROM activation_examples "
                                "WHERE kind = ? AND layer = ? ORDER BY neuron, rank", [kind, layer])
        got = {}
        for n, rank, v, d, c, p in rows:
            got.setdefault(n, []).append((v, d, c, p))
        for n, bm in enumerate(best):
            g = got[n]
            want = sorted(bm.values(), reverse=True)[:k]
            np.testing.assert_allclose([x[0] for x in g], want, rtol=2e-5, atol=1e-7)
            assert len({x[1] for x in g}) == len(g), "one example per document"
            cut = want[-1]
            assert {x[1] for x in g if x[0] > cut + tol} == {d for d, v in bm.items() if v > cut + tol}
            for v, d, c, p in g:
                assert bm[d] == pytest.approx(v, rel=2e-5, abs=1e-7)  # the document's maximum ...
                r = np.flatnonzero((ref.doc == d) & (ref.chunk == c) & (ref.pos == p))
                assert len(r) == 1 and abs(vals[r[0], layer, n] - bm[d]) <= tol  # ... at that position


def test_example_windows_hold_the_context_and_its_values(env, capsys):
    res = run_json(capsys, "query", "neuron", "L1.N5", "--examples", "--examples-k", 5,
                   "--model", env.model, "--store", env.store)
    act = res["activity"]
    assert act["tokens"] == env.summary.tokens and len(act["examples"]) == 5
    ref = env.ref
    for ex in act["examples"]:
        r = np.flatnonzero((ref.doc == _ordinal(env, ex["doc_id"])) & (ref.chunk == ex["chunk"]))
        seq = ref.seqs[ref.seq[r[0]]][3]
        lo = ex["position"] - ex["max_index"]
        assert [t["token_id"] for t in ex["tokens"]] == seq[lo:lo + len(ex["tokens"])]
        assert ex["tokens"][ex["max_index"]]["token_id"] == ex["token_id"] == seq[ex["position"]]
        assert ex["max_index"] <= env.cfg.before and len(ex["tokens"]) - ex["max_index"] - 1 <= env.cfg.after
        for i, t in enumerate(ex["tokens"]):
            q = lo + i
            if q == 0:
                continue  # the BOS is shown, not counted
            want = ref.acts[r[ref.pos[r] == q][0], 1, 5]
            assert t["value"] == pytest.approx(want, rel=2e-3, abs=1e-4)  # stored as float16
        assert ex["tokens"][ex["max_index"]]["value"] == pytest.approx(ex["value"], rel=2e-3)


def _ordinal(env, doc_id):
    return [d.doc_id for d in open_corpus(str(env.corpus)).iter_documents()].index(doc_id)


def direct_curve(acts, pred, nxt, token) -> dict:
    """{bin: (positions, top prediction is token, next known, next is token)}, one position at a time."""
    want: dict = {}
    for a, p, n in zip(acts, pred, nxt):
        b = int(K.bin_index(np.array([a], np.float32))[0])
        c = want.setdefault(b, [0, 0, 0, 0])
        c[0] += 1
        c[1] += p == token
        c[2] += n >= 0
        c[3] += n == token
    return {b: tuple(int(x) for x in v) for b, v in want.items()}


def test_curves_equal_direct_count(env):
    ref = env.ref
    for layer, neuron, token, source in ((1, 3, AN, "pair"), (0, 7, VOCAB.index("the"), "pair")):
        rows = _rows(env.store, "SELECT bin, positions, top_prediction, with_next, is_next, source FROM "
                                "prediction_curves WHERE layer = ? AND neuron = ? AND token_id = ?",
                     [layer, neuron, token])
        got = {r[0]: r[1:5] for r in rows}
        assert {r[5] for r in rows} == {source}
        want = direct_curve(ref.acts[:, layer, neuron], ref.pred, ref.next, token)
        assert got == want
        assert sum(v[1] for v in want.values()) > 0 or layer == 0


def test_activations_join_weight_statistics_in_sql(env, capsys):
    rows = run_json(capsys, "sql", "SELECT n.layer, n.neuron, n.vocab_kurt, a.act_kurt, a.act_freq FROM neurons n "
                                   "JOIN neuron_activations a USING (checkpoint_id, layer, neuron) "
                                   "ORDER BY a.act_kurt DESC LIMIT 3", "--store", env.store)
    assert len(rows) == 3 and rows[0]["act_kurt"] >= rows[1]["act_kurt"] and rows[0]["vocab_kurt"] > 0


def test_query_examples_text_marks_and_shades(env, capsys):
    rc, out, err = run(capsys, "query", "neuron", "L1.N5", "--examples", "--model", env.model, "--store", env.store)
    assert rc == 0, err
    assert "top examples by activation" in out and "\u27e6" in out and "\x1b[" not in out
    rc, out, _ = run(capsys, "query", "neuron", "L1.N5", "--dla", "--color", "always",
                     "--model", env.model, "--store", env.store)
    assert "direct logit attribution" in out and "\x1b[48;5;" in out and "\x1b[1;4m" in out


# -------------------------------------------------------------- resume / extend
def _results(store: Path):
    snap, _ = snapshot(store, ignore=("activation_passes", "checkpoints", "models")
                       + tuple(f"{t}.pass_id" for t in A.RESULT_TABLES))
    return {t: v for t, v in snap.items() if t in A.RESULT_TABLES} | {
        "pass": _rows(store, "SELECT tokens, sequences, documents, exhausted FROM activation_passes")}


@pytest.fixture(scope="module")
def straight(env, tmp_path_factory):
    """One uninterrupted pass of 300 tokens (whole batches) into its own store."""
    store = tmp_path_factory.mktemp("straight") / "store"
    cfg = A.ActivationConfig(tokens=300, batch_size=BATCH, context=CONTEXT, top_k=5, before=4, after=2, shard_batches=2,
                             pairs=('L1.N3:"an"',), save_every=0)
    with Store(store) as st:
        s = A.run_activations(str(env.model), st, cfg, corpus=str(env.corpus), progress=False)
    assert 300 <= s.tokens < 300 + BATCH * CONTEXT and not s.exhausted
    return SimpleNamespace(store=store, cfg=cfg, results=_results(store))


@pytest.mark.parametrize("save_every", [0, 1e9])
def test_interrupted_pass_resumes_to_identical_results(env, straight, tmp_path, monkeypatch, save_every):
    """Killed after batch 3 (state saved every batch, or never): the rerun ends where an
    uninterrupted run ends, with the same numbers."""
    from dataclasses import replace

    store = tmp_path / "store"
    cfg = replace(straight.cfg, save_every=save_every)

    def boom(batches):
        if batches == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(A, "_after_batch", boom)
    with Store(store) as st, pytest.raises(KeyboardInterrupt):
        A.run_activations(str(env.model), st, cfg, corpus=str(env.corpus), progress=False)
    assert _rows(store, "SELECT count(*) FROM neuron_activations") == [(0,)]  # nothing half-committed
    monkeypatch.setattr(A, "_after_batch", lambda b: None)
    with Store(store) as st:
        s = A.run_activations(str(env.model), st, cfg, corpus=str(env.corpus), progress=False)
    assert s.status == ("resumed" if save_every == 0 else "ran")
    assert _results(store) == straight.results


def test_extending_a_pass_equals_one_longer_run(env, straight, tmp_path):
    from dataclasses import replace

    store = tmp_path / "store"
    with Store(store) as st:
        a = A.run_activations(str(env.model), st, replace(straight.cfg, tokens=100), corpus=str(env.corpus),
                              progress=False)
        b = A.run_activations(str(env.model), st, straight.cfg, corpus=str(env.corpus), progress=False)
        c = A.run_activations(str(env.model), st, straight.cfg, corpus=str(env.corpus), progress=False)
    assert (a.status, b.status, c.status) == ("ran", "extended", "unchanged")
    assert a.tokens < b.tokens
    assert _results(store) == straight.results
    assert len(list((store / "activations").iterdir())) == 1
    assert len([p for p in next((store / "activations").iterdir()).iterdir() if p.name.startswith("results-")]) == 1


def test_killed_process_resumes(env, straight, tmp_path):
    """A real `kill -9` of `discover activations` mid-pass; the rerun finishes with the same results."""
    import os
    import signal
    import subprocess
    import sys
    import time

    store = tmp_path / "store"
    argv = [sys.executable, "-c", "import discover.activations as A, sys, time\n"
            "A._after_batch = lambda b: (print('batch', b, flush=True), time.sleep(0.3))\n"
            "from discover.cli import main; sys.exit(main(sys.argv[1:]))",
            "activations", str(env.model), "--corpus", str(env.corpus), "--tokens", "300", "--batch-size",
            str(BATCH), "--context", str(CONTEXT), "--top-k", "5", "--pair", 'L1.N3:"an"', "--save-every", "0",
            "--shard-batches", "2",
            "--store", str(store)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    t0 = time.time()
    for line in proc.stdout:
        if line.startswith(b"batch 3") or time.time() - t0 > 120:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert _rows(store, "SELECT count(*) FROM neuron_activations") == [(0,)]
    from discover.cli import main

    assert main(["activations", str(env.model), "--corpus", str(env.corpus), "--tokens", "300", "--batch-size",
                 str(BATCH), "--context", str(CONTEXT), "--top-k", "5", "--pair", 'L1.N3:"an"', "--shard-batches", "2", "--store",
                 str(store), "--json"]) == 0
    # the window sizes differ from the fixture's (--before/--after are not CLI flags): compare stats only
    got, want = _results(store), straight.results
    for t in ("neuron_activations", "activation_histograms", "prediction_curves"):
        assert got[t] == want[t], t
    assert got["pass"] == want["pass"]


# ------------------------------------------------------------------- bad input
def _a(env, *extra, store=None):
    return ["activations", env.model, "--corpus", env.corpus, "--tokens", 100, "--batch-size", BATCH,
            "--context", CONTEXT, "--store", store or env.store, *extra]


BAD = [
    ("unknown pair neuron", lambda e: _a(e, "--pair", "L7.N0:an"), ["L7.N0", "out of range"]),
    ("pair neuron index", lambda e: _a(e, "--pair", "L0.N999:an"), ["L0.N999", "out of range"]),
    ("malformed pair", lambda e: _a(e, "--pair", "L0.N1"), ["malformed --pair", "L0.N1"]),
    ("malformed pair neuron", lambda e: _a(e, "--pair", "L0N1:an"), ["malformed neuron id"]),
    ("token not in vocabulary", lambda e: _a(e, "--pair", "L0.N1:zzz"), ["'zzz'", "not one token"]),
    ("two tokens", lambda e: _a(e, "--pair", 'L0.N1:"an apple"'), ["not one token"]),
    ("tokens 0", lambda e: _a(e) + ["--tokens", 0], ["tokens must be a positive"]),
    ("context too long", lambda e: _a(e) + ["--context", 999], ["--context 999", "32 positions"]),
    ("missing corpus", lambda e: ["activations", e.model, "--corpus", e.dir / "nope", "--store", e.store],
     ["does not exist"]),
    ("empty corpus", lambda e: ["activations", e.model, "--corpus", e.dir / "empty", "--store", e.store],
     ["no documents"]),
    ("missing model", lambda e: ["activations", e.dir / "nomodel", "--store", e.store], ["does not exist"]),
    ("examples before any pass", lambda e: ["query", "neuron", "L0.N0", "--examples", "--model", e.model,
                                            "--store", e.dir / "scan_only"], ["no corpus pass", "discover activations"]),
]


@pytest.mark.parametrize("argv, needles", [pytest.param(a, n, id=i) for i, a, n in BAD])
def test_bad_input_is_one_line_and_changes_nothing(env, argv, needles, capsys):
    (env.dir / "empty").mkdir(exist_ok=True)
    scan_only = env.dir / "scan_only"
    if not scan_only.exists():
        from discover.cli import main
        assert main(["scan", str(env.model), "--store", str(scan_only), "--json"]) == 0
        capsys.readouterr()
    before = snapshot(env.store), snapshot(scan_only)
    rc, out, err = run(capsys, *argv(env))
    assert_one_error_line(rc, err, *needles)
    assert (snapshot(env.store), snapshot(scan_only)) == before


def test_a_fresh_store_is_not_created_by_bad_input(env, tmp_path, capsys):
    rc, _, err = run(capsys, *_a(env, "--pair", "L9.N0:an", store=tmp_path / "fresh"))
    assert_one_error_line(rc, err, "out of range")
    assert not (tmp_path / "fresh").exists()


def test_example_rows_know_the_next_token_and_their_text(env):
    """next_token_id is the true next token, also at the last position of a piece; the context
    column is the window's text and nothing else."""
    ref = env.ref
    rows = _rows(env.store, "SELECT doc_ordinal, chunk, position, next_token_id, context, token FROM "
                            "activation_examples")
    at_end = 0
    for d, c, p, nxt, ctx, tok in rows:
        r = np.flatnonzero((ref.doc == d) & (ref.chunk == c) & (ref.pos == p))
        assert len(r) == 1 and nxt == ref.next[r[0]]
        at_end += p == len(ref.seqs[ref.seq[r[0]]][3]) - 1 and nxt >= 0
        assert "<pad>" not in ctx and tok in ctx
    assert at_end > 0, "no example at a piece's end: the case is not exercised"


@pytest.mark.parametrize("post_norm", [False, True])
def test_dla_scale_includes_a_post_mlp_norm(post_norm):
    """Direct logit attribution divides by the final norm's scale and, in a layer whose MLP output
    is normed (Gemma 2/3, OLMo 2), by that norm's scale too: the pass's per-layer 1/scale equals
    1 / (rms_f * rms_post) read from independent hooks, so its DLA is act * (g_post * w_out / rms_post)
    . (g_f * U / rms_f), the centred logit's derivative with both scales frozen."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from conftest import make_tokenizer
    from family_checks import randomise_norms

    from discover.adapter import from_model

    torch.manual_seed(0)
    if post_norm:
        model = randomise_norms(Gemma2ForCausalLM(Gemma2Config(
            num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            intermediate_size=128, vocab_size=97, max_position_embeddings=32, sliding_window=4)))
    else:
        model = make_model("llama")
    view = from_model(model, make_tokenizer())
    runner = A.PassRunner(view, A.ActivationConfig(), [], 16, 2)
    ids = torch.randint(1, 97, (2, 9))
    acts, inv, _, _ = runner.forward(ids)
    U = view.processed_unembed().double()
    nxt = ids[:, 1:]
    for layer in range(view.n_layers):
        # reference: the gradient of the centred next-token logit w.r.t. the activation, with the
        # final norm's and the post-MLP norm's 1/rms frozen at their values in this forward pass
        post = view.post_mlp_norm_site(layer)
        assert (post is not None) == post_norm
        got = {}
        hooks = [view.model.get_submodule(view.final_norm_site()).register_forward_pre_hook(
            lambda m, a: got.__setitem__("f", a[0].detach().double()))]
        if post:
            hooks.append(view.model.get_submodule(post).register_forward_pre_hook(
                lambda m, a: got.__setitem__("p", a[0].detach().double())))
        try:
            with torch.no_grad():
                view.model.base_model(input_ids=ids)
        finally:
            for h in hooks:
                h.remove()
        fn = view.final_norm()
        rms_f = torch.sqrt(got["f"].pow(2).mean(-1) + fn.eps)
        w = view.W_out(layer).double()
        if post:
            pn = view.post_mlp_norm(layer)
            rms_p = torch.sqrt(got["p"].pow(2).mean(-1) + pn.eps)
            w = w * pn.weight.double()
        else:
            rms_p = torch.ones_like(rms_f)
        G = w @ U  # (N, vocab)
        want = acts[layer][:, :-1].double() * G[:, nxt].permute(1, 2, 0) / (rms_f * rms_p)[:, :-1, None]
        got_dla = acts[layer][:, :-1].double() * G[:, nxt].permute(1, 2, 0) * inv[layer][:, :-1, None].double()
        torch.testing.assert_close(got_dla, want, rtol=1e-4, atol=1e-6)


def test_tail_sign_from_the_histogram_equals_the_exact_quantile_rule():
    """`act_tail` (the side of a neuron's strong activations, read from its histogram) agrees with
    verify's `tail_sign` on the exact values wherever the two quantiles differ by more than a
    bin (25%), for neurons whose strong activations are positive, negative or both."""
    from discover.verify import tail_sign

    rng = np.random.default_rng(0)
    N, R = 60, 4000
    scale = rng.uniform(0.2, 3.0, size=(2, N))
    x = np.where(rng.random((R, N)) < 0.5, -rng.gamma(1.0, scale[0], (R, N)), rng.gamma(1.0, scale[1], (R, N)))
    x = x.astype(np.float32)
    hist = np.stack([np.bincount(K.bin_index(x[:, n]), minlength=K.N_BINS) for n in range(N)])
    got = A.hist_tail_sign(hist, np.full(N, R))
    checked = 0
    for n in range(N):
        lo, hi = np.quantile(x[:, n], [0.001, 0.999])
        if max(hi, -lo) > 1.3 * min(hi, -lo):
            assert got[n] == tail_sign(x[:, n].astype(np.float64)), (n, lo, hi)
            checked += 1
    assert checked > 20 and set(got.tolist()) == {-1, 1}


def test_act_tail_is_stored(env):
    vals = {r[0] for r in _rows(env.store, "SELECT act_tail FROM neuron_activations")}
    assert vals <= {1.0, -1.0} and 1.0 in vals  # GPT-2's GELU neurons: strong activations positive


def test_results_written_in_blocks_equal_one_block(env, straight, tmp_path, monkeypatch):
    """Examples are sorted, written and inserted a block of neurons at a time (bounded memory):
    blocks of 7 neurons give the same rows and the same example arrays as one block."""
    monkeypatch.setattr(pass_store, "EXAMPLE_BLOCK", 7)
    store = tmp_path / "store"
    with Store(store) as st:
        A.run_activations(str(env.model), st, straight.cfg, corpus=str(env.corpus), progress=False)
    assert _results(store) == straight.results

    def arrays(root):
        rdir = next(p for d in (root / "activations").iterdir() for p in d.iterdir() if p.name.startswith("results-"))
        return {n: np.load(rdir / f"{n}.npy") for n in ("examples_tokens", "examples_values", "histograms")}

    got, want = arrays(store), arrays(straight.store)
    assert all(np.array_equal(got[n], want[n], equal_nan=got[n].dtype.kind == "f") for n in want)
