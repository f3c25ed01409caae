"""`discover universality` against references computed here: the streamed float64 correlations
against np.corrcoef (also with a 1e4 offset, and chunked), the whole run against np.corrcoef on
every counted position's activations (maxima, partners, rotated baselines by rotating the
activations explicitly), a permuted copy of a model (every neuron found, with its partner), two
independent models (almost nothing universal), several passes against one, bad input, and the
rows a run leaves in the catalog."""

from __future__ import annotations

import copy
import json
import random
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import VOCAB, make_model, save
from test_cli import assert_one_error_line, run, snapshot, sql_rows

import discover.store
import discover.universality as U
from discover.activations import bos_id, capture, sequences
from discover.corpus import open_corpus
from discover.store import Store

# Tiny random models have layer activity of low effective rank (a participation ratio of 20-80
# for 128-256 neurons), so a random rotation of a layer stays correlated with its neurons: the
# rotated baseline was measured at a median 0.5 / max 0.75 for GPT-2 with d_model 64, d_mlp 128,
# a 97-word vocabulary and init-scale weights (GELU nearly linear), where only 40% of the neurons
# of an exact permuted copy clear an excess of 0.5. A larger vocabulary, d_model and pre-activation
# scale raise the rank: with these settings the baseline is ~0.3 (median) and ~0.5 (max).
V, D_MODEL, D_MLP, LAYERS, FC_SCALE = 4000, 256, 256, 2, 5.0
CONTEXT, BATCH, TOKENS = 32, 64, 3000
WORDS = ["<|endoftext|>"] + [f"t{i}" for i in range(1, V)]


def _tokenizer(words):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="<|endoftext|>")


def _model(seed: int):
    torch.manual_seed(seed)
    m = make_model("gpt2", n_layer=LAYERS, d_model=D_MODEL, d_mlp=D_MLP, vocab=V)
    with torch.no_grad():
        for blk in m.transformer.h:  # pre-activations of order 1, as in trained models: GELU is nonlinear
            blk.mlp.c_fc.weight.mul_(FC_SCALE)
    return m


def _save(model, path: Path, words=WORDS) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path), safe_serialization=True)
    _tokenizer(words).save_pretrained(str(path))
    return path


def permuted(model, seed: int):
    """A copy whose MLP neurons are permuted within each layer (c_fc columns and bias, c_proj
    rows): the same function. Returns (copy, [perm per layer]); copy neuron k = original perm[k]."""
    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    perms = []
    with torch.no_grad():
        for blk in m.transformer.h:
            p = torch.randperm(blk.mlp.c_fc.weight.shape[1], generator=g)
            blk.mlp.c_fc.weight.copy_(blk.mlp.c_fc.weight[:, p])
            blk.mlp.c_fc.bias.copy_(blk.mlp.c_fc.bias[p])
            blk.mlp.c_proj.weight.copy_(blk.mlp.c_proj.weight[p, :])
            perms.append(p.numpy())
    return m, perms


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("univ")
    rng = random.Random(3)
    corpus = d / "corpus"
    corpus.mkdir()
    for i in range(60):
        n = rng.choice([5, 31, 40, 90, 150])  # shorter than, equal to and longer than one piece
        (corpus / f"d{i:02d}.txt").write_text(" ".join(rng.choice(WORDS[1:]) for _ in range(n)))
    a = _model(0)
    b, perms = permuted(a, 1)
    models = SimpleNamespace(a=_save(a, d / "a"), b=_save(b, d / "b"), c=_save(_model(5), d / "c"))
    # two small models whose vocabularies have the same size but different strings
    small = save(make_model("gpt2"), d / "small")
    other = d / "other_vocab"
    make_model("gpt2").save_pretrained(str(other), safe_serialization=True)
    _tokenizer(VOCAB[:1] + VOCAB[1:][::-1]).save_pretrained(str(other))
    (d / "empty").mkdir()
    return SimpleNamespace(dir=d, corpus=corpus, perms=perms, small=small, other_vocab=other, **vars(models))


def _run(env, specs, store, **kw):
    kw = {"corpus": str(env.corpus), "tokens": TOKENS, "context": CONTEXT, "batch_size": BATCH, "progress": False,
          **kw}
    with Store(store) as st:
        s = U.universality([str(x) for x in specs], st, **kw)
        rows = st.con.execute(
            "SELECT checkpoint_id, other_checkpoint_id, layer, neuron, max_corr, partner_layer, partner_neuron, "
            "baseline_corr, excess FROM neuron_correlations WHERE universality_id = ? "
            "ORDER BY checkpoint_id, other_checkpoint_id, layer, neuron", [s.universality_id]).fetchnumpy()
        uni = st.con.execute(
            "SELECT checkpoint_id, layer, neuron, mean_max_corr, mean_baseline, mean_excess, universal "
            "FROM universal_neurons WHERE universality_id = ? ORDER BY checkpoint_id, layer, neuron",
            [s.universality_id]).fetchnumpy()
    return s, rows, uni


@pytest.fixture(scope="module")
def perm_run(env, tmp_path_factory):
    return _run(env, [env.a, env.b], tmp_path_factory.mktemp("perm") / "store")


@pytest.fixture(scope="module")
def indep_run(env, tmp_path_factory):
    return _run(env, [env.a, env.c], tmp_path_factory.mktemp("indep") / "store")


def _of(rows, ckpt, other=None):
    sel = rows["checkpoint_id"] == ckpt
    if other is not None:
        sel &= rows["other_checkpoint_id"] == other
    return {k: np.asarray(v)[sel] for k, v in rows.items()}


# ------------------------------------------------------------------ streaming numerics
def _stream_data(n=700, na=9, nb=7, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 4))
    A = np.tanh(z @ rng.standard_normal((4, na))) + 0.3 * rng.standard_normal((n, na)) ** 3
    B = np.maximum(z @ rng.standard_normal((4, nb)), 0) + 0.1 * rng.standard_normal((n, nb))
    return A, B


def _chunks(A, B, sizes):
    out, i = [], 0
    for s in sizes:
        out.append((A[i:i + s], B[i:i + s]))
        i += s
    assert i == len(A)
    return out


def _corrcoef_cross(A, B):
    return np.corrcoef(A.T, B.T)[:A.shape[1], A.shape[1]:]


@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_streamed_correlation_equals_corrcoef(offset):
    """Chunks of uneven sizes (1 row included), one chunk, and a large common offset all give
    np.corrcoef's matrix: the update is exact and stable in float64."""
    A, B = _stream_data()
    A, B = A + offset, B - offset
    ref = _corrcoef_cross(A, B)
    chunked = U.streamed_correlation(_chunks(A, B, [1, 50, 3, 200, 446]))
    single = U.streamed_correlation([(A, B)])
    assert np.abs(chunked - ref).max() < 1e-10
    assert np.abs(single - ref).max() < 1e-10
    assert np.abs(chunked - single).max() < 1e-12


def test_constant_neuron_has_no_correlation():
    A, B = _stream_data()
    A[:, 2] = 0.1  # a dead neuron (0.1 is not a float64 of a round mean)
    corr = U.streamed_correlation(_chunks(A, B, [100, 600]))
    assert np.isnan(corr[2]).all() and np.isfinite(np.delete(corr, 2, axis=0)).all()
    m = U.block_maxima(_chunks(A, B, [100, 600]), U.haar_rotation(9, 0, "0" * 16, 0), U.haar_rotation(7, 0, "1" * 16, 0))
    assert np.isnan(m["a"]["max_corr"][2]) and m["a"]["partner"][2] == -1
    assert np.isfinite(np.delete(m["a"]["max_corr"], 2)).all() and np.isfinite(m["b"]["max_corr"]).all()


def test_rotated_baseline_equals_explicit_rotation():
    """baseline from C R^T and diag(R S R^T) == the max correlation with explicitly rotated activations."""
    A, B = _stream_data(n=900, na=12, nb=10, seed=2)
    Ra, Rb = U.haar_rotation(12, 3, "ab" * 8, 0), U.haar_rotation(10, 3, "cd" * 8, 1)
    assert np.abs(Ra @ Ra.T - np.eye(12)).max() < 1e-12
    m = U.block_maxima(_chunks(A, B, [300, 1, 599]), Ra, Rb)
    plain = _corrcoef_cross(A, B)
    assert np.abs(m["a"]["max_corr"] - plain.max(1)).max() < 1e-12
    assert (m["a"]["partner"] == plain.argmax(1)).all() and (m["b"]["partner"] == plain.argmax(0)).all()
    assert np.abs(m["a"]["baseline"] - _corrcoef_cross(A, B @ Rb.T).max(1)).max() < 1e-12
    assert np.abs(m["b"]["baseline"] - _corrcoef_cross(A @ Ra.T, B).max(0)).max() < 1e-12


def test_haar_rotation_is_seeded():
    r = U.haar_rotation(8, 1, "ff" * 8, 2)
    assert np.array_equal(r, U.haar_rotation(8, 1, "ff" * 8, 2))
    assert not np.allclose(r, U.haar_rotation(8, 1, "ff" * 8, 3))
    assert not np.allclose(r, U.haar_rotation(8, 2, "ff" * 8, 2))


# ----------------------------------------------------------------- the whole run, exact
def _unpadded_acts(view, corpus, tokens):
    """Every counted position's activations (L*N columns) computed independently of the run's
    batching: the pieces, first `tokens` document tokens, BOS left out, no padding (pieces of one
    length are run together)."""
    bos = bos_id(view.tokenizer)
    pieces, total = [], 0
    for *_, ids, _ in sequences(open_corpus(str(corpus)), "all", view.tokenizer, CONTEXT, bos):
        pieces.append((ids, min(len(ids) - 1, tokens - total)))
        total += pieces[-1][1]
        if total == tokens:
            break
    out = [None] * len(pieces)
    for n in {len(ids) for ids, _ in pieces}:
        idx = [i for i, (ids, _) in enumerate(pieces) if len(ids) == n]
        with torch.no_grad(), capture(view) as got:
            view.model(torch.tensor([pieces[i][0] for i in idx]), use_cache=False)
            acts = torch.cat(got["acts"], dim=-1).double().numpy()  # (B, T, L*N)
        for b, i in enumerate(idx):
            out[i] = acts[b, 1:1 + pieces[i][1]]
    return np.concatenate(out)


def _batched_acts(plan, m):
    """The activations the run folded: its own batches and counted positions, captured again."""
    view = plan.views[m]
    rows = []
    for ids, counted in plan.batches:
        with torch.no_grad(), capture(view) as got:
            view.model.base_model(input_ids=torch.from_numpy(ids), use_cache=False)
            rows.append(torch.cat(got["acts"], dim=-1)[torch.from_numpy(counted)].double().numpy())
    return np.concatenate(rows)


def _rotate(X, ckpt):
    return np.concatenate([X[:, l * D_MLP:(l + 1) * D_MLP] @ U.haar_rotation(D_MLP, 0, ckpt, l).T
                           for l in range(LAYERS)], axis=1)


def test_run_equals_corrcoef_on_all_activations(env, indep_run):
    """Stored maxima, partners and baselines == np.corrcoef over the activations of every
    counted position (the baseline: activations rotated explicitly, layer by layer): to 1e-10 on
    the run's own activations, to 1e-6 on activations computed without padding (float32
    forward passes of other batch shapes round differently), which checks the positions
    (every document token, no BOS, no padding, the first --tokens)."""
    s, rows, _ = indep_run
    assert s.tokens == TOKENS
    ca, cc = (m["checkpoint_id"] for m in s.models)
    plan = U.prepare([str(env.a), str(env.c)], U.UniversalityConfig(tokens=TOKENS, context=CONTEXT, batch_size=BATCH),
                     corpus=str(env.corpus))
    assert plan.tokens == TOKENS and sum(c.sum() for _, c in plan.batches) == TOKENS and len(plan.batches) >= 2
    same = _batched_acts(plan, 0), _batched_acts(plan, 1)
    unpadded = _unpadded_acts(plan.views[0], env.corpus, TOKENS), _unpadded_acts(plan.views[1], env.corpus, TOKENS)
    for (A, C), tol in ((same, 1e-10), (unpadded, 1e-6)):
        assert len(A) == len(C) == TOKENS
        full = _corrcoef_cross(A, C)  # (L*N, L*N)
        for mine, other, corr, base in ((ca, cc, full, _corrcoef_cross(A, _rotate(C, cc))),
                                        (cc, ca, full.T, _corrcoef_cross(_rotate(A, ca), C).T)):
            r = _of(rows, mine, other)
            assert np.abs(r["max_corr"] - corr.max(1)).max() < tol
            assert np.abs(r["baseline_corr"] - base.max(1)).max() < tol
            assert np.abs(r["excess"] - (r["max_corr"] - r["baseline_corr"])).max() < 1e-15
            top2 = np.sort(corr, axis=1)[:, -2:]
            clear = top2[:, 1] - top2[:, 0] > 10 * tol  # partners are exact unless the top two tie
            assert clear.mean() > 0.9
            got = (r["partner_layer"] * D_MLP + r["partner_neuron"])[clear]
            assert (got == corr.argmax(1)[clear]).all()


# --------------------------------------------------------------- what the method finds
def test_permuted_copy_is_found_neuron_by_neuron(env, perm_run):
    """Every neuron of a model and of its permuted copy: max correlation 1 with the permuted
    partner; the rotated baseline well below 1; universal exactly where the excess > 0.5, which
    is every neuron whose baseline is below 0.5 (all but a few on these tiny models)."""
    s, rows, uni = perm_run
    ca, cb = (m["checkpoint_id"] for m in s.models)
    for mine, other, forward in ((ca, cb, False), (cb, ca, True)):
        r = _of(rows, mine, other)
        assert len(r["neuron"]) == LAYERS * D_MLP
        assert (r["max_corr"] > 1 - 1e-9).all(), r["max_corr"].min()
        assert (r["partner_layer"] == r["layer"]).all()
        for layer, p in enumerate(env.perms):  # copy neuron k is original p[k]
            sel = r["layer"] == layer
            want = p[r["neuron"][sel]] if forward else np.argsort(p)[r["neuron"][sel]]
            assert (r["partner_neuron"][sel] == want).all()
        assert np.median(r["baseline_corr"]) < 0.4 and r["baseline_corr"].max() < 0.7
    ok = np.asarray(uni["mean_excess"]) > 0.5
    assert (np.asarray(uni["universal"]) == ok).all()
    assert (np.asarray(uni["mean_baseline"])[~ok] > 0.5 - 1e-9).all()  # a miss is the baseline, never the max
    assert ok.mean() >= 0.95, ok.mean()
    for m in s.models:
        assert m["dead"] == 0 and m["universal"] == int(ok[np.asarray(uni["checkpoint_id"]) == m["checkpoint_id"]].sum())


def test_independent_models_share_almost_nothing(indep_run):
    s, rows, uni = indep_run
    assert np.mean(uni["universal"]) < 0.05
    assert np.median(rows["max_corr"]) < 0.5
    assert abs(np.median(rows["excess"])) < 0.1  # the baseline is the chance level of the max
    assert all(m["fraction"] < 0.05 for m in s.models)


@pytest.fixture(scope="module")
def three_run(env, tmp_path_factory):
    """Three models through the CLI (--json), one pass: (summary, store)."""
    import contextlib
    import io
    import json

    from discover.cli import main

    store = tmp_path_factory.mktemp("three") / "store"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(x) for x in ["universality", env.a, env.b, env.c, "--corpus", env.corpus, "--tokens", TOKENS,
                                    "--context", CONTEXT, "--batch-size", BATCH, "--store", store, "--json"]])
    assert rc == 0, err.getvalue()
    return json.loads(out.getvalue()), store


def _stored(store, uid):
    with Store(store, read_only=True) as st:
        return st.con.execute(
            "SELECT checkpoint_id, other_checkpoint_id, layer, neuron, max_corr, partner_layer, partner_neuron, "
            "baseline_corr, excess FROM neuron_correlations WHERE universality_id = ? "
            "ORDER BY checkpoint_id, other_checkpoint_id, layer, neuron", [uid]).fetchnumpy()


def test_several_passes_equal_one(env, three_run, tmp_path):
    """A budget that holds six blocks at a time: passes that split the within-layer and cross
    blocks and the model pairs, over the same batches; the same numbers as one pass."""
    res, store = three_run
    shapes = [(LAYERS, D_MLP)] * 3
    one = U.schedule(shapes, int(2 * U.GiB), CONTEXT, BATCH)
    small_gb = (one.reserve_bytes + one.batch_bytes + 6.5 * 8 * D_MLP * D_MLP) / U.GiB
    many = U.schedule(shapes, int(small_gb * U.GiB), CONTEXT, BATCH)
    assert len(one.passes) == 1 and len(many.passes) == 3
    s2, r2, _ = _run(env, [env.a, env.b, env.c], tmp_path / "many", memory_gb=small_gb)
    r1 = _stored(store, res["universality_id"])
    assert (res["passes"], s2.passes) == (1, len(many.passes))
    for k in ("checkpoint_id", "other_checkpoint_id", "layer", "neuron", "partner_layer", "partner_neuron"):
        assert (np.asarray(r1[k]) == np.asarray(r2[k])).all(), k
    for k in ("max_corr", "baseline_corr", "excess"):
        assert np.abs(np.asarray(r1[k]) - np.asarray(r2[k])).max() <= 1e-12, k
    assert [m["universal"] for m in res["models"]] == [m["universal"] for m in s2.models]


def test_schedule_of_the_docstring_example():
    """GPT-2 medium x 2 seeds: the numbers the module docstring and --help state."""
    shapes = [(24, 4096)] * 2
    s2 = U.schedule(shapes, 2 * U.GiB, 256)
    assert (len(s2.passes), s2.batch_size, len(s2.passes[0])) == (70, 1, 9)
    assert sum(len(p) for p in s2.passes) == 48 + 576
    s16 = U.schedule(shapes, 16 * U.GiB, 256)
    assert (len(s16.passes), s16.batch_size, len(s16.passes[0])) == (7, 8, 95)
    assert len(U.schedule(shapes, 32 * U.GiB, 256).passes) == 4
    for s in (s2, s16):
        assert all(sum(u.nbytes for u in p) + s.reserve_bytes + s.batch_bytes <= s.budget_bytes for p in s.passes)
    with pytest.raises(U.UniversalityError, match="raise --memory-gb to at least"):
        U.schedule(shapes, U.GiB // 2, 256)


# ------------------------------------------------------------------------- the catalog
def test_rows_and_latest_universality(env, three_run, capsys):
    """Three models: rows per neuron and other model, per neuron the means over the two others,
    and `latest_universality` gives them back (the newest run that includes the checkpoint)."""
    res, store = three_run
    n = LAYERS * D_MLP
    uid = res["universality_id"]
    assert sql_rows(store, "SELECT count(*) FROM neuron_correlations WHERE universality_id = ?", [uid])[0][0] == 3 * n * 2
    assert sql_rows(store, "SELECT count(*) FROM universal_neurons WHERE universality_id = ?", [uid])[0][0] == 3 * n
    assert sql_rows(store, "SELECT count(DISTINCT (checkpoint_id, layer, neuron)) FROM universal_neurons "
                           "WHERE universality_id = ?", [uid])[0][0] == 3 * n
    run_row = sql_rows(store, "SELECT tokens, split, json_extract(settings, '$.passes')::INT, "
                              "json_extract(settings, '$.bos_excluded')::BOOLEAN FROM universality_runs "
                              "WHERE universality_id = ?", [uid])
    assert run_row == [(TOKENS, "all", 1, True)]
    bad = sql_rows(store, "SELECT count(*) FROM universal_neurons u JOIN (SELECT checkpoint_id, layer, neuron, "
                          "avg(max_corr) m, avg(baseline_corr) b FROM neuron_correlations WHERE universality_id = ? "
                          "GROUP BY ALL) c USING (checkpoint_id, layer, neuron) WHERE u.universality_id = ? AND ("
                          "abs(u.mean_max_corr - c.m) > 1e-12 OR abs(u.mean_baseline - c.b) > 1e-12 "
                          "OR abs(u.mean_excess - (c.m - c.b)) > 1e-12 OR u.universal != (u.mean_excess > 0.5))",
                   [uid, uid])
    assert bad == [(0,)]
    ca, cb, cc = (m["checkpoint_id"] for m in res["models"])
    with Store(store, read_only=True) as st:
        lat = U.latest_universality(st, cb)
        assert U.latest_universality(st, "0" * 64) is None
    assert lat["universality_id"] == uid and lat["tokens"] == TOKENS and lat["threshold"] == 0.5
    assert [m["checkpoint_id"] for m in lat["models"]] == [ca, cb, cc]
    assert len(lat["neurons"]) == n
    nb = lat["neurons"][(1, 7)]
    assert [p["checkpoint_id"] for p in nb["partners"]] == [ca, cc]
    assert nb["partners"][0]["layer"] == 1 and nb["partners"][0]["neuron"] == int(env.perms[1][7])
    assert nb["partners"][0]["max_corr"] > 1 - 1e-9
    assert nb["mean_max_corr"] == pytest.approx(np.mean([p["max_corr"] for p in nb["partners"]]), abs=1e-12)
    # a newer run of two of them (the text summary) is what latest_universality gives for those
    rc, out, err = run(capsys, "universality", env.a, env.b, "--corpus", env.corpus, "--tokens", 500, "--context",
                       CONTEXT, "--store", store, "--top", 3)
    assert rc == 0, err
    assert "universal neurons per layer" in out and "strongest universal neurons" in out, out
    assert out.count("%") == 3 and len([line for line in out.splitlines() if line.startswith(str(env.a))]) >= 3
    with Store(store, read_only=True) as st:
        assert U.latest_universality(st, ca)["universality_id"] != uid
        assert U.latest_universality(st, ca)["tokens"] == 500
        assert U.latest_universality(st, cc)["universality_id"] == uid


def test_a_failed_write_leaves_nothing(env, tmp_path, monkeypatch):
    """The run's rows are written in one transaction: a failure at the last insert commits nothing."""
    store = tmp_path / "store"
    Store(store).close()
    before = snapshot(store, catalog_size=False)
    calls = []

    def failing(con, table, tbl):
        calls.append(table)
        if table == "universal_neurons":
            raise OSError("disk full")
        return real(con, table, tbl)

    real = discover.store.insert_arrow
    monkeypatch.setattr(discover.store, "insert_arrow", failing)
    with pytest.raises(OSError):
        _run(env, [env.a, env.b], store, tokens=300)
    assert calls == ["neuron_correlations", "universal_neurons"]
    assert snapshot(store, catalog_size=False) == before


# -------------------------------------------------------------------------- bad input
def _u(env, *specs, extra=(), store=None):
    return ["universality", *specs, "--corpus", env.corpus, "--tokens", 200, "--context", CONTEXT,
            "--store", store or env.dir / "store", *extra]


BAD = [
    ("one model", lambda e: _u(e, e.a), ["two or more models", "got 1"]),
    ("same checkpoint twice", lambda e: _u(e, e.a, e.a), ["same checkpoint", "distinct models"]),
    ("different vocabularies", lambda e: _u(e, e.small, e.other_vocab), ["different vocabularies", "first difference at id 1"]),
    ("different vocabulary sizes", lambda e: _u(e, e.a, e.small), ["different vocabularies", "4000 vs 97"]),
    ("missing model", lambda e: _u(e, e.a, e.dir / "nope"), ["does not exist"]),
    ("tokens 0", lambda e: _u(e, e.a, e.b, extra=("--tokens", 0)), ["tokens must be a positive"]),
    ("memory", lambda e: _u(e, e.a, e.b, extra=("--memory-gb", 0.0001)), ["cannot hold one block", "at least"]),
    ("memory 0", lambda e: _u(e, e.a, e.b, extra=("--memory-gb", 0)), ["memory_gb must be a positive"]),
    ("context", lambda e: _u(e, e.a, e.b, extra=("--context", 999)), ["--context 999", "32 positions"]),
    ("missing corpus", lambda e: _u(e, e.a, e.b, extra=("--corpus", e.dir / "nocorpus")), ["does not exist"]),
    ("empty corpus", lambda e: _u(e, e.a, e.b, extra=("--corpus", e.dir / "empty")), ["no documents"]),
]


@pytest.mark.parametrize("argv, needles", [pytest.param(a, n, id=i) for i, a, n in BAD])
def test_bad_input_is_one_line_and_changes_nothing(env, argv, needles, capsys):
    store = env.dir / "store"
    if not store.exists():
        Store(store).close()
    before = snapshot(store)
    rc, _, err = run(capsys, *argv(env))
    assert_one_error_line(rc, err, *needles)
    assert snapshot(store) == before


def test_a_fresh_store_is_not_created_by_bad_input(env, tmp_path, capsys):
    rc, _, err = run(capsys, *_u(env, env.a, env.small, store=tmp_path / "fresh"))
    assert_one_error_line(rc, err, "different vocabularies")
    assert not (tmp_path / "fresh").exists()


def test_report_shows_universality(env, tmp_path):
    """The report of a scanned model carries the latest universality run: per-layer counts and,
    on each card, the neuron's excess and partners (the same numbers as the catalog)."""
    from discover.report import build_report, render_html, render_markdown
    from discover.scan import scan_model

    store = tmp_path / "store"
    s, rows, uni = _run(env, [env.a, env.b], store)
    with Store(store) as st:
        scan_model(str(env.a), st, progress=False)
        rep = build_report(st, str(env.a), cards=30)
    ca = s.models[0]["checkpoint_id"]
    mine = np.asarray(uni["checkpoint_id"]) == ca
    u = rep["universality"]
    assert u["universal"] == int(np.asarray(uni["universal"])[mine].sum()) and u["neurons"] == int(mine.sum())
    assert sum(u["per_layer"]) == u["universal"]
    carded = [c for c in rep["cards"] if c.get("universality")]
    assert carded, "universal neurons become candidates when there is room"
    for c in carded:
        i = np.flatnonzero(mine & (np.asarray(uni["layer"]) == c["layer"]) & (np.asarray(uni["neuron"]) == c["index"]))[0]
        assert c["universality"]["mean_excess"] == pytest.approx(float(uni["mean_excess"][i]))
        assert c["universality"]["partners"][0]["checkpoint_id"] == s.models[1]["checkpoint_id"]
    assert "## Universality" in render_markdown(rep)
    page = tmp_path / "report.html"
    page.write_text(render_html(rep))
    node = shutil.which("node")
    if node is not None:  # the page's script draws the panel and each card's universality table
        res = subprocess.run([node, str(Path(__file__).parent / "js" / "fake_dom.js"), str(page)],
                             capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-2000:]
        dom = json.loads(res.stdout)
        assert dom["ok"] and dom["universality"] >= 2 and "universality:" in dom["cardsText"]


def test_shards_merged_in_order_equal_one_stream(env, indep_run, tmp_path):
    """Positions streamed in shards of one batch (each from empty, merged in shard order: what a
    cluster's workers compute) give the numbers of one stream to float64 rounding, and the
    schedule counts two accumulators per unit."""
    s1, r1, u1 = indep_run
    s2, r2, u2 = _run(env, [env.a, env.c], tmp_path / "sharded", shard_batches=1)
    plan = U.prepare([str(env.a), str(env.c)], U.UniversalityConfig(tokens=TOKENS, context=CONTEXT, batch_size=BATCH,
                                                                    shard_batches=1), corpus=str(env.corpus))
    assert len(U.shards(plan)) == len(plan.batches) >= 2 and plan.schedule.copies == 2
    for k in ("checkpoint_id", "other_checkpoint_id", "layer", "neuron", "partner_layer", "partner_neuron"):
        assert (np.asarray(r1[k]) == np.asarray(r2[k])).all(), k
    for k in ("max_corr", "baseline_corr", "excess"):
        a, b = np.asarray(r1[k], np.float64), np.asarray(r2[k], np.float64)
        assert np.allclose(a, b, rtol=0, atol=1e-12, equal_nan=True), k
    assert [m["universal"] for m in s1.models] == [m["universal"] for m in s2.models]
    shapes = [(LAYERS, D_MLP)] * 2
    one, two = U.schedule(shapes, int(U.GiB), CONTEXT, BATCH), U.schedule(shapes, int(U.GiB), CONTEXT, BATCH, copies=2)
    assert two.spare_bytes(0) == one.spare_bytes(0) - sum(u.nbytes for u in one.passes[0])
