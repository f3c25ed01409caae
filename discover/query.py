"""Queries over a store: neurons by token congruence, one neuron, role candidates, raw SQL.

Every function takes an open `Store` and returns plain dicts / lists (JSON-ready), so the CLI
and notebooks share them.
"""

from __future__ import annotations

import json
from functools import lru_cache

import numpy as np

from discover.errors import QueryError, first_line
from discover.names import DENSE, Layout, layout_of
from discover.roles import ROLES
from discover.store import Store


def parse_neuron(text: str, layout: Layout = DENSE) -> tuple[int, int]:
    """'L3.N120' -> (3, 120); with a mixture-of-experts layout 'L3.E2.N17' / 'L3.S.N5' -> (3, index)."""
    return layout.parse(text)


def check_neuron(ckpt: dict, layer: int, neuron: int) -> None:
    """Raise QueryError (one line, in the model's own neuron names) unless the neuron exists."""
    if not (0 <= layer < ckpt["n_layers"] and 0 <= neuron < ckpt["d_mlp"]):
        layout = layout_of(ckpt)
        per_layer = (f"experts 0-{layout.experts - 1} of neurons 0-{layout.expert_size - 1}" if layout.moe
                     else f"neurons 0-{ckpt['d_mlp'] - 1}")
        raise QueryError(
            f"neuron {layout.name(layer, neuron)} is out of range: this model has layers "
            f"0-{ckpt['n_layers'] - 1} and {per_layer} per layer"
        )


@lru_cache(maxsize=8)
def stored_tokenizer(path: str) -> "StoredTokenizer":
    """The tokenizer a scan stored (`checkpoints/<id>/tokenizer`), cached per process."""
    return StoredTokenizer(path)


class StoredTokenizer:
    """A stored tokenizer read through the `tokenizers` library from its `tokenizer.json` (no torch,
    no transformers: a query stays fast); only a directory without that file (a slow tokenizer)
    falls back to transformers. `encode` gives the ids of `AutoTokenizer.encode(text,
    add_special_tokens=False)` (tested against it)."""

    def __init__(self, path: str):
        from pathlib import Path

        p = Path(path)
        cfg = {}
        if (p / "tokenizer_config.json").is_file():
            cfg = json.loads((p / "tokenizer_config.json").read_text(encoding="utf-8"))
        if (p / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            self._fast = Tokenizer.from_file(str(p / "tokenizer.json"))
            unk = cfg.get("unk_token")
            unk = unk.get("content") if isinstance(unk, dict) else unk
            if unk is None:  # else the model section's own unknown token (BPE, WordPiece, Unigram by id)
                model = json.loads((p / "tokenizer.json").read_text(encoding="utf-8")).get("model", {})
                unk = model.get("unk_token")
                if unk is None and isinstance(model.get("unk_id"), int) and model.get("vocab"):
                    unk = model["vocab"][model["unk_id"]][0]
            self.unk_token = unk
            self.unk_token_id = self._fast.token_to_id(unk) if unk is not None else None
        else:
            from transformers import AutoTokenizer

            self._fast = None
            self._slow = AutoTokenizer.from_pretrained(str(p))
            self.unk_token, self.unk_token_id = self._slow.unk_token, self._slow.unk_token_id

    def encode(self, text: str) -> list[int]:
        if self._fast is not None:
            return self._fast.encode(text, add_special_tokens=False).ids
        return self._slow.encode(text, add_special_tokens=False)


def tokenize(store: Store, ckpt: dict, text: str) -> list[tuple[int, str]]:
    """How the checkpoint's tokenizer splits `text`: [(id, token string), ...]."""
    if text is None or text == "":
        raise QueryError("token text is empty; give the token's text (e.g. \" an\") or --token-id")
    tdir = store.files_dir(ckpt) / "tokenizer"
    if not tdir.is_dir():
        raise QueryError("no tokenizer was stored for this checkpoint; use --token-id instead")
    adir = str(store.files_dir(ckpt) / "arrays")
    single = _single_tokens(adir)
    if text in single:  # the tokenizer's own split of this text, recorded (and checked) at scan time
        ids = [single[text]]
    else:
        tok = stored_tokenizer(str(tdir))
        ids = tok.encode(text)
        if not ids:
            raise QueryError(f"{text!r} tokenizes to nothing; give other text or --token-id")
        unk = tok.unk_token_id
        if unk is not None and unk in ids and text.strip() != tok.unk_token:
            raise QueryError(
                f"{text!r} is not in the vocabulary (the tokenizer maps it to its unknown token "
                f"{tok.unk_token!r}); give other text or --token-id"
            )
    strings = _arrays(adir)["tokens"]
    return [(i, strings[i] if i < len(strings) else f"<unknown:{i}>") for i in ids]


@lru_cache(maxsize=4)
def _single_tokens(adir: str) -> dict:
    """{text: id} of the texts that are exactly one token (store._write_arrays); {} for older scans."""
    from pathlib import Path

    p = Path(adir) / "single_tokens.json"
    return json.loads(p.read_text(encoding="utf-8")) if p.exists() else {}


@lru_cache(maxsize=4)
def _arrays(adir: str) -> dict:
    """The checkpoint's memory-mapped query arrays (see store._write_arrays), cached per process."""
    from pathlib import Path

    p = Path(adir)
    if not (p / "token_neurons.npy").exists():
        raise QueryError(f"the query arrays of this checkpoint are missing ({p}); rescan it with --force")
    out = {name: np.load(p / f"{name}.npy", mmap_mode="r")
           for name in ("token_neurons", "token_congruence", "neuron_tokens", "neuron_stats")}
    out["tokens"] = json.loads((p / "tokens.json").read_text())
    return out


@lru_cache(maxsize=4)
def _primary_roles(adir: str, thresholds: str, d_model: int) -> np.ndarray:
    """Each neuron's primary role under the checkpoint's current thresholds (cached)."""
    from dataclasses import fields

    from discover.roles import RoleThresholds, assign_roles
    from discover.store import ARRAY_STATS

    arr = _arrays(adir)["neuron_stats"]
    stats = {c: np.asarray(arr[:, i]) for i, c in enumerate(ARRAY_STATS)}
    t = json.loads(thresholds)
    _, primary = assign_roles(stats, d_model, RoleThresholds(**{f.name: t[f.name] for f in fields(RoleThresholds)}))
    return primary


def query_token(store: Store, model: str, text: str | None = None, *, token_id: int | None = None,
                top: int = 20, negative: bool = False, n_top_tokens: int = 5) -> dict:
    """Neurons ranked by congruence `w_out . U[:, t]` with one token (exact, from the scan).

    Reads the checkpoint's memory-mapped arrays: the same numbers as the catalog's
    `token_neurons` / `neuron_tokens` / `neurons` tables, in a few milliseconds."""
    ckpt = store.resolve_model(model)
    cid = ckpt["checkpoint_id"]
    adir = str(store.files_dir(ckpt) / "arrays")
    arrays = _arrays(adir)
    strings = arrays["tokens"]
    tokenization = None
    note = None
    if token_id is None:
        tokenization = tokenize(store, ckpt, text)
        token_id = tokenization[0][0]
        if len(tokenization) > 1:
            note = (f"{text!r} is {len(tokenization)} tokens "
                    f"{[t for _, t in tokenization]}; ranking by the first, {tokenization[0][1]!r} "
                    f"(id {token_id}); pass --token-id to choose another")
    if not 0 <= token_id < ckpt["d_vocab"]:
        raise QueryError(f"token id {token_id} is not in the vocabulary (0-{ckpt['d_vocab'] - 1})")
    depth = ckpt["scan_settings"]["token_top_k"]
    if top < 1:
        raise QueryError("--top must be at least 1")
    if top > depth:
        raise QueryError(
            f"--top {top} is deeper than the {depth} neurons per token this scan kept; "
            f"rescan with `discover scan MODEL --token-top-k {top}`"
        )
    sign = 1 if negative else 0
    gids = np.asarray(arrays["token_neurons"][sign, :top, token_id], dtype=np.int64)
    cong = np.asarray(arrays["token_congruence"][sign, :top, token_id])
    roles = _primary_roles(adir, json.dumps(ckpt["role_thresholds"], sort_keys=True), ckpt["d_model"])
    toks = np.asarray(arrays["neuron_tokens"][gids])  # (top, 2, k)
    stats = np.asarray(arrays["neuron_stats"][gids])
    n, layout = ckpt["d_mlp"], layout_of(ckpt)
    results = []
    for r, (g, c) in enumerate(zip(gids.tolist(), cong.tolist())):
        results.append({
            "rank": r + 1,
            "neuron": layout.name(g // n, g % n),
            "layer": g // n,
            "neuron_index": g % n,
            "congruence": float(c),
            "role": roles[g],
            "vocab_kurt": float(stats[r, 0]),
            "vocab_skew": float(stats[r, 1]),
            "top_tokens": [strings[i] for i in toks[r, 0, :n_top_tokens]],
            "bottom_tokens": [strings[i] for i in toks[r, 1, :n_top_tokens]],
        })
    return {
        "model": model,
        "checkpoint_id": cid,
        "token_id": int(token_id),
        "token": strings[token_id],
        "tokenization": [{"id": i, "token": t} for i, t in tokenization] if tokenization else None,
        "note": note,
        "negative": negative,
        "results": results,
    }


def query_neuron(store: Store, model: str, neuron: str, *, similar: bool = False, k_similar: int = 10,
                 examples: bool = False, kind: str = "activation", n_examples: int = 20) -> dict:
    """One neuron's statistics, roles and top/bottom tokens; `similar` adds nearest w_out;
    `examples` adds its corpus-pass statistics and max-activating examples (`activity`)."""
    ckpt = store.resolve_model(model)
    layout = layout_of(ckpt)
    layer, idx = parse_neuron(neuron, layout)
    check_neuron(ckpt, layer, idx)
    cid = ckpt["checkpoint_id"]
    cur = store.con.execute(
        "SELECT * EXCLUDE (checkpoint_id) FROM neurons WHERE checkpoint_id = ? AND layer = ? AND neuron = ?",
        [cid, layer, idx],
    )
    row = cur.fetchone()
    stats = {c[0]: v for c, v in zip(cur.description, row)}
    roles = [
        {"role": r, "score": s}
        for r, s in store.con.execute(
            "SELECT role, score FROM roles WHERE checkpoint_id = ? AND layer = ? AND neuron = ? ORDER BY role",
            [cid, layer, idx],
        ).fetchall()
    ]
    tokens = {"top": [], "bottom": []}
    for side, tid, tok, cong, cos in store.con.execute(
        "SELECT side, token_id, token, congruence, cosine FROM neuron_tokens WHERE checkpoint_id = ? "
        "AND layer = ? AND neuron = ? ORDER BY side DESC, rank",
        [cid, layer, idx],
    ).fetchall():
        tokens[side].append({"token_id": tid, "token": tok, "congruence": float(cong), "cosine": float(cos)})
    out = {
        "model": model,
        "checkpoint_id": cid,
        "neuron": layout.name(layer, idx),
        "layer": layer,
        "neuron_index": idx,
        "stats": {k: (None if v is None or (isinstance(v, float) and np.isnan(v)) else v)
                  for k, v in stats.items() if k not in ("layer", "neuron")},
        "roles": roles,
        "top_tokens": tokens["top"],
        "bottom_tokens": tokens["bottom"],
    }
    if similar:
        out["similar"] = similar_neurons(store, ckpt, layer, idx, k=k_similar)
    if examples:
        out["activity"] = neuron_activity(store, ckpt, layer, idx, kind=kind, limit=n_examples)
    return out


def _load_index(store: Store, ckpt: dict):
    import faiss

    path = store.files_dir(ckpt) / "w_out.faiss"
    if not path.exists():
        raise QueryError(f"the FAISS index of checkpoint {ckpt['checkpoint_id'][:12]} is missing ({path}); rescan it")
    return faiss.read_index(str(path))


def similar_neurons(store: Store, ckpt: dict, layer: int, neuron: int, *, k: int = 10) -> list[dict]:
    """Nearest neurons by cosine of (processed) w_out: in this checkpoint, across layers, and in
    every other scanned checkpoint with the same d_model and vocabulary."""
    if k < 1:
        raise QueryError("--k (number of similar neurons) must be at least 1")
    n = ckpt["d_mlp"]
    index = _load_index(store, ckpt)
    q = index.reconstruct(layer * n + neuron).reshape(1, -1).astype(np.float32)
    others = [
        c for c in store.checkpoints()
        if c["checkpoint_id"] != ckpt["checkpoint_id"]
        and c["d_model"] == ckpt["d_model"] and c["vocab_hash"] == ckpt["vocab_hash"]
    ]
    specs = dict(store.con.execute(
        "SELECT checkpoint_id, arg_max(spec, seen_at) FROM models GROUP BY checkpoint_id").fetchall())
    out = []
    for c, idx in [(ckpt, index)] + [(c, None) for c in others]:
        idx = idx if idx is not None else _load_index(store, c)
        kk = min(k + (1 if c is ckpt else 0), idx.ntotal)
        D, I = idx.search(q, kk)
        cn = c["d_mlp"]
        for d, i in zip(D[0], I[0]):
            if i < 0 or (c is ckpt and i == layer * n + neuron):
                continue
            out.append({
                "checkpoint_id": c["checkpoint_id"],
                "model": specs.get(c["checkpoint_id"]),
                "same_checkpoint": c is ckpt,
                "neuron": layout_of(c).name(int(i // cn), int(i % cn)),
                "layer": int(i // cn),
                "neuron_index": int(i % cn),
                "cosine": float(d),
            })
    out.sort(key=lambda r: -r["cosine"])
    return out


def query_roles(store: Store, model: str, role: str, *, top: int = 50) -> list[dict]:
    """Candidates for one role, strongest first."""
    if role not in ROLES:
        raise QueryError(f"unknown role '{role}'; choose one of: {', '.join(ROLES)}")
    if top < 1:
        raise QueryError("--top must be at least 1")
    ckpt = store.resolve_model(model)
    cid = ckpt["checkpoint_id"]
    rows = store.con.execute(
        "SELECT r.layer, r.neuron, r.score, n.vocab_kurt, n.vocab_skew, n.vocab_var, n.w_out_norm, n.cos_in_out "
        "FROM roles r JOIN neurons n USING (checkpoint_id, layer, neuron) "
        "WHERE r.checkpoint_id = ? AND r.role = ? ORDER BY r.score DESC, r.layer, r.neuron LIMIT ?",
        [cid, role, top],
    ).fetchall()
    arrays = _arrays(str(store.files_dir(ckpt) / "arrays"))
    strings, n, layout = arrays["tokens"], ckpt["d_mlp"], layout_of(ckpt)
    toks = np.asarray(arrays["neuron_tokens"][[r[0] * n + r[1] for r in rows]]) if rows else None
    return [
        {
            "neuron": layout.name(r[0], r[1]), "layer": r[0], "neuron_index": r[1], "role": role,
            "score": float(r[2]), "vocab_kurt": float(r[3]), "vocab_skew": float(r[4]),
            "vocab_var": float(r[5]), "w_out_norm": float(r[6]), "cos_in_out": float(r[7]),
            "top_tokens": [strings[t] for t in toks[i, 0, :8]],
            "bottom_tokens": [strings[t] for t in toks[i, 1, :8]],
        }
        for i, r in enumerate(rows)
    ]


def run_sql(store: Store, query: str) -> tuple[list[str], list[tuple]]:
    """Run read-only SQL over the catalog: (column names, rows)."""
    import duckdb

    if not query.strip():
        raise QueryError("empty SQL; give a SELECT statement")
    if not store.read_only:
        raise QueryError("run_sql needs a store opened with read_only=True")
    try:
        # the catalog is opened read-only; also refuse reading or writing other files (COPY, ATTACH)
        store.con.execute("SET enable_external_access = false")
        cur = store.con.execute(query)
        if cur.description is None:
            return [], []
        return [c[0] for c in cur.description], cur.fetchall()
    except duckdb.Error as e:
        raise QueryError(f"SQL error: {first_line(e)}") from None


# ------------------------------------------------------------------ corpus pass (issue 4)
def latest_pass(store: Store, ckpt: dict) -> dict | None:
    """The checkpoint's most recently committed activation pass (None if it has none); a token
    study's own pass (settings purpose 'study') only when there is no other."""
    cur = store.con.execute(
        "SELECT * FROM activation_passes WHERE checkpoint_id = ? AND results_dir IS NOT NULL "
        "ORDER BY coalesce(json_extract_string(settings, '$.purpose'), 'corpus') = 'study', updated_at DESC, "
        "tokens DESC LIMIT 1", [ckpt["checkpoint_id"]])
    from discover.store import PASS_JSON, fetch_dict

    return fetch_dict(cur, PASS_JSON)


@lru_cache(maxsize=4)
def _example_arrays(rdir: str) -> dict:
    from pathlib import Path

    p = Path(rdir)
    if not (p / "examples_tokens.npy").exists():
        raise QueryError(f"the example arrays of this pass are missing ({p}); rerun `discover activations`")
    return {"tokens": np.load(p / "examples_tokens.npy", mmap_mode="r"),
            "values": np.load(p / "examples_values.npy", mmap_mode="r"),
            "meta": json.loads((p / "meta.json").read_text())}


def neuron_activity(store: Store, ckpt: dict, layer: int, neuron: int, *, kind: str = "activation",
                    limit: int = 20) -> dict:
    """Activation statistics and max-activating examples (with per-token values) of one neuron,
    from the checkpoint's latest corpus pass."""
    if kind not in ("activation", "dla"):
        raise QueryError(f"unknown example kind {kind!r}; use activation or dla")
    if limit < 1:
        raise QueryError("the number of examples (--examples-k) must be at least 1")
    p = latest_pass(store, ckpt)
    if p is None:
        raise QueryError(
            f"no corpus pass for checkpoint {ckpt['checkpoint_id'][:12]} in this store; "
            "run `discover activations MODEL` first")
    pid = p["pass_id"]
    cur = store.con.execute(
        "SELECT * EXCLUDE (pass_id, checkpoint_id, layer, neuron) FROM neuron_activations "
        "WHERE pass_id = ? AND layer = ? AND neuron = ?", [pid, layer, neuron])
    row = cur.fetchone()
    stats = {c[0]: (None if v is None or (isinstance(v, float) and np.isnan(v)) else v)
             for c, v in zip(cur.description, row)}
    rows = store.con.execute(
        "SELECT rank, value, doc_id, chunk, position, doc_token, token_id, token FROM activation_examples "
        "WHERE pass_id = ? AND layer = ? AND neuron = ? AND kind = ? ORDER BY rank LIMIT ?",
        [pid, layer, neuron, kind, limit]).fetchall()
    arr = _example_arrays(str(store.root / "activations" / p["files_dir"] / p["results_dir"]))
    g = layer * ckpt["d_mlp"] + neuron
    s = 0 if kind == "activation" else 1
    strings = _arrays(str(store.files_dir(ckpt) / "arrays"))["tokens"]
    before = arr["meta"]["before"]
    examples = []
    for rank, value, doc_id, chunk, pos, doc_tok, tid, tok in rows:
        ids = np.asarray(arr["tokens"][g, s, rank])
        vals = np.asarray(arr["values"][g, s, rank], dtype=np.float64)
        keep = np.flatnonzero(ids >= 0)
        examples.append({
            "rank": rank + 1, "value": float(value), "doc_id": doc_id, "chunk": chunk, "position": pos,
            "doc_token": doc_tok, "token_id": tid, "token": tok,
            "max_index": int(before - keep[0]),
            "tokens": [{"token_id": int(ids[i]), "token": strings[ids[i]],
                        "value": None if np.isnan(vals[i]) else float(vals[i])} for i in keep],
        })
    curves = store.con.execute(
        "SELECT token_id, token, source, lo, hi, positions, top_prediction, with_next, is_next FROM prediction_curves "
        "WHERE pass_id = ? AND layer = ? AND neuron = ? ORDER BY token_id, bin", [pid, layer, neuron]).fetchall()
    by_tok: dict = {}
    for tid, tok, src, lo, hi, n, top, wn, nx in curves:
        c = by_tok.setdefault(tid, {"token_id": tid, "token": tok, "source": src, "bins": []})
        c["bins"].append({"lo": lo, "hi": hi, "positions": n, "top_prediction": top,
                          "frac_top_prediction": top / n, "with_next": wn, "is_next": nx})
    return {"pass_id": pid, "tokens": p["tokens"], "corpus": p["corpus"], "split": p["split"], "kind": kind,
            "stats": stats, "examples": examples, "curves": list(by_tok.values())}
