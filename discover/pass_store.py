"""The corpus pass in the catalog: its row in `activation_passes` and its results (written by
the process that owns the catalog: one run, or a cluster's driver).

`write_results` commits a pass's current state: per-neuron moments, histograms, prediction
curves and the top-k examples (sorted by value, ties by document order), arrays first
(unreferenced until the commit), then one transaction.
"""

from __future__ import annotations

import json
import shutil
import uuid

import numpy as np

from discover import _act_kernels as K

CURVE_FIELDS = ("positions", "top_prediction", "with_next", "is_next")
EXAMPLE_BLOCK = 4096  # neurons whose examples are sorted, written and inserted at once


def pass_row(store, checkpoint_id: str, pass_key: str) -> dict | None:
    from discover.store import PASS_JSON, fetch_dict

    cur = store.con.execute("SELECT * FROM activation_passes WHERE checkpoint_id = ? AND pass_key = ?",
                            [checkpoint_id, pass_key])
    return fetch_dict(cur, PASS_JSON)


def create_pass(store, checkpoint_id, pass_key, described, split, settings) -> dict:
    from discover import __version__

    pass_id = uuid.uuid4().hex[:12]
    store.con.execute(
        "INSERT INTO activation_passes VALUES (?, ?, ?, ?, ?, ?, ?, 0, 0, 0, false, ?, NULL, now(), now(), 0, ?)",
        [pass_id, checkpoint_id, pass_key, described["fingerprint"], json.dumps(described), split,
         json.dumps(settings), pass_id, __version__])
    return pass_row(store, checkpoint_id, pass_key)


RESULT_TABLES = ("neuron_activations", "activation_examples", "activation_histograms", "prediction_curves")


def write_results(store, row: dict, state, runner, *, seconds: float, progress: bool = False) -> None:
    """Commit the pass's current results: arrays first (unreferenced), then one transaction."""
    import pyarrow as pa
    from tqdm import tqdm

    from discover.store import insert_arrow, transaction

    view = runner.view
    L, N, k = runner.L, runner.N, runner.cfg.top_k
    pid, cid = row["pass_id"], row["checkpoint_id"]
    pdir = store.root / "activations" / row["files_dir"]
    rdir_name = f"results-{uuid.uuid4().hex[:8]}"
    rdir = pdir / rdir_name
    rdir.mkdir()
    a = state.a
    strings = view.token_strings()
    str_arr = pa.array(strings + [""], type=pa.string())  # the last entry: window slots outside the piece
    edges = K.bin_edges()
    body = runner.context - (1 if settings_bos(row) is not None else 0)
    start = 1 if settings_bos(row) is not None else 0
    names = state.meta["doc_names"]
    consts = {"pass_id": pid, "checkpoint_id": cid}

    def examples_block(g0: int, g1: int):
        """Neurons g0..g1 (global ids): their examples sorted by value (rank 0 = strongest; ties by
        document order; empty slots last) as arrays (g, 2, k, W) and as catalog rows."""
        rows = g1 - g0
        tok = np.empty((rows, 2, k, runner.width), np.int32)
        val = np.empty((rows, 2, k, runner.width), np.float16)
        tables = []
        for s, (p, kind) in enumerate((("a", "activation"), ("d", "dla"))):
            def part(name):  # this block's rows of a state array (L, N, k, ...)
                x = a[name].reshape(L * N, k, *a[name].shape[3:])
                return x[g0:g1]
            vals, docs = part(f"{p}v"), part(f"{p}doc")
            order = np.lexsort((np.where(docs >= 0, docs, np.iinfo(np.int64).max), -vals.astype(np.float64)), axis=1)

            def take(x):
                return np.take_along_axis(x, order.reshape(rows, k, *([1] * (x.ndim - 2))), axis=1)

            vals, docs = take(vals), take(docs)
            pos, chunk = take(part(f"{p}pos")), take(part(f"{p}chunk"))
            tok[:, s] = take(part(f"{p}tok"))
            val[:, s] = take(part(f"{p}val"))
            g, r = np.nonzero(docs >= 0)
            win = tok[g, s, r]  # (E, W)
            mid = win[:, runner.cfg.before]
            nxt = take(part(f"{p}next"))[g, r]  # the true next token (known at a piece's end too; -1 at a document's)
            flat = np.where(win >= 0, win, len(strings)).ravel()
            text = pa.compute.binary_join(pa.ListArray.from_arrays(
                pa.array(np.arange(0, len(flat) + 1, runner.width, dtype=np.int32)), str_arr.take(pa.array(flat))), "")
            gg = g + g0
            tables.append(pa.table({
                "layer": (gg // N).astype(np.int16), "neuron": (gg % N).astype(np.int32),
                "kind": pa.repeat(pa.scalar(kind), len(g)), "rank": r.astype(np.int16),
                "value": vals[g, r].astype(np.float32),
                "doc_id": pa.array([names.get(str(d), str(d)) for d in docs[g, r].tolist()], type=pa.string()),
                "doc_ordinal": docs[g, r].astype(np.int64), "chunk": chunk[g, r].astype(np.int32),
                "position": pos[g, r].astype(np.int32),
                "doc_token": (chunk[g, r].astype(np.int64) * body + pos[g, r] - start).astype(np.int64),
                "token_id": mid.astype(np.int32), "token": str_arr.take(pa.array(np.where(mid >= 0, mid, len(strings)))),
                "next_token_id": np.where(nxt >= 0, nxt, -1).astype(np.int32),
                "context": text,
            }))
        return tok, val, pa.concat_tables(tables)

    try:
        hist = a["hist"].reshape(L * N, K.N_BINS)
        np.save(rdir / "histograms.npy", hist)
        (rdir / "meta.json").write_text(json.dumps({"tokens": state.meta["tokens"], "before": runner.cfg.before,
                                                    "after": runner.cfg.after, "edges": edges.tolist()}))
        mom = state.moments()
        layer_col = np.repeat(np.arange(L, dtype=np.int16), N)
        neuron_col = np.tile(np.arange(N, dtype=np.int32), L)
        acts = pa.table({"layer": layer_col, "neuron": neuron_col,
                         **{c: pa.array(v.ravel(), mask=~np.isfinite(v.ravel())) for c, v in mom.items()}})
        gi, bi = np.nonzero(hist)
        hists = pa.table({"layer": (gi // N).astype(np.int16), "neuron": (gi % N).astype(np.int32),
                          "bin": bi.astype(np.int16), "lo": edges[bi], "hi": edges[bi + 1],
                          "count": hist[gi, bi].astype(np.int64)})
        curves = _curves_table(runner.pairs, a["curves"], edges, str_arr)
        shape = (L * N, 2, k, runner.width)
        with transaction(store.con) as con, NpyWriter(rdir / "examples_tokens.npy", shape, np.int32) as ex_tok, \
                NpyWriter(rdir / "examples_values.npy", shape, np.float16) as ex_val:
            for t in RESULT_TABLES:
                con.execute(f"DELETE FROM {t} WHERE pass_id = ?", [pid])
            for name, tbl in (("neuron_activations", acts), ("activation_histograms", hists),
                              ("prediction_curves", curves)):
                insert_arrow(con, name, tbl, consts)
            # examples a block of neurons at a time: memory bounded by the block, not the model
            for g0 in tqdm(range(0, L * N, EXAMPLE_BLOCK), desc="writing results", unit="block",
                           disable=not progress or L * N <= EXAMPLE_BLOCK, leave=False):
                tok, val, tbl = examples_block(g0, min(L * N, g0 + EXAMPLE_BLOCK))
                ex_tok.write(tok)
                ex_val.write(val)
                insert_arrow(con, "activation_examples", tbl, consts)
                del tok, val, tbl
            con.execute(
                "UPDATE activation_passes SET tokens = ?, sequences = ?, documents = ?, exhausted = ?, "
                "results_dir = ?, updated_at = now(), seconds = ? WHERE pass_id = ?",
                [state.meta["tokens"], state.meta["sequences"], state.meta["documents"], state.meta["exhausted"],
                 rdir_name, seconds, pid])
    except BaseException:
        shutil.rmtree(rdir, ignore_errors=True)
        raise
    old = row.get("results_dir")
    if old and old != rdir_name:
        shutil.rmtree(pdir / old, ignore_errors=True)
    row.update(pass_row(store, cid, row["pass_key"]))


class NpyWriter:
    """A .npy file of a known shape written front to back in blocks of leading rows (readers map
    it with np.load(mmap_mode='r')); complete only when every row was written (checked on close)."""

    def __init__(self, path, shape: tuple, dtype):
        self.path, self.shape, self.dtype = path, shape, np.dtype(dtype)
        self.rows = 0

    def __enter__(self):
        self.f = open(self.path, "wb")
        np.lib.format.write_array_header_1_0(self.f, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                      "fortran_order": False, "shape": self.shape})
        return self

    def write(self, block: np.ndarray) -> None:
        assert block.shape[1:] == self.shape[1:] and block.dtype == self.dtype
        self.f.write(np.ascontiguousarray(block).tobytes())
        self.rows += block.shape[0]

    def __exit__(self, exc_type, *exc):
        self.f.close()
        if exc_type is None and self.rows != self.shape[0]:
            raise RuntimeError(f"{self.path}: {self.rows} of {self.shape[0]} rows written")


def settings_bos(row: dict):
    return row["settings"].get("bos")


def _curves_table(pairs, curves, edges, str_arr):
    import pyarrow as pa

    P = len(pairs)
    pi, bi = np.nonzero(curves[:, :, 0]) if P else (np.zeros(0, np.int64), np.zeros(0, np.int64))
    layer = np.array([p[0] for p in pairs], np.int16)[pi] if P else np.zeros(0, np.int16)
    neuron = np.array([p[1] for p in pairs], np.int32)[pi] if P else np.zeros(0, np.int32)
    tok = np.array([p[2] for p in pairs], np.int32)[pi] if P else np.zeros(0, np.int32)
    src = [pairs[i][3] for i in pi.tolist()]
    return pa.table({
        "layer": layer, "neuron": neuron, "token_id": tok, "token": str_arr.take(pa.array(tok)),
        "source": pa.array(src, type=pa.string()), "bin": bi.astype(np.int16), "lo": edges[bi], "hi": edges[bi + 1],
        **{f: curves[pi, bi, i].astype(np.int64) for i, f in enumerate(CURVE_FIELDS)},
    })
