"""Corpus readers behind one `--corpus SPEC` syntax.

`open_corpus(spec)` returns a `Corpus` whose `iter_documents(split)` streams `Document(doc_id,
text)` in a fixed order with constant memory. The spec is one of:

    None, "default"          the built-in default corpus (below), from the running Python
    default+docs             the default corpus plus the Python docs' reST sources and fortunes
                             from Debian packages (DefaultDocsCorpus)
    default:ROOT             the built-in default corpus read from another CPython stdlib ROOT
    FILE.jsonl               one JSON object a line; the text is field `text_field`
    FILE.parquet             read through DuckDB; the text is column `text_field`
    DIR with dataset_info.json / state.json / dataset_dict.json
                             a Hugging Face `datasets` directory (`save_to_disk`)
    DIR                      every file under DIR (recursive, sorted, optional `glob`)
    FILE                     any other file: plain text

`text:`, `dir:`, `jsonl:`, `parquet:` and `hf:` in front of a path force the kind.

Document ids are stable: the path relative to the directory (`dir`), `NAME:LINE` (the line where
a document starts: `text`, `jsonl`), `NAME:ROW` (`parquet`), `ROW` or `SPLIT:ROW` (`hf`),
`stdlib:REL/PATH.py` and `pydoc:TOPIC` (default).

Choices a caller should know about:
- A single text file is cut into documents at blank lines, each at least `TEXT_CHUNK_CHARS`
  characters (a whole file shorter than that is one document), so that one long file (a book)
  can still be split into train and held-out parts.
- Documents whose text is empty or only whitespace are skipped; a corpus with none left is an
  error. Directories skip hidden entries (`.git`, `.cache`...) and binary files (a NUL byte in
  the first 8 KiB), counted in `skipped_binary` with a `CorpusWarning`; a binary single file
  is an error.
- Bytes that are not UTF-8 become U+FFFD and are counted in `replaced_bytes`, set after each
  complete pass.
- The held-out split is the documents with `blake2b(doc_id) mod 100 < heldout_percent`: a
  document keeps its split when others are added or removed.

The default corpus is the CPython standard library of the running interpreter
(`sysconfig.get_paths()["stdlib"]`) or of ROOT: every `*.py` file (code, comments, docstrings),
one document each, in sorted path order, except
- anything under a directory named `site-packages`, `test`, `tests`, `idle_test` (this covers
  `test/`, `lib2to3/tests/`, `unittest/test/`, `ctypes/test/`, `tkinter/test/`,
  `distutils/tests/`, `idlelib/idle_test/`), `__pycache__`, or `config-*` (build files),
  or any hidden directory;
- `_sysconfigdata_*.py` (generated build settings of one machine) and `pydoc_data/topics.py`
  (a 750 KB dict literal, whose entries come in separately);
followed by the documentation topics of `pydoc_data/topics.py` (`help("if")`, `help("FORMATTING")`
text: the language reference in prose), one document per topic in sorted key order, read with
`ast.literal_eval` so a ROOT of another Python version is never imported. For CPython 3.11.7
that is 728 files (11.3 M characters) and 79 topics (0.46 M characters): 807 documents, about
3.4 M tokens with a 4096-token BPE trained on it.
"""

from __future__ import annotations

import ast
import fnmatch
import hashlib
import json
import os
import sys
import sysconfig
import warnings
from dataclasses import dataclass
from typing import Iterator

from discover.errors import CorpusError

SPLITS = ("all", "train", "heldout")
KINDS = ("default", "text", "dir", "jsonl", "parquet", "hf")
TEXT_CHUNK_CHARS = 8192
BATCH_ROWS = 1024  # rows per batch read from Parquet / datasets
_BINARY_SNIFF = 8192
_HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_STDLIB_SKIP_DIRS = {"site-packages", "test", "tests", "idle_test", "__pycache__"}
_REPLACEMENT = "\ufffd"
_REPLACEMENT_UTF8 = _REPLACEMENT.encode("utf-8")


class CorpusWarning(UserWarning):
    """Something in the corpus was skipped (binary files in a directory)."""


@dataclass(frozen=True)
class Document:
    """One document of a corpus: a stable id and its text."""

    doc_id: str
    text: str


class _Pass:
    """Counters of one pass over the corpus."""

    __slots__ = ("replaced", "binary")

    def __init__(self) -> None:
        self.replaced = 0
        self.binary = 0


def _decode(raw: bytes, counts: _Pass) -> str:
    """UTF-8 with undecodable bytes replaced by U+FFFD and counted."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        # U+FFFD already present as valid UTF-8 in the input is not a replacement.
        counts.replaced += text.count(_REPLACEMENT) - raw.count(_REPLACEMENT_UTF8)
        return text


def _is_binary(path: str) -> bool:
    with open(path, "rb") as f:
        return b"\0" in f.read(_BINARY_SNIFF)


def split_of(doc_id: str, heldout_percent: int) -> str:
    """'heldout' or 'train': a hash of the document id, so a document never changes side."""
    h = int.from_bytes(hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest(), "big")
    return "heldout" if h % 100 < heldout_percent else "train"


class Corpus:
    """A sequence of documents read on demand; subclasses implement `_read`."""

    kind = "?"

    def __init__(self, path: str, heldout_percent: int = 5) -> None:
        if not 0 <= heldout_percent <= 100:
            raise CorpusError(f"heldout_percent must be 0..100, got {heldout_percent}")
        self.path = path
        self.heldout_percent = heldout_percent
        self.replaced_bytes = 0
        self.skipped_binary = 0
        self._stats: dict | None = None  # fingerprint / documents / characters of a full pass

    # -- subclasses --------------------------------------------------------------------
    def _read(self, counts: _Pass) -> Iterator[Document]:
        raise NotImplementedError

    # -- public ------------------------------------------------------------------------
    def split_of(self, doc_id: str) -> str:
        """'train' or 'heldout' for a document id."""
        return split_of(doc_id, self.heldout_percent)

    def iter_documents(self, split: str = "all") -> Iterator[Document]:
        """Stream the documents of `split` ('all', 'train' or 'heldout') in corpus order."""
        if split not in SPLITS:
            raise CorpusError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        counts = _Pass()
        hasher = hashlib.sha256(f"discover-corpus-v1\0{self.kind}\0".encode())
        n_docs = n_chars = 0
        hashing = self._stats is None
        for doc in self._read(counts):
            if not doc.text.strip():
                continue
            n_docs += 1
            n_chars += len(doc.text)
            if hashing:
                _hash_doc(hasher, doc)
            if split == "all" or self.split_of(doc.doc_id) == split:
                yield doc
        # Only reached when the caller consumed the whole pass.
        self.replaced_bytes = counts.replaced
        self.skipped_binary = counts.binary
        if counts.binary:
            warnings.warn(
                f"skipped {counts.binary} binary file(s) under {self.path}", CorpusWarning, stacklevel=2
            )
        if n_docs == 0:
            raise CorpusError(
                f"corpus {self.path} ({self.kind}) has no documents with text; point --corpus at text"
            )
        if hashing:
            self._stats = {"fingerprint": hasher.hexdigest(), "documents": n_docs, "characters": n_chars}

    def fingerprint(self) -> str:
        """sha256 hex over the kind, the ordered document ids and their texts (one streamed pass)."""
        return self._scan()["fingerprint"]

    def describe(self) -> dict:
        """kind, path, documents, characters, replaced_bytes, skipped_binary, heldout_percent."""
        stats = self._scan()
        return {
            "kind": self.kind,
            "path": self.path,
            "documents": stats["documents"],
            "characters": stats["characters"],
            "replaced_bytes": self.replaced_bytes,
            "skipped_binary": self.skipped_binary,
            "heldout_percent": self.heldout_percent,
            "fingerprint": stats["fingerprint"],
        }

    def _scan(self) -> dict:
        if self._stats is None:
            for _ in self.iter_documents("all"):
                pass
        assert self._stats is not None
        return self._stats

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r})"


def _hash_doc(hasher, doc: Document) -> None:
    # Length-prefixed, so ("ab", "c") and ("a", "bc") hash differently.
    for part in (doc.doc_id.encode("utf-8"), doc.text.encode("utf-8", errors="surrogatepass")):
        hasher.update(len(part).to_bytes(8, "little"))
        hasher.update(part)


# ------------------------------------------------------------------------- readers ----
class TextFileCorpus(Corpus):
    """One text file, cut into documents of at least TEXT_CHUNK_CHARS at blank lines."""

    kind = "text"

    def __init__(self, path: str, heldout_percent: int = 5, chunk_chars: int = TEXT_CHUNK_CHARS):
        super().__init__(path, heldout_percent)
        self.chunk_chars = chunk_chars
        if _is_binary(path):
            raise CorpusError(f"{path} looks binary (it has NUL bytes); pass a text file")

    def _read(self, counts: _Pass) -> Iterator[Document]:
        name = os.path.basename(self.path)
        lines: list[str] = []
        size = 0
        start = 1
        with open(self.path, "rb") as f:
            # '\n' never occurs inside a multi-byte UTF-8 sequence, so decoding per line is exact.
            for lineno, raw in enumerate(f, 1):
                line = _decode(raw, counts)
                if not lines:
                    start = lineno
                lines.append(line)
                size += len(line)
                if size >= self.chunk_chars and not line.strip():
                    yield Document(f"{name}:{start}", "".join(lines))
                    lines, size = [], 0
        if lines:
            yield Document(f"{name}:{start}", "".join(lines))


class DirCorpus(Corpus):
    """Every (glob-matching, non-hidden, non-binary) file under a directory, one document each."""

    kind = "dir"

    def __init__(self, path: str, heldout_percent: int = 5, glob: str | None = None):
        super().__init__(path, heldout_percent)
        self.glob = glob

    def _files(self) -> Iterator[str]:
        """Relative paths in sorted order (path components compared one by one)."""

        def walk(rel: str) -> Iterator[str]:
            full = os.path.join(self.path, rel) if rel else self.path
            try:
                entries = sorted(os.scandir(full), key=lambda e: e.name)
            except OSError as e:
                raise CorpusError(f"cannot list {full}: {e.strerror}; check the corpus path") from None
            for e in entries:
                if e.name.startswith("."):
                    continue
                r = f"{rel}/{e.name}" if rel else e.name
                if e.is_dir(follow_symlinks=False):
                    yield from walk(r)
                elif e.is_file() and self._matches(r):
                    yield r

        return walk("")

    def _matches(self, rel: str) -> bool:
        if self.glob is None:
            return True
        target = rel if "/" in self.glob else rel.rsplit("/", 1)[-1]
        return fnmatch.fnmatchcase(target, self.glob)

    def _read(self, counts: _Pass) -> Iterator[Document]:
        for rel in self._files():
            with open(os.path.join(self.path, rel), "rb") as f:
                raw = f.read()
            if b"\0" in raw[:_BINARY_SNIFF]:
                counts.binary += 1
                continue
            yield Document(rel, _decode(raw, counts))


class JsonlCorpus(Corpus):
    """JSON Lines: one object per line, the text in `text_field`."""

    kind = "jsonl"

    def __init__(self, path: str, heldout_percent: int = 5, text_field: str = "text"):
        super().__init__(path, heldout_percent)
        self.text_field = text_field

    def _read(self, counts: _Pass) -> Iterator[Document]:
        name = os.path.basename(self.path)
        with open(self.path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                line = _decode(raw, counts)
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CorpusError(f"{self.path} line {lineno} is not valid JSON ({e.msg}); fix or remove it") from None
                if not isinstance(obj, dict) or self.text_field not in obj:
                    fields = ", ".join(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
                    raise CorpusError(
                        f"{self.path} line {lineno} has no field {self.text_field!r} (has: {fields}); "
                        "pass --text-field NAME"
                    )
                text = obj[self.text_field]
                if text is None:
                    continue
                if not isinstance(text, str):
                    raise CorpusError(
                        f"{self.path} line {lineno}: field {self.text_field!r} is {type(text).__name__}, "
                        "not a string; pass --text-field NAME of a text field"
                    )
                yield Document(f"{name}:{lineno}", text)


class ParquetCorpus(Corpus):
    """A Parquet file (or a directory of them, sorted), read in batches through DuckDB."""

    kind = "parquet"

    def __init__(self, path: str, heldout_percent: int = 5, text_field: str = "text"):
        super().__init__(path, heldout_percent)
        self.text_field = text_field
        if os.path.isdir(path):
            self.files = sorted(
                os.path.join(dp, f)
                for dp, _, fs in os.walk(path)
                for f in fs
                if f.endswith(".parquet")
            )
            if not self.files:
                raise CorpusError(f"{path} has no *.parquet files; point --corpus at a Parquet file")
        else:
            self.files = [path]

    def _read(self, counts: _Pass) -> Iterator[Document]:
        try:
            import duckdb
        except ImportError:
            raise CorpusError("reading Parquet needs duckdb; pip install duckdb") from None
        con = duckdb.connect()
        try:
            for file in self.files:
                name = os.path.relpath(file, self.path) if len(self.files) > 1 else os.path.basename(file)
                try:
                    columns = [d[0] for d in con.execute("SELECT * FROM read_parquet(?) LIMIT 0", [file]).description]
                except duckdb.Error as e:
                    raise CorpusError(f"{file} is not a readable Parquet file ({str(e).splitlines()[0]})") from None
                if self.text_field not in columns:
                    raise CorpusError(
                        f"{file} has no column {self.text_field!r} (columns: {', '.join(columns)}); "
                        "pass --text-field NAME"
                    )
                field = '"' + self.text_field.replace('"', '""') + '"'
                cur = con.execute(
                    f"SELECT file_row_number, CAST({field} AS VARCHAR) "
                    "FROM read_parquet(?, file_row_number = true) ORDER BY file_row_number",
                    [file],
                )
                while rows := cur.fetchmany(BATCH_ROWS):
                    for row, text in rows:
                        if text is not None:
                            yield Document(f"{name}:{row}", text)
        finally:
            con.close()


class HFCorpus(Corpus):
    """A Hugging Face `datasets` directory written by `save_to_disk` (Dataset or DatasetDict)."""

    kind = "hf"

    def __init__(self, path: str, heldout_percent: int = 5, text_field: str = "text"):
        super().__init__(path, heldout_percent)
        self.text_field = text_field

    def _read(self, counts: _Pass) -> Iterator[Document]:
        try:
            import datasets
        except ImportError:
            raise CorpusError("reading a datasets directory needs `datasets`; pip install datasets") from None
        try:
            loaded = datasets.load_from_disk(self.path)
        except Exception as e:  # datasets raises FileNotFoundError, ValueError... for a bad dir
            raise CorpusError(f"{self.path} is not a datasets directory ({str(e).splitlines()[0]})") from None
        if isinstance(loaded, datasets.DatasetDict):
            parts = [(f"{name}:", loaded[name]) for name in sorted(loaded)]
        else:
            parts = [("", loaded)]
        for prefix, ds in parts:
            if self.text_field not in ds.column_names:
                raise CorpusError(
                    f"{self.path} has no column {self.text_field!r} (columns: {', '.join(ds.column_names)}); "
                    "pass --text-field NAME"
                )
            ds = ds.select_columns([self.text_field])
            row = 0
            for batch in ds.iter(batch_size=BATCH_ROWS):
                for text in batch[self.text_field]:
                    if isinstance(text, str):
                        yield Document(f"{prefix}{row}", text)
                    elif text is not None:
                        raise CorpusError(
                            f"{self.path} row {prefix}{row}: column {self.text_field!r} is "
                            f"{type(text).__name__}, not text; pass --text-field NAME"
                        )
                    row += 1


class DefaultCorpus(Corpus):
    """The CPython standard library source plus pydoc's topics (see the module docstring)."""

    kind = "default"

    def __init__(self, root: str | None = None, heldout_percent: int = 5):
        root = root or sysconfig.get_paths()["stdlib"]
        super().__init__(root, heldout_percent)
        self.topics_path = os.path.join(root, "pydoc_data", "topics.py")
        if not os.path.isfile(self.topics_path):
            raise CorpusError(
                f"{root} is not a CPython standard library (no pydoc_data/topics.py); "
                "pass default:PATH/TO/lib/python3.X"
            )

    def _source_files(self) -> Iterator[str]:
        def walk(rel: str) -> Iterator[str]:
            full = os.path.join(self.path, rel) if rel else self.path
            for e in sorted(os.scandir(full), key=lambda e: e.name):
                r = f"{rel}/{e.name}" if rel else e.name
                if e.is_dir(follow_symlinks=False):
                    if not (e.name in _STDLIB_SKIP_DIRS or e.name.startswith((".", "config-"))):
                        yield from walk(r)
                elif (
                    e.name.endswith(".py")
                    and not e.name.startswith("_sysconfigdata_")
                    and r != "pydoc_data/topics.py"
                    and e.is_file()
                ):
                    yield r

        return walk("")

    def _read(self, counts: _Pass) -> Iterator[Document]:
        for rel in self._source_files():
            with open(os.path.join(self.path, rel), "rb") as f:
                yield Document(f"stdlib:{rel}", _decode(f.read(), counts))
        with open(self.topics_path, "rb") as f:
            tree = ast.parse(_decode(f.read(), counts), self.topics_path)
        topics = None
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "topics" for t in node.targets
            ):
                topics = ast.literal_eval(node.value)
        if not isinstance(topics, dict):
            raise CorpusError(f"{self.topics_path} has no `topics = {{...}}` dict; use another stdlib root")
        for key in sorted(topics):
            yield Document(f"pydoc:{key}", topics[key])


class DefaultDocsCorpus(DefaultCorpus):
    """`default+docs`: the built-in corpus, then English prose from two Debian packages:
    the reStructuredText sources of the Python documentation (`python3.X-doc`:
    /usr/share/doc/python3.X/html/_sources/**/*.txt, one document each, sorted) and the
    `fortunes` collections (/usr/share/games/fortunes/NAME, split at `%` lines and grouped into
    documents of at least TEXT_CHUNK_CHARS characters). Install them with
    `apt-get install python3.X-doc fortunes` (X = the running Python's minor version)."""

    kind = "default+docs"

    def __init__(self, heldout_percent: int = 5, docs_root: str | None = None, fortunes_root: str | None = None):
        super().__init__(None, heldout_percent)
        ver = f"python{sys.version_info.major}.{sys.version_info.minor}"
        self.docs_root = docs_root or f"/usr/share/doc/{ver}/html/_sources"
        self.fortunes_root = fortunes_root or "/usr/share/games/fortunes"
        if not os.path.isdir(self.docs_root) or not os.path.isdir(self.fortunes_root):
            raise CorpusError(
                f"default+docs needs {self.docs_root} and {self.fortunes_root}: "
                f"apt-get install {ver}-doc fortunes (or use --corpus default)"
            )

    def _read(self, counts: _Pass) -> Iterator[Document]:
        yield from super()._read(counts)
        for dirpath, dirnames, filenames in os.walk(self.docs_root):
            dirnames.sort()
            for name in sorted(filenames):
                if name.endswith(".txt"):
                    full = os.path.join(dirpath, name)
                    with open(full, "rb") as f:
                        yield Document(f"pydocs:{os.path.relpath(full, self.docs_root)}", _decode(f.read(), counts))
        for name in sorted(os.listdir(self.fortunes_root)):
            full = os.path.join(self.fortunes_root, name)
            if "." in name or not os.path.isfile(full):  # NAME.dat indexes, NAME.u8 symlinks
                continue
            with open(full, "rb") as f:
                text = _decode(f.read(), counts)
            chunk, i = [], 0
            for entry in text.split("\n%\n"):
                entry = entry.strip("\n%")
                if not entry.strip():
                    continue
                chunk.append(entry)
                if sum(len(c) for c in chunk) >= TEXT_CHUNK_CHARS:
                    yield Document(f"fortune:{name}:{i}", "\n\n".join(chunk))
                    chunk, i = [], i + 1
            if chunk:
                yield Document(f"fortune:{name}:{i}", "\n\n".join(chunk))


# ---------------------------------------------------------------------------- open ----
def open_corpus(
    spec: str | None,
    *,
    text_field: str = "text",
    glob: str | None = None,
    heldout_percent: int = 5,
) -> Corpus:
    """Open a corpus from a `--corpus` spec (see the module docstring for the forms)."""
    if spec is None or spec == "default":
        return DefaultCorpus(None, heldout_percent)
    if spec == "default+docs":
        return DefaultDocsCorpus(heldout_percent)
    kind, path = None, spec
    head, sep, rest = spec.partition(":")
    if sep and head in KINDS:
        kind, path = head, rest
        if kind == "default":
            return DefaultCorpus(_existing(os.path.expanduser(path), spec), heldout_percent)
    path = _existing(os.path.expanduser(path), spec)
    if kind is None:
        kind = _detect(path)
    if kind == "text":
        if os.path.isdir(path):
            raise CorpusError(f"{path} is a directory; use dir:{path} or drop the text: prefix")
        if os.path.getsize(path) == 0:
            raise CorpusError(f"corpus file {path} is empty; point --corpus at text")
        return TextFileCorpus(path, heldout_percent)
    if kind == "dir":
        if not os.path.isdir(path):
            raise CorpusError(f"{path} is not a directory; drop the dir: prefix for a single file")
        return DirCorpus(path, heldout_percent, glob=glob)
    if kind == "jsonl":
        if os.path.isdir(path):
            raise CorpusError(f"{path} is a directory; jsonl: needs a .jsonl file")
        return JsonlCorpus(path, heldout_percent, text_field=text_field)
    if kind == "parquet":
        return ParquetCorpus(path, heldout_percent, text_field=text_field)
    assert kind == "hf"
    if not os.path.isdir(path):
        raise CorpusError(f"{path} is not a directory; hf: needs a datasets save_to_disk directory")
    return HFCorpus(path, heldout_percent, text_field=text_field)


def _existing(path: str, spec: str) -> str:
    if not path:
        raise CorpusError(f"corpus spec {spec!r} has no path after the prefix; write KIND:PATH")
    if not os.path.exists(path):
        raise CorpusError(
            f"corpus path {path} does not exist; pass a text file, a directory, a .jsonl or .parquet "
            "file, a datasets directory, or 'default'"
        )
    return path


def _detect(path: str) -> str:
    if os.path.isdir(path):
        if any(os.path.isfile(os.path.join(path, m)) for m in _HF_MARKERS):
            return "hf"
        return "dir"
    lower = path.lower()
    if lower.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    if lower.endswith(".parquet"):
        return "parquet"
    return "text"
