"""Corpus readers: every spec form, stable ids / splits / fingerprints, and one-line errors."""

import inspect
import json
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from discover.corpus import CorpusWarning, Document, open_corpus, split_of
from discover.errors import CorpusError


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)


def ids(corpus, split="all"):
    return [d.doc_id for d in corpus.iter_documents(split)]


def texts(corpus, split="all"):
    return [d.text for d in corpus.iter_documents(split)]


def one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg
    return msg


@pytest.fixture
def text_dir(tmp_path):
    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    (d / "b.txt").write_text("bravo text\n")
    (d / "a.txt").write_text("alpha text\n")
    (d / "c.md").write_text("# charlie\n")
    (d / "sub" / "d.txt").write_text("delta text\n")
    (d / "image.bin").write_bytes(b"\x89PNG\x00\x00\x01binary")
    (d / ".hidden").write_text("not read\n")
    (d / ".git").mkdir()
    (d / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    return d


# ---------------------------------------------------------------- text file ----
def test_small_text_file_is_one_document(tmp_path):
    f = tmp_path / "notes.md"
    f.write_text("hello\n\nworld\n")
    c = open_corpus(str(f))
    assert c.kind == "text"
    assert list(c.iter_documents()) == [Document("notes.md:1", "hello\n\nworld\n")]


def test_long_text_file_is_cut_at_blank_lines(tmp_path):
    paras = [f"paragraph {i} " + "word " * 400 + "\n\n" for i in range(12)]
    f = tmp_path / "book.txt"
    f.write_text("".join(paras))
    docs = list(open_corpus(str(f)).iter_documents())
    assert len(docs) > 1
    assert "".join(d.text for d in docs) == "".join(paras)  # nothing lost or repeated
    assert docs[0].doc_id == "book.txt:1"
    assert all(d.doc_id.startswith("book.txt:") for d in docs)
    assert all(d.text.startswith("paragraph") for d in docs)


def test_single_binary_file_is_an_error(tmp_path):
    f = tmp_path / "blob.txt"
    f.write_bytes(b"abc\x00def")
    with pytest.raises(CorpusError) as e:
        open_corpus(str(f))
    assert "binary" in one_line_error(e)


def test_undecodable_bytes_are_replaced_and_counted(tmp_path):
    f = tmp_path / "latin1.txt"
    # Two bad bytes; the U+FFFD already in the file is real text, not a replacement.
    f.write_bytes("caf".encode() + b"\xe9 ok \xff " + "\ufffd real\n".encode())
    c = open_corpus(str(f))
    (doc,) = c.iter_documents()
    assert doc.text == "caf\ufffd ok \ufffd \ufffd real\n"
    assert c.replaced_bytes == 2
    assert c.describe()["replaced_bytes"] == 2


# ---------------------------------------------------------------- directory ----
def test_directory_sorted_recursive_skips_binary_and_hidden(text_dir):
    c = open_corpus(str(text_dir))
    assert c.kind == "dir"
    with pytest.warns(CorpusWarning, match="1 binary"):
        docs = list(c.iter_documents())
    assert [d.doc_id for d in docs] == ["a.txt", "b.txt", "c.md", "sub/d.txt"]
    assert c.skipped_binary == 1
    assert docs[0].text == "alpha text\n"


def test_directory_glob(text_dir):
    c = open_corpus(f"dir:{text_dir}", glob="*.txt")
    assert ids(c) == ["a.txt", "b.txt", "sub/d.txt"]
    c = open_corpus(str(text_dir), glob="sub/*")
    assert ids(c) == ["sub/d.txt"]


def test_iteration_streams(text_dir):
    it = open_corpus(str(text_dir), glob="*.txt").iter_documents()
    assert inspect.isgenerator(it)
    assert next(it).doc_id == "a.txt"


# -------------------------------------------------------------------- JSONL ----
def test_jsonl_reads_field_and_names_lines(tmp_path):
    f = tmp_path / "data.jsonl"
    rows = [{"text": "first", "n": 1}, {"text": "second"}, {"body": "third", "text": None}]
    f.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + json.dumps(rows[2]) + "\n")
    c = open_corpus(str(f))
    assert c.kind == "jsonl"
    assert list(c.iter_documents()) == [Document("data.jsonl:1", "first"), Document("data.jsonl:2", "second")]
    # --text-field, and a forced kind on a file without the suffix
    g = tmp_path / "data.txt"
    g.write_text(json.dumps({"body": "b1"}) + "\n" + json.dumps({"body": "b2"}) + "\n")
    assert texts(open_corpus(f"jsonl:{g}", text_field="body")) == ["b1", "b2"]


def test_jsonl_missing_field_names_file_line_and_field(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"content": "no text"}) + "\n")
    with pytest.raises(CorpusError) as e:
        list(open_corpus(str(f)).iter_documents())
    msg = one_line_error(e)
    assert "bad.jsonl" in msg and "line 2" in msg and "'text'" in msg and "content" in msg


def test_jsonl_bad_json_is_a_corpus_error(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(CorpusError) as e:
        list(open_corpus(str(f)).iter_documents())
    assert "line 2" in one_line_error(e)


# ------------------------------------------------------------------ Parquet ----
def _write_parquet(path, n=5):
    import duckdb

    con = duckdb.connect()
    con.execute(
        "COPY (SELECT i AS id, 'row number ' || i AS content FROM range(?) t(i) ORDER BY i) TO '"
        + str(path).replace("'", "''")
        + "' (FORMAT parquet)",
        [n],
    )
    con.close()


def test_parquet_column_in_row_order(tmp_path):
    f = tmp_path / "t.parquet"
    _write_parquet(f, 2500)  # more than one fetch batch
    c = open_corpus(str(f), text_field="content")
    assert c.kind == "parquet"
    docs = list(c.iter_documents())
    assert len(docs) == 2500
    assert docs[0] == Document("t.parquet:0", "row number 0")
    assert docs[-1] == Document("t.parquet:2499", "row number 2499")


def test_parquet_missing_column_lists_columns(tmp_path):
    f = tmp_path / "t.parquet"
    _write_parquet(f)
    with pytest.raises(CorpusError) as e:
        list(open_corpus(f"parquet:{f}").iter_documents())
    msg = one_line_error(e)
    assert "'text'" in msg and "id, content" in msg and "--text-field" in msg


# ----------------------------------------------------------------- datasets ----
def test_hf_datasets_directory(tmp_path):
    import datasets

    d = tmp_path / "ds"
    datasets.Dataset.from_dict({"text": ["one", "two", "three"], "label": [0, 1, 0]}).save_to_disk(str(d))
    c = open_corpus(str(d))
    assert c.kind == "hf"
    assert list(c.iter_documents()) == [Document("0", "one"), Document("1", "two"), Document("2", "three")]
    with pytest.raises(CorpusError) as e:
        list(open_corpus(f"hf:{d}", text_field="body").iter_documents())
    assert "label" in one_line_error(e)

    dd = tmp_path / "dd"
    datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"text": ["t0", "t1"]}),
        test=datasets.Dataset.from_dict({"text": ["s0"]}),
    ).save_to_disk(str(dd))
    assert ids(open_corpus(str(dd))) == ["test:0", "train:0", "train:1"]


# ------------------------------------------------------------------ default ----
@pytest.fixture(scope="module")
def default_docs():
    """One pass over the real default corpus: (ids, describe())."""
    c = open_corpus(None)
    got = [d.doc_id for d in c.iter_documents()]
    return got, c.describe()


def test_default_corpus_is_stdlib_and_pydoc(default_docs):
    got, desc = default_docs
    assert desc["kind"] == "default" and desc["documents"] == len(got)
    assert "stdlib:os.py" in got and "stdlib:json/decoder.py" in got
    assert "pydoc:if" in got
    assert got.index("stdlib:zipfile.py") < got.index("pydoc:if")  # sources first, then topics
    src = [i for i in got if i.startswith("stdlib:")]
    assert len(src) > 500 and desc["characters"] > 5_000_000
    for bad in ("/test/", "/tests/", "idle_test", "site-packages", "topics.py", "_sysconfigdata"):
        assert not any(bad in "/" + i.removeprefix("stdlib:") for i in src), bad
    assert not any(i.startswith(("stdlib:test/", "stdlib:tests/")) for i in src)
    assert len(got) == len(set(got))


def test_default_from_another_root(tmp_path):
    root = tmp_path / "lib"
    for rel, text in {
        "os.py": "import sys\n",
        "email/parser.py": '"""Parse mail."""\n',
        "test/test_os.py": "def test(): pass\n",
        "lib2to3/tests/data.py": "x = 1\n",
        "idlelib/idle_test/t.py": "x = 1\n",
        "site-packages/pkg.py": "x = 1\n",
        "config-3.9-x86_64/python-config.py": "x = 1\n",
        "_sysconfigdata__linux.py": "build_time_vars = {}\n",
        "notes.txt": "not python\n",
        "pydoc_data/__init__.py": "",
        "pydoc_data/topics.py": "# Autogenerated\ntopics = {'with': 'The with statement.',\n 'assert': 'The assert statement.'}\n",
    }.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    c = open_corpus(f"default:{root}")
    assert ids(c) == ["stdlib:email/parser.py", "stdlib:os.py", "pydoc:assert", "pydoc:with"]
    assert texts(c)[-1] == "The with statement."
    with pytest.raises(CorpusError) as e:
        open_corpus(f"default:{tmp_path}")
    assert "pydoc_data/topics.py" in one_line_error(e)


# --------------------------------------------------- splits and fingerprints ----
def test_split_is_deterministic_and_stable(tmp_path):
    d = tmp_path / "many"
    d.mkdir()
    for i in range(200):
        (d / f"doc{i:03d}.txt").write_text(f"document {i}\n")
    c = open_corpus(str(d))
    train, held = ids(c, "train"), ids(c, "heldout")
    assert held and train
    assert set(train).isdisjoint(held) and sorted(train + held) == ids(c)
    assert ids(open_corpus(str(d)), "heldout") == held
    # Adding documents moves no existing document between splits.
    for i in range(200, 260):
        (d / f"doc{i:03d}.txt").write_text(f"document {i}\n")
    held2 = ids(open_corpus(str(d)), "heldout")
    assert [i for i in held2 if int(i[3:6]) < 200] == held
    # About 5% held out.
    share = np.mean([split_of(f"id{i}", 5) == "heldout" for i in range(5000)])
    assert 0.04 < share < 0.06


def test_fingerprint_stable_path_free_and_content_sensitive(text_dir, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorpusWarning)
        fp = open_corpus(str(text_dir)).fingerprint()
        assert open_corpus(str(text_dir)).fingerprint() == fp
        copy = tmp_path / "copy"
        shutil.copytree(text_dir, copy)
        assert open_corpus(str(copy)).fingerprint() == fp  # the location is not the content
        (copy / "b.txt").write_text("bravo text, edited\n")
        assert open_corpus(str(copy)).fingerprint() != fp
        assert open_corpus(str(text_dir), glob="*.txt").fingerprint() != fp
    assert len(fp) == 64 and int(fp, 16) >= 0


# ------------------------------------------------------------------- errors ----
def test_missing_path(tmp_path):
    for spec in (str(tmp_path / "nope"), f"jsonl:{tmp_path / 'nope.jsonl'}", f"default:{tmp_path / 'x'}"):
        with pytest.raises(CorpusError) as e:
            open_corpus(spec)
        assert "does not exist" in one_line_error(e)


def test_empty_corpora(tmp_path):
    empty_file = tmp_path / "empty.txt"
    empty_file.write_text("")
    with pytest.raises(CorpusError) as e:
        open_corpus(str(empty_file))
    assert "empty" in one_line_error(e)

    empty_dir = tmp_path / "emptydir"
    empty_dir.mkdir()
    blank = tmp_path / "blank.jsonl"
    blank.write_text('{"text": ""}\n{"text": "   \\n"}\n')
    only_binary = tmp_path / "bin"
    only_binary.mkdir()
    (only_binary / "x.dat").write_bytes(b"\0\1\2")
    for spec in (empty_dir, blank, only_binary):
        c = open_corpus(str(spec))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CorpusWarning)
            with pytest.raises(CorpusError) as e:
                list(c.iter_documents("train"))
        assert "no documents" in one_line_error(e)


def test_bad_split_and_kind_mismatch(text_dir):
    with pytest.raises(CorpusError):
        list(open_corpus(str(text_dir)).iter_documents("validation"))
    with pytest.raises(CorpusError) as e:
        open_corpus(f"text:{text_dir}")
    assert "dir:" in one_line_error(e)


def test_default_plus_docs_corpus(tmp_path):
    """default+docs = the built-in corpus, then the Python docs' reST sources, then fortunes
    grouped into documents; without the Debian packages, one clear error naming them."""
    from discover.corpus import TEXT_CHUNK_CHARS, DefaultDocsCorpus, open_corpus
    from discover.errors import CorpusError

    docs, fort = tmp_path / "_sources", tmp_path / "fortunes"
    (docs / "library").mkdir(parents=True)
    (docs / "library" / "re.rst.txt").write_text("The re module.\n")
    (docs / "about.rst.txt").write_text("About these documents.\n")
    (docs / "notes.html").write_text("<p>not a source</p>")
    fort.mkdir()
    (fort / "computers").write_text("\n%\n".join(["A" * 3000, "B" * 3000, "C" * 3000, "D"]) + "\n%\n")
    (fort / "computers.dat").write_bytes(b"\0\1")
    c = DefaultDocsCorpus(docs_root=str(docs), fortunes_root=str(fort))
    extra = [d for d in c.iter_documents() if not d.doc_id.startswith(("stdlib:", "pydoc:"))]
    assert [d.doc_id for d in extra] == ["pydocs:about.rst.txt", "pydocs:library/re.rst.txt", "fortune:computers:0",
                                        "fortune:computers:1"]
    assert len(extra[2].text) >= TEXT_CHUNK_CHARS and "%" not in extra[2].text and extra[3].text == "D"
    with pytest.raises(CorpusError, match="apt-get install python3.*-doc fortunes"):
        DefaultDocsCorpus(docs_root=str(tmp_path / "nope"), fortunes_root=str(fort))

    import sys

    ver = f"python{sys.version_info.major}.{sys.version_info.minor}"
    if Path(f"/usr/share/doc/{ver}/html/_sources").is_dir() and Path("/usr/share/games/fortunes").is_dir():
        spec = open_corpus("default+docs")
        assert spec.kind == "default+docs" and spec.docs_root.endswith("_sources")
    else:
        with pytest.raises(CorpusError, match=f"apt-get install {ver}-doc fortunes"):
            open_corpus("default+docs")
