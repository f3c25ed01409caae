"""`discover` through its entry point: help texts, happy paths with --json, one-line errors
that leave the store untouched, interrupted and killed scans, role re-derivation."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import duckdb
import pytest
import torch
from conftest import VOCAB, make_model, make_tokenizer, save

import discover.store
from discover.adapter import identify
from discover.cli import build_parser, main
from discover.scan import ROLES
from discover.store import CATALOG, CHECKPOINT_TABLES, Store

AN, APPLE = VOCAB.index("an"), VOCAB.index("apple")
N_LAYERS, D_MLP = 2, 128
TOKEN_TOP_K = 50  # the scan's default: the deepest `query token --top` allowed


# ------------------------------------------------------------------------ helpers
def run(capsys, *argv) -> tuple[int, str, str]:
    """main(argv) -> (return code, stdout, stderr)."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def run_json(capsys, *argv):
    """main(argv + --json): exactly one JSON document on stdout, nothing else."""
    rc, out, err = run(capsys, *argv, "--json")
    assert rc == 0, err
    assert "\r" not in out and "neuron/s" not in out, "progress output on stdout"
    return json.loads(out)


def _nan(v):
    return "NaN" if isinstance(v, float) and math.isnan(v) else v  # NaN != NaN would fail equal rows


def snapshot(root: Path, *, ignore: tuple[str, ...] = (), catalog_size: bool = True):
    """Everything a store holds: every catalog table's rows (sorted) and every file with its size.

    `ignore` lists "table"s and "table.column"s left out; without `catalog_size` the catalog
    file's size is left out (a rolled-back transaction may leave free blocks behind: not contents)."""
    files = None
    if root.is_dir():
        files = sorted(
            (p.relative_to(root).as_posix(), p.stat().st_size)
            for p in root.rglob("*")
            if p.is_file() and (catalog_size or not p.name.startswith(CATALOG))
        )
    tables = {}
    if (root / CATALOG).is_file():
        con = duckdb.connect(str(root / CATALOG), read_only=True)
        try:
            names = [r[0] for r in con.execute(
                "SELECT table_name FROM information_schema.tables ORDER BY table_name").fetchall()]
            for t in [n for n in names if n not in ignore]:
                drop = [c.split(".", 1)[1] for c in ignore if c.split(".", 1)[0] == t]
                cols = f"* EXCLUDE ({', '.join(drop)})" if drop else "*"
                rows = con.execute(f"SELECT {cols} FROM {t} ORDER BY ALL").fetchall()
                tables[t] = [tuple(_nan(v) for v in r) for r in rows]
        finally:
            con.close()
    return tables, files


def sql_rows(root: Path, query: str, params=()):
    con = duckdb.connect(str(root / CATALOG), read_only=True)
    try:
        return con.execute(query, list(params)).fetchall()
    finally:
        con.close()


def assert_one_error_line(rc: int, err: str, *needles: str) -> None:
    assert rc != 0
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {lines}"
    assert lines[0].startswith("discover: error:"), lines[0]
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"


def _walk(parser: argparse.ArgumentParser, path=()):
    """(verb path, sub-parser, the help shown in its parent's listing) for every (sub-)verb."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            listed = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield path + (name,), sub, listed.get(name)
                yield from _walk(sub, path + (name,))


VERBS = {" ".join(p): (sub, listed) for p, sub, listed in _walk(build_parser())}


# ----------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    """Tiny models saved once, and one store with the GPT-2 one scanned (default settings)."""
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("cli")
    gpt2 = save(make_model("gpt2", n_layer=N_LAYERS, d_mlp=D_MLP), d / "gpt2")
    neox = save(make_model("gpt_neox"), d / "neox")

    from transformers import MambaConfig, MambaForCausalLM

    # a causal LM with no MLP neurons at all: unsupported
    mamba = save(MambaForCausalLM(MambaConfig(num_hidden_layers=1, hidden_size=16, state_size=4, vocab_size=97)),
                 d / "mamba")

    # pickle-only weights (save_pretrained always writes safetensors in transformers 5)
    pkl = d / "pickled"
    pkl.mkdir()
    m = make_model("gpt2")
    m.config.save_pretrained(str(pkl))
    make_tokenizer().save_pretrained(str(pkl))
    torch.save(m.state_dict(), pkl / "pytorch_model.bin")

    trunc = d / "truncated"
    shutil.copytree(gpt2, trunc)
    f = trunc / "model.safetensors"
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 2)

    not_model = d / "not_a_model"
    not_model.mkdir()
    (not_model / "README.md").write_text("no config.json here\n")
    a_file = d / "a_file"
    a_file.write_text("not a store\n")
    empty_store = d / "empty_store"
    empty_store.mkdir()

    store = d / "store"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["scan", str(gpt2), "--store", str(store)])
    assert rc == 0, err.getvalue()
    return SimpleNamespace(
        dir=d, gpt2=gpt2, neox=neox, mamba=mamba, pickled=pkl, truncated=trunc, not_model=not_model,
        a_file=a_file, empty_store=empty_store, missing=d / "does" / "not" / "exist",
        store=store, scan_out=out.getvalue(), scan_err=err.getvalue(),
    )


@pytest.fixture
def store_copy(ctx, tmp_path):
    """A private copy of the scanned store, for tests that write to it."""
    return Path(shutil.copytree(ctx.store, tmp_path / "store"))


# ------------------------------------------------------------------------- help ---
def test_every_verb_is_walked():
    assert {"scan", "activations", "patch", "verify", "query", "query token", "query neuron", "query roles",
            "query verdicts", "report", "run", "sql", "train"} <= set(VERBS)


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_help_text_and_example(verb, capsys):
    sub, listed = VERBS[verb]
    assert listed and listed.strip(), f"`{verb}` has no help in its parent's listing"
    assert sub.description and sub.description.strip()
    assert "example:" in sub.format_help()
    assert f"discover {verb}" in (sub.epilog or ""), "the example should show the verb itself"
    with pytest.raises(SystemExit) as e:
        main([*verb.split(), "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "example:" in out and listed.strip() in " ".join(out.split())


def test_every_argument_has_help():
    missing = [
        f"{verb}: {a.dest}"
        for verb, (sub, _) in VERBS.items()
        for a in sub._actions
        if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)) and not (a.help or "").strip()
    ]
    assert not missing


# ------------------------------------------------------------------ happy paths ---
def test_scan_prints_summary(ctx):
    assert f"{ctx.gpt2.resolve()}: scanned" in ctx.scan_out
    assert f"{N_LAYERS} layers x {D_MLP} neurons" in ctx.scan_out
    assert ctx.scan_out.splitlines()[1].startswith("roles: ")
    assert "scan L0" in ctx.scan_err  # progress goes to stderr, never stdout


def test_rescan_says_nothing_to_do_and_changes_nothing(ctx, store_copy, capsys):
    # `seen_at` is the one thing a rescan may touch: it says which checkpoint a spec was seen as last
    before = snapshot(store_copy, ignore=("models.seen_at",), catalog_size=False)
    rc, out, _ = run(capsys, "scan", ctx.gpt2, "--store", store_copy)
    assert rc == 0 and "nothing to do" in out
    assert run_json(capsys, "scan", ctx.gpt2, "--store", store_copy)["status"] == "unchanged"
    assert snapshot(store_copy, ignore=("models.seen_at",), catalog_size=False) == before


def test_scan_json_is_one_document(ctx, tmp_path, capsys):
    s = run_json(capsys, "scan", ctx.gpt2, "--store", tmp_path / "s")
    assert s["status"] == "scanned" and s["spec"] == str(ctx.gpt2.resolve())
    assert (s["n_layers"], s["d_mlp"], s["d_model"], s["d_vocab"]) == (N_LAYERS, D_MLP, 64, 97)
    assert set(s["role_counts"]) == set(ROLES)


def test_query_token_json(ctx, capsys):
    res = run_json(capsys, "query", "token", "an", "--model", ctx.gpt2, "--top", 5, "--store", ctx.store)
    assert res["token_id"] == AN and res["token"] == "an" and not res["negative"]
    rows = res["results"]
    assert len(rows) == 5
    for r in rows:
        assert {"layer", "neuron", "congruence", "role", "top_tokens"} <= set(r)
        assert r["neuron"] == f"L{r['layer']}.N{r['neuron_index']}"
        assert 0 <= r["layer"] < N_LAYERS and 0 <= r["neuron_index"] < D_MLP
    cong = [r["congruence"] for r in rows]
    assert cong == sorted(cong, reverse=True)
    # a shallower query is a prefix of the deepest one
    deep = run_json(capsys, "query", "token", "an", "--model", ctx.gpt2, "--top", TOKEN_TOP_K, "--store", ctx.store)
    assert deep["results"][:5] == rows


def test_query_token_negative_is_ascending(ctx, capsys):
    res = run_json(capsys, "query", "token", "an", "--model", ctx.gpt2, "--top", 10, "--negative",
                   "--store", ctx.store)
    cong = [r["congruence"] for r in res["results"]]
    assert len(cong) == 10 and res["negative"]
    assert cong == sorted(cong) and cong[0] < 0
    pos = run_json(capsys, "query", "token", "an", "--model", ctx.gpt2, "--top", 10, "--store", ctx.store)
    assert cong[0] < pos["results"][-1]["congruence"]


def test_query_token_multi_token_text(ctx, capsys):
    res = run_json(capsys, "query", "token", "an apple", "--model", ctx.gpt2, "--top", 3, "--store", ctx.store)
    assert res["tokenization"] == [{"id": AN, "token": "an"}, {"id": APPLE, "token": "apple"}]
    assert res["token_id"] == AN and "first" in res["note"]
    rc, out, _ = run(capsys, "query", "token", "an apple", "--model", ctx.gpt2, "--top", 3, "--store", ctx.store)
    assert rc == 0
    assert "2 tokens" in out and "'an'" in out and "--token-id" in out


def test_query_token_by_id(ctx, capsys):
    res = run_json(capsys, "query", "token", "--token-id", APPLE, "--model", ctx.gpt2, "--top", 3,
                   "--store", ctx.store)
    assert res["token_id"] == APPLE and res["token"] == "apple" and res["tokenization"] is None
    by_text = run_json(capsys, "query", "token", "apple", "--model", ctx.gpt2, "--top", 3, "--store", ctx.store)
    assert by_text["results"] == res["results"]


def test_query_neuron_json(ctx, capsys):
    res = run_json(capsys, "query", "neuron", "L1.N3", "--model", ctx.gpt2, "--store", ctx.store)
    assert (res["neuron"], res["layer"], res["neuron_index"]) == ("L1.N3", 1, 3)
    assert {"vocab_kurt", "vocab_var", "w_out_norm", "cos_in_out"} <= set(res["stats"])
    assert len(res["top_tokens"]) == len(res["bottom_tokens"]) == 20
    assert "similar" not in res

    res = run_json(capsys, "query", "neuron", "L1.N3", "--similar", "--k", 4, "--model", ctx.gpt2,
                   "--store", ctx.store)
    sim = res["similar"]
    assert len(sim) == 4 and "L1.N3" not in [s["neuron"] for s in sim]
    assert [s["cosine"] for s in sim] == sorted((s["cosine"] for s in sim), reverse=True)


def test_query_roles_json(ctx, capsys):
    assert run_json(capsys, "query", "roles", "--role", "prediction", "--model", ctx.gpt2, "--store", ctx.store) \
        == []  # default thresholds find nothing in a random model; see test_rescan_with_new_thresholds


def test_sql(ctx, capsys):
    rows = run_json(capsys, "sql", "SELECT count(*) AS n FROM neurons", "--store", ctx.store)
    assert rows == [{"n": N_LAYERS * D_MLP}]
    rc, out, _ = run(capsys, "sql", "SELECT count(*) AS n FROM neurons", "--store", ctx.store)
    assert rc == 0 and out.split()[-1] == str(N_LAYERS * D_MLP)


def test_discover_store_env(ctx, store_copy, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DISCOVER_STORE", str(store_copy))
    assert run_json(capsys, "sql", "SELECT count(*) AS n FROM neurons") == [{"n": N_LAYERS * D_MLP}]
    assert run_json(capsys, "query", "token", "an", "--model", ctx.gpt2, "--top", 2)["token_id"] == AN
    assert run_json(capsys, "scan", ctx.gpt2)["status"] == "unchanged"
    assert not (tmp_path / "indexes").exists()


def test_allow_pickle_scans(ctx, store_copy, capsys):
    s = run_json(capsys, "scan", ctx.pickled, "--allow-pickle", "--store", store_copy)
    assert s["status"] == "scanned" and s["spec"] == str(ctx.pickled.resolve())
    rows = run_json(capsys, "sql", "SELECT count(DISTINCT checkpoint_id) AS n FROM neurons", "--store", store_copy)
    assert rows == [{"n": 2}]


# ------------------------------------------------------------------- bad inputs ---
def Q(*argv):
    """`query ... --model GPT2 --store STORE` for one bad-input case."""
    return lambda c: ["query", *argv, "--model", c.gpt2, "--store", c.store]


def bad(name, argv, needles, xfail=None, raises=None):
    marks = [pytest.mark.xfail(strict=True, raises=raises, reason=xfail)] if xfail else []
    return pytest.param(argv, needles, id=name, marks=marks)


BAD = [
    bad("missing model", lambda c: ["scan", c.missing, "--store", c.store], ["does not exist"]),
    bad("not a model dir", lambda c: ["scan", c.not_model, "--store", c.store], ["no config.json"]),
    bad("unsupported arch", lambda c: ["scan", c.mamba, "--store", c.store], ["'mamba'", "supported", "GPT-2", "Llama"]),
    bad("truncated safetensors", lambda c: ["scan", c.truncated, "--store", c.store],
        ["truncated", "model.safetensors"]),
    bad("pickle without --allow-pickle", lambda c: ["scan", c.pickled, "--store", c.store],
        ["pickle", "--allow-pickle"]),
    bad("bad scan setting", lambda c: ["scan", c.gpt2, "--store", c.store, "--top-k", 0], ["top_k"]),
    bad("neuron out of range", Q("neuron", "L99.N0"), ["L99.N0", "out of range", "0-1"]),
    bad("neuron index out of range", Q("neuron", f"L0.N{D_MLP}"), ["out of range", f"0-{D_MLP - 1}"]),
    bad("neuron id L3N5", Q("neuron", "L3N5"), ["malformed neuron id", "L3N5"]),
    bad("neuron id 3.5", Q("neuron", "3.5"), ["malformed neuron id", "3.5"]),
    bad("neuron id L-1.N2", Q("neuron", "L-1.N2"), ["malformed neuron id", "L-1.N2"]),
    bad("empty token text", Q("token", ""), ["empty"]),
    bad("no token at all", Q("token"), ["--token-id"]),
    bad("token id not in vocab", Q("token", "--token-id", 100000), ["100000", "not in the vocabulary"]),
    bad("negative token id", Q("token", "--token-id", -1), ["not in the vocabulary"]),
    bad("--top deeper than the scan", Q("token", "an", "--top", TOKEN_TOP_K + 1), ["--top", "--token-top-k"]),
    bad("--top 0", Q("token", "an", "--top", 0), ["--top"]),
    bad("unknown role", Q("roles", "--role", "bogus"), ["bogus", "prediction"]),
    bad("roles --top -1", Q("roles", "--role", "prediction", "--top", -1), ["--top"]),
    bad("similar --k -1", Q("neuron", "L0.N0", "--similar", "--k", -1), ["--k"]),
    bad("word not in the vocabulary", Q("token", "zzz"), ["zzz", "not in the vocabulary"]),
    bad("store is a file (scan)", lambda c: ["scan", c.gpt2, "--store", c.a_file], ["is a file"]),
    bad("store is a file (query)", lambda c: ["query", "token", "an", "--model", c.gpt2, "--store", c.a_file],
        ["is a file"]),
    bad("store is a file (sql)", lambda c: ["sql", "SELECT 1", "--store", c.a_file], ["is a file"]),
    bad("model never scanned", lambda c: ["query", "token", "an", "--model", c.neox, "--store", c.store],
        ["has not been scanned", "discover scan"]),
    bad("store without catalog", lambda c: ["query", "neuron", "L0.N0", "--model", c.gpt2, "--store", c.empty_store],
        ["no catalog", "discover scan"]),
    bad("store that does not exist", lambda c: ["sql", "SELECT 1", "--store", c.dir / "nowhere"], ["no catalog"]),
    bad("sql DELETE", lambda c: ["sql", "DELETE FROM neurons", "--store", c.store], ["read-only"]),
    bad("sql CREATE", lambda c: ["sql", "CREATE TABLE x(a INT)", "--store", c.store], ["read-only"]),
    bad("sql DROP after SELECT", lambda c: ["sql", "SELECT 1; DROP TABLE neurons", "--store", c.store],
        ["read-only"]),
    bad("sql ATTACH a new file", lambda c: ["sql", f"ATTACH '{c.store / 'evil.duckdb'}' AS e", "--store", c.store],
        ["SQL error"]),
    bad("malformed sql", lambda c: ["sql", "SELEC count(*) FROM neurons", "--store", c.store], ["SQL error", "SELEC"]),
    bad("empty sql", lambda c: ["sql", "  ", "--store", c.store], ["empty SQL"]),
]


@pytest.mark.parametrize("argv, needles", BAD)
def test_bad_input_is_one_line_and_changes_nothing(ctx, argv, needles, capsys):
    watched = [ctx.store, ctx.empty_store, ctx.dir / "nowhere"]
    before = [snapshot(s) for s in watched]
    file_before = ctx.a_file.read_bytes()
    rc, out, err = run(capsys, *argv(ctx))
    assert_one_error_line(rc, err, *needles)
    assert out == ""
    assert [snapshot(s) for s in watched] == before
    assert ctx.a_file.read_bytes() == file_before


def test_sql_cannot_write_files(ctx, capsys):
    target = ctx.dir / "copied.csv"
    rc, _, err = run(capsys, "sql", f"COPY neurons TO '{target}'", "--store", ctx.store)
    created = target.exists()
    target.unlink(missing_ok=True)
    assert not created
    assert_one_error_line(rc, err, "SQL error")


def test_failed_scan_creates_no_store(ctx, tmp_path, capsys):
    rc, _, err = run(capsys, "scan", ctx.missing, "--store", tmp_path / "new_store")
    assert_one_error_line(rc, err, "does not exist")
    assert not (tmp_path / "new_store").exists()


# --------------------------------------------------------------- interruptions ---
@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
def test_interrupted_scan_leaves_nothing(ctx, store_copy, exc, monkeypatch, capsys):
    """Fail inside write_scan's transaction (after every row is inserted) while scanning a new model."""
    before = snapshot(store_copy, catalog_size=False)

    def boom(self, spec, checkpoint_id):
        raise exc("interrupted inside the transaction")

    monkeypatch.setattr(discover.store.Store, "add_alias", boom)
    if exc is KeyboardInterrupt:
        rc, out, err = run(capsys, "scan", ctx.neox, "--store", store_copy, "--json")
        assert rc == 130 and out == ""
        assert err.splitlines() == ["discover: interrupted; the store is unchanged by the unfinished work"]
    else:
        with pytest.raises(RuntimeError):
            main(["scan", str(ctx.neox), "--store", str(store_copy), "--json"])
    monkeypatch.undo()
    assert snapshot(store_copy, catalog_size=False) == before  # no half-written directory either
    Store(store_copy).close()  # opening for writing removes orphans; there must be none to remove
    assert snapshot(store_copy, catalog_size=False) == before


def _wait_for(proc: subprocess.Popen, needle: bytes, timeout: float) -> bytes:
    """Read proc's stderr (unbuffered; tqdm writes \\r, not \\n) until `needle` shows up."""
    buf, end = b"", time.monotonic() + timeout
    fd = proc.stderr.fileno()
    while needle not in buf:
        left = end - time.monotonic()
        if left <= 0 or proc.poll() is not None:
            break
        if select.select([fd], [], [], min(left, 1.0))[0]:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            buf += chunk
    return buf


def test_killed_scan_leaves_no_rows_and_rerun_matches_clean_scan(tmp_path, capsys):
    torch.manual_seed(1)
    model = save(make_model("gpt2", n_layer=4, d_model=128, d_mlp=2048), tmp_path / "big")
    _, ckpt, _ = identify(str(model))
    store = tmp_path / "store"
    # --chunk-rows 1 keeps the scan itself busy for seconds, so the kill lands mid-scan;
    # --top-k 5 only keeps the two in-process scans below quick
    args = ["scan", str(model), "--top-k", "5"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "discover", *args, "--store", str(store), "--chunk-rows", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        seen = _wait_for(proc, b"scan L", timeout=120)
        assert proc.poll() is None, f"the scan ended before it could be killed: {seen[-2000:]!r}"
        assert b"scan L" in seen, seen[-2000:]
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL

    Store(store).close()  # replays the WAL, removes orphan directories
    tables, files = snapshot(store)
    for t in ("checkpoints", "models", *CHECKPOINT_TABLES):
        assert [r for r in tables[t] if ckpt in r] == [], t
    assert not [f for f, _ in files if f.startswith("checkpoints/")]

    rc, out, err = run(capsys, *args, "--store", store, "--json")  # chunking changes no number
    assert rc == 0 and json.loads(out)["status"] == "scanned", err
    clean = tmp_path / "clean"
    assert run(capsys, *args, "--store", clean, "--json")[0] == 0
    rerun_tables, clean_tables = snapshot(store)[0], snapshot(clean)[0]
    for t in CHECKPOINT_TABLES:
        assert rerun_tables[t] == clean_tables[t], t
    assert len(rerun_tables["neurons"]) == 4 * 2048
    assert len(rerun_tables["neuron_tokens"]) == 4 * 2048 * 2 * 5


# ---------------------------------------------------------- role re-derivation ---
def test_rescan_with_new_thresholds_rederives_roles(ctx, store_copy, capsys):
    keep = ("models.seen_at", "neurons.role", "checkpoints.role_thresholds", "roles")
    before = snapshot(store_copy, ignore=keep, catalog_size=False)
    old_counts = run_json(capsys, "scan", ctx.gpt2, "--store", store_copy)["role_counts"]

    s = run_json(capsys, "scan", ctx.gpt2, "--store", store_copy, "--kurtosis", 2)
    assert s["status"] == "roles-updated"
    counts = s["role_counts"]
    assert counts != old_counts and counts["prediction"] + counts["suppression"] > 0
    # statistics, tokens, files: untouched (no rescan)
    assert snapshot(store_copy, ignore=keep, catalog_size=False) == before

    by_sql = run_json(capsys, "sql", "SELECT role, count(*) AS n FROM roles GROUP BY role", "--store", store_copy)
    assert {r: n for r, n in counts.items() if n} == {r["role"]: r["n"] for r in by_sql}
    both = ("SELECT (SELECT count(*) FROM neurons WHERE role IS NOT NULL) AS primary_n, "
            "(SELECT count(DISTINCT (layer, neuron)) FROM roles) AS any_n")
    [row] = run_json(capsys, "sql", both, "--store", store_copy)
    assert row["primary_n"] == row["any_n"] > 0
    [th] = sql_rows(store_copy, "SELECT role_thresholds FROM checkpoints")
    assert json.loads(th[0])["kurtosis"] == 2

    cands = run_json(capsys, "query", "roles", "--role", "prediction", "--top", 10_000, "--model", ctx.gpt2,
                     "--store", store_copy)
    assert len(cands) == counts["prediction"]
    assert [c["score"] for c in cands] == sorted((c["score"] for c in cands), reverse=True)
    assert all(c["vocab_kurt"] > 2 and c["vocab_skew"] > 0 for c in cands)

    assert run_json(capsys, "scan", ctx.gpt2, "--store", store_copy, "--kurtosis", 2)["status"] == "unchanged"
    back = run_json(capsys, "scan", ctx.gpt2, "--store", store_copy)
    assert back["status"] == "roles-updated" and back["role_counts"] == old_counts
