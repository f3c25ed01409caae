"""Neuron tracking through training: which neuron of a checkpoint is which neuron of the previous one,
and what changed between them.

Matching (METHODS.md, "Across checkpoints and seeds"): within each layer, every neuron of the new
checkpoint is matched to the previous checkpoint's neuron with the largest mean of the two cosines
`(cos(w_out, w_out') + cos(w_in, w_in')) / 2` (processed weights, as scanned), found with a FAISS
inner-product search over the concatenated unit vectors `[w_in, w_out] / sqrt(2)`. The reverse
search says whether the match is mutual. Scans made before `w_in.npy` was stored match by `w_out`
alone (the rows say so: `cos_in` is NULL).

Changes recorded for each matched pair (table `neuron_changes`):
  role_gained / role_lost      a scanner role the neuron has now and its partner had not (or back);
  verdict_confirmed / verdict_lost
                               a hypothesis (kind + subject) confirmed now and not for the partner,
                               or confirmed for the partner and not now (`detail` says what it was);
  moved                        the neurons whose statistics moved most: per statistic, the change
                               minus the median change of the layer's neurons (the common drift), divided
                               by that statistic's spread over the new checkpoint's neurons
                               (kurtosis on a log scale); the `TOP_MOVED` largest, with old and new.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: statistics compared across checkpoints: (table, column, log scale)
MOVED_STATS = (
    ("neurons", "vocab_kurt", True), ("neurons", "vocab_skew", False), ("neurons", "vocab_var", False),
    ("neurons", "w_out_norm", False), ("neuron_activations", "act_mean", False),
    ("neuron_activations", "act_freq", False), ("neuron_activations", "act_max", False),
    ("neuron_activations", "act_kurt", True),
)
TOP_MOVED = 50
MOVED_MIN = 0.5  # "moved" rows need a change of at least half the statistic's spread
CHANGE_KINDS = ("role_gained", "role_lost", "verdict_confirmed", "verdict_lost", "moved")


@dataclass
class Matches:
    """Per global neuron (layer * d_mlp + neuron) of the new checkpoint: its partner in the previous one."""

    n_layers: int
    d_mlp: int
    partner: np.ndarray  # (N,) int64, neuron index within the same layer
    similarity: np.ndarray  # (N,) float64, (cos_out + cos_in) / 2, or cos_out alone
    cos_out: np.ndarray
    cos_in: np.ndarray | None
    mutual: np.ndarray  # (N,) bool


def unit_vectors(store, ckpt: dict) -> tuple[np.ndarray, np.ndarray | None]:
    """(w_out, w_in) unit vectors of every neuron of a scanned checkpoint, rows by global id (float32)."""
    import faiss

    fdir = store.files_dir(ckpt)
    idx = faiss.read_index(str(fdir / "w_out.faiss"))
    flat = faiss.downcast_index(idx.index)
    w_out = flat.reconstruct_n(0, flat.ntotal)
    ids = faiss.vector_to_array(idx.id_map)
    out = np.empty_like(w_out)
    out[ids] = w_out
    w_in_path = fdir / "w_in.npy"
    w_in = None
    if w_in_path.exists():  # stored as float16: renormalise the rounded rows
        w_in = np.load(w_in_path).astype(np.float32)
        norms = np.linalg.norm(w_in, axis=1, keepdims=True)
        w_in /= np.where(norms > 0, norms, 1.0)
    return out, w_in


def comparable(new: dict, prev: dict) -> str | None:
    """Why two checkpoints cannot be matched neuron to neuron (None: they can)."""
    for k in ("n_layers", "d_mlp", "d_model"):
        if new[k] != prev[k]:
            return f"{k} differs ({prev[k]} -> {new[k]})"
    return None


def match(store, new: dict, prev: dict) -> Matches:
    """Match every neuron of `new` to a neuron of `prev` in the same layer (FAISS, exact inner product)."""
    import faiss

    L, n = new["n_layers"], new["d_mlp"]
    a_out, a_in = unit_vectors(store, new)
    b_out, b_in = unit_vectors(store, prev)
    use_in = a_in is not None and b_in is not None
    N = L * n
    partner = np.empty(N, np.int64)
    mutual = np.empty(N, bool)
    for layer in range(L):
        s = slice(layer * n, (layer + 1) * n)
        if use_in:
            a = np.ascontiguousarray(np.hstack([a_in[s], a_out[s]]) / np.sqrt(2.0), dtype=np.float32)
            b = np.ascontiguousarray(np.hstack([b_in[s], b_out[s]]) / np.sqrt(2.0), dtype=np.float32)
        else:
            a, b = np.ascontiguousarray(a_out[s]), np.ascontiguousarray(b_out[s])
        fwd, back = faiss.IndexFlatIP(a.shape[1]), faiss.IndexFlatIP(a.shape[1])
        fwd.add(b)
        back.add(a)
        _, i_ab = fwd.search(a, 1)
        _, i_ba = back.search(b, 1)
        partner[s] = i_ab[:, 0]
        mutual[s] = i_ba[i_ab[:, 0], 0] == np.arange(n)
    gp = np.repeat(np.arange(L, dtype=np.int64) * n, n) + partner
    # cosines recomputed in float64 from the stored vectors (FAISS scores are float32)
    cos_out = np.einsum("ij,ij->i", a_out.astype(np.float64), b_out[gp].astype(np.float64))
    cos_in = np.einsum("ij,ij->i", a_in.astype(np.float64), b_in[gp].astype(np.float64)) if use_in else None
    sim = (cos_out + cos_in) / 2 if use_in else cos_out.copy()
    return Matches(L, n, partner, sim, cos_out, cos_in, mutual)


def _stats(store, ckpt_id: str, pass_id: str | None) -> dict[str, np.ndarray]:
    """Every MOVED_STATS column by global neuron id (NaN where missing)."""
    ck = store.con.execute("SELECT n_layers, d_mlp FROM checkpoints WHERE checkpoint_id = ?", [ckpt_id]).fetchone()
    L, n = ck
    out = {}
    for table, col, _log in MOVED_STATS:
        arr = np.full(L * n, np.nan)
        if table == "neurons":
            rows = store.con.execute(f"SELECT layer, neuron, {col} FROM neurons WHERE checkpoint_id = ?",
                                     [ckpt_id]).fetchnumpy()
        elif pass_id is not None:
            rows = store.con.execute(f"SELECT layer, neuron, {col} FROM neuron_activations WHERE pass_id = ?",
                                     [pass_id]).fetchnumpy()
        else:
            rows = None
        if rows is not None and len(rows["layer"]):
            g = np.asarray(rows["layer"], np.int64) * n + np.asarray(rows["neuron"], np.int64)
            arr[g] = np.asarray(rows[col], dtype=np.float64)
        out[col] = arr
    return out


def _roles(store, ckpt_id: str, n: int) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    for layer, neuron, role, score in store.con.execute(
            "SELECT layer, neuron, role, score FROM roles WHERE checkpoint_id = ?", [ckpt_id]).fetchall():
        out.setdefault(layer * n + neuron, {})[role] = score
    return out


def _verdicts(store, verify_id: str | None, n: int) -> dict[tuple, str]:
    """(global id, kind, subject) -> verdict of one verify run."""
    if verify_id is None:
        return {}
    rows = store.con.execute("SELECT layer, neuron, kind, subject, verdict FROM hypotheses WHERE verify_id = ?",
                             [verify_id]).fetchall()
    return {(layer * n + neuron, kind, subject): verdict for layer, neuron, kind, subject, verdict in rows}


def changes(store, new: dict, prev: dict, m: Matches, *, new_verify: str | None, prev_verify: str | None,
            new_pass: str | None, prev_pass: str | None):
    """Arrow tables (neuron_matches, neuron_changes) for `new` against `prev`, and counts per change kind."""
    import pyarrow as pa

    n, N = m.d_mlp, m.n_layers * m.d_mlp
    ids = (new["checkpoint_id"], prev["checkpoint_id"])
    layer = np.repeat(np.arange(m.n_layers, dtype=np.int16), n)
    matches = pa.table({
        "checkpoint_id": pa.repeat(pa.scalar(ids[0]), N), "prev_checkpoint_id": pa.repeat(pa.scalar(ids[1]), N),
        "layer": layer, "neuron": np.tile(np.arange(n, dtype=np.int32), m.n_layers),
        "prev_neuron": m.partner.astype(np.int32), "similarity": m.similarity, "cos_out": m.cos_out,
        "cos_in": pa.array(m.cos_in if m.cos_in is not None else np.full(N, np.nan),
                           mask=None if m.cos_in is not None else np.ones(N, bool)),
        "mutual": m.mutual,
    })
    gp = np.repeat(np.arange(m.n_layers, dtype=np.int64) * n, n) + m.partner  # partner's global id
    rows: list[tuple] = []  # (global id, partner global id, change, subject, old, new, score, detail)

    # roles gained and lost
    r_new, r_old = _roles(store, ids[0], n), _roles(store, ids[1], n)
    for g in range(N):
        now, before = r_new.get(g, {}), r_old.get(int(gp[g]), {})
        for role in now.keys() - before.keys():
            rows.append((g, int(gp[g]), "role_gained", role, None, now[role], now[role], None))
        for role in before.keys() - now.keys():
            rows.append((g, int(gp[g]), "role_lost", role, before[role], None, before[role], None))

    # verdicts newly confirmed or lost
    v_new, v_old = _verdicts(store, new_verify, n), _verdicts(store, prev_verify, n)
    for (g, kind, subject), verdict in v_new.items():
        if verdict == "confirmed":
            was = v_old.get((int(gp[g]), kind, subject))
            if was != "confirmed":
                rows.append((g, int(gp[g]), "verdict_confirmed", f"{kind}: {subject}", None, None,
                             float(m.similarity[g]), f"partner was {was or 'not tested'}"))
    best_child: dict[int, int] = {}  # previous neuron -> its most similar new neuron
    for g in np.argsort(-m.similarity, kind="stable"):
        best_child.setdefault(int(gp[g]), int(g))
    for (p, kind, subject), verdict in v_old.items():
        if verdict != "confirmed":
            continue
        g = best_child.get(p)
        now = v_new.get((g, kind, subject)) if g is not None else None
        if now != "confirmed":
            rows.append((g, p, "verdict_lost", f"{kind}: {subject}", None, None,
                         float(m.similarity[g]) if g is not None else None,
                         (f"now {now}" if now else "not among this checkpoint's verified candidates")
                         if g is not None else "no neuron matches it now"))

    # the statistics that moved most
    s_new, s_old = _stats(store, ids[0], new_pass), _stats(store, ids[1], prev_pass)
    best = np.full(N, -1.0)
    which = np.full(N, -1)
    layer_of = np.repeat(np.arange(m.n_layers), n)
    for j, (_t, col, log) in enumerate(MOVED_STATS):
        a, b = s_new[col], s_old[col][gp]
        if log:
            with np.errstate(divide="ignore", invalid="ignore"):
                a, b = np.log(a), np.log(b)
        a = np.where(np.isfinite(a), a, np.nan)  # a zero kurtosis (w_out = 0) has no log: left out
        b = np.where(np.isfinite(b), b, np.nan)
        spread = np.nanstd(a) if np.isfinite(a).sum() > 1 else np.nan
        if not np.isfinite(spread) or spread == 0:
            continue
        d = a - b
        drift = np.zeros(N)
        for layer in range(m.n_layers):  # the common drift of each layer's neurons
            sel = layer_of == layer
            if np.isfinite(d[sel]).any():
                drift[sel] = np.nanmedian(d[sel])
        score = np.abs(d - drift) / spread
        score = np.where(np.isfinite(score), score, -1.0)
        upd = score > best
        best[upd], which[upd] = score[upd], j
    for g in np.argsort(-best, kind="stable")[:TOP_MOVED]:
        if best[g] < MOVED_MIN:
            break
        col = MOVED_STATS[which[g]][1]
        rows.append((int(g), int(gp[g]), "moved", col, float(s_old[col][gp[g]]), float(s_new[col][g]),
                     float(best[g]), None))

    def col(i, typ):
        return pa.array([r[i] for r in rows], type=typ)

    g_arr = [r[0] for r in rows]
    p_arr = [r[1] for r in rows]
    ch = pa.table({
        "checkpoint_id": pa.repeat(pa.scalar(ids[0]), len(rows)),
        "prev_checkpoint_id": pa.repeat(pa.scalar(ids[1]), len(rows)),
        "layer": pa.array([(p // n) for p in p_arr], type=pa.int16()),
        "neuron": pa.array([None if g is None else g % n for g in g_arr], type=pa.int32()),
        "prev_neuron": pa.array([p % n for p in p_arr], type=pa.int32()),
        "change": col(2, pa.string()), "subject": col(3, pa.string()),
        "old_value": col(4, pa.float64()), "new_value": col(5, pa.float64()), "score": col(6, pa.float64()),
        "detail": col(7, pa.string()),
    })
    counts = {k: sum(1 for r in rows if r[2] == k) for k in CHANGE_KINDS}
    return matches, ch, counts


def write(con, matches, ch, new_id: str, prev_id: str) -> None:
    """Replace the tracking rows of (new, prev) inside the caller's transaction."""
    from discover.store import insert_arrow

    forget(con, new_id, prev_id)
    insert_arrow(con, "neuron_matches", matches)
    insert_arrow(con, "neuron_changes", ch)


def forget(con, new_id: str, prev_id: str) -> None:
    """Delete the tracking rows of (new, prev) inside the caller's transaction."""
    for t in ("neuron_matches", "neuron_changes"):
        con.execute(f"DELETE FROM {t} WHERE checkpoint_id = ? AND prev_checkpoint_id = ?", [new_id, prev_id])


# ------------------------------------------------------------------------------ queries
def series_rows(store, run_dir: str) -> list[dict]:
    """The processed checkpoints under `run_dir` (a watched directory, or one series in it), in step order."""
    from discover.errors import QueryError

    root = str(Path(run_dir).expanduser().resolve())
    cur = store.con.execute(
        "SELECT * FROM watch_checkpoints WHERE status = 'done' AND (path = ? OR starts_with(path, ? || '/')) "
        "ORDER BY series, step NULLS LAST, path", [root, root])
    cols = [c[0] for c in cur.description]
    rows = [dict(zip(cols, r)) for r in cur.fetchall()]
    if not rows:
        raise QueryError(f"no checkpoint under {root} has been processed by `discover watch` into store "
                         f"{store.root}; run `discover watch {run_dir} --once` first")
    return rows


def query_changes(store, run_dir: str, *, top: int = 10) -> dict:
    """Per processed checkpoint under `run_dir`: what changed against the previous one."""
    return {"run_dir": run_dir, "checkpoints": [checkpoint_changes(store, r, top=top)
                                                for r in series_rows(store, run_dir)]}


def checkpoint_changes(store, r: dict, *, top: int = 10) -> dict:
    """What changed at one processed checkpoint (`r`: its watch_checkpoints row) against the previous one."""
    entry = {"path": r["path"], "series": r["series"], "step": r["step"], "checkpoint_id": r["checkpoint_id"],
             "prev_checkpoint_id": r["prev_checkpoint_id"], "report": r["report"], "counts": {}, "roles": {},
             "verdicts": [], "moved": [], "match": None}
    if not r["prev_checkpoint_id"]:
        return entry
    from discover.names import layout_of

    key = [r["checkpoint_id"], r["prev_checkpoint_id"]]
    layout = layout_of(store.checkpoint(r["checkpoint_id"]))
    entry["prev_step"] = (store.con.execute("SELECT step FROM watch_checkpoints WHERE checkpoint_id = ? AND "
                                            "series = ?", [key[1], r["series"]]).fetchone() or [None])[0]
    q = "FROM neuron_changes WHERE checkpoint_id = ? AND prev_checkpoint_id = ?"
    entry["counts"] = {k: 0 for k in CHANGE_KINDS} | dict(
        store.con.execute(f"SELECT change, count(*) {q} GROUP BY change", key).fetchall())
    for change, subject, c in store.con.execute(
            f"SELECT change, subject, count(*) {q} AND change LIKE 'role_%' GROUP BY ALL ORDER BY ALL", key).fetchall():
        entry["roles"].setdefault(subject, {"gained": 0, "lost": 0})[change[5:]] = c
    cur = store.con.execute(f"SELECT * {q} AND change LIKE 'verdict_%' ORDER BY change, layer, neuron", key)
    cols = [c[0] for c in cur.description]
    entry["verdicts"] = [_change_row(dict(zip(cols, v)), layout) for v in cur.fetchall()]
    cur = store.con.execute(f"SELECT * {q} AND change = 'moved' ORDER BY score DESC LIMIT ?", [*key, top])
    cols = [c[0] for c in cur.description]
    entry["moved"] = [_change_row(dict(zip(cols, v)), layout) for v in cur.fetchall()]
    entry["match"] = dict(zip(("similarity_median", "similarity_min", "mutual_fraction", "same_index"),
                              store.con.execute(
        "SELECT median(similarity), min(similarity), avg(mutual::INT), avg((neuron = prev_neuron)::INT) "
        "FROM neuron_matches WHERE checkpoint_id = ? AND prev_checkpoint_id = ?", key).fetchone()))
    return entry


def report_changes(store, checkpoint_id: str, *, top: int = 10) -> dict | None:
    """The report's "changes" section: this checkpoint's changes and role counts along its run."""
    cur = store.con.execute("SELECT * FROM watch_checkpoints WHERE checkpoint_id = ? AND status = 'done' "
                            "ORDER BY processed_at DESC LIMIT 1", [checkpoint_id])
    row = cur.fetchone()
    if row is None:
        return None
    r = dict(zip([c[0] for c in cur.description], row))
    cur = store.con.execute("SELECT * FROM watch_checkpoints WHERE series = ? AND status = 'done' "
                            "ORDER BY step NULLS LAST, path", [r["series"]])
    cols = [c[0] for c in cur.description]
    series = [dict(zip(cols, x)) for x in cur.fetchall()]
    return {**checkpoint_changes(store, r, top=top), "along_run": role_counts_by_step(store, series)}


def _change_row(r: dict, layout) -> dict:
    r = {k: v for k, v in r.items() if k not in ("checkpoint_id", "prev_checkpoint_id")}
    r["neuron_name"] = None if r["neuron"] is None else layout.name(r["layer"], r["neuron"])
    r["prev_name"] = layout.name(r["layer"], r["prev_neuron"])
    return r


def neuron_history(store, run_dir: str, name: str, *, at: int | None = None) -> dict:
    """Follow one neuron (its name, e.g. L3.N120 or L3.E2.N17) through the checkpoints of one
    series: back through its matches from the checkpoint at step `at` (default: the newest), and
    forward through the best match of each step."""
    from discover.errors import QueryError
    from discover.names import layout_of
    from discover.query import check_neuron

    rows = series_rows(store, run_dir)
    series = {r["series"] for r in rows}
    if len(series) > 1:
        raise QueryError(f"{run_dir} holds {len(series)} training runs ({', '.join(sorted(series)[:4])}...); "
                         "pass one of them as --model")
    if at is None:
        s = len(rows) - 1
    else:
        hits = [i for i, r in enumerate(rows) if r["step"] == at]
        if not hits:
            raise QueryError(f"no processed checkpoint at step {at} under {run_dir}; steps: "
                             + ", ".join(str(r["step"]) for r in rows))
        s = hits[0]
    start = store.checkpoint(rows[s]["checkpoint_id"])
    layout = layout_of(start)
    layer, neuron = layout.parse(name)
    check_neuron(start, layer, neuron)
    by_id = {r["checkpoint_id"]: j for j, r in enumerate(rows)}
    chain: dict[int, tuple[int, float | None]] = {s: (neuron, None)}
    j, cur = s, neuron
    while rows[j]["prev_checkpoint_id"] in by_id:  # backwards: along each checkpoint's tracked predecessor
        p = by_id[rows[j]["prev_checkpoint_id"]]
        hit = store.con.execute(
            "SELECT prev_neuron, similarity FROM neuron_matches WHERE checkpoint_id = ? AND prev_checkpoint_id = ? "
            "AND layer = ? AND neuron = ?", [rows[j]["checkpoint_id"], rows[p]["checkpoint_id"], layer, cur]
        ).fetchone()
        if hit is None or p in chain:
            break
        chain[j] = (cur, hit[1])
        j, cur = p, hit[0]
        chain[j] = (cur, None)
    j, cur = s, neuron
    while True:  # forwards: the checkpoint tracked against this one, and the neuron matching it best
        nxt = [k for k, r in enumerate(rows) if r["prev_checkpoint_id"] == rows[j]["checkpoint_id"] and k not in chain]
        if not nxt:
            break
        k = nxt[0]
        hit = store.con.execute(
            "SELECT neuron, similarity FROM neuron_matches WHERE checkpoint_id = ? AND prev_checkpoint_id = ? "
            "AND layer = ? AND prev_neuron = ? ORDER BY similarity DESC, neuron LIMIT 1",
            [rows[k]["checkpoint_id"], rows[j]["checkpoint_id"], layer, cur]).fetchone()
        if hit is None:
            break
        j, cur = k, hit[0]
        chain[j] = (cur, hit[1])
    points = []
    for j in sorted(chain):
        r, (nid, sim) = rows[j], chain[j]
        ck = r["checkpoint_id"]
        st = store.con.execute(
            "SELECT role, vocab_kurt, vocab_skew, w_out_norm FROM neurons WHERE checkpoint_id = ? AND layer = ? "
            "AND neuron = ?", [ck, layer, nid]).fetchone()
        act = store.con.execute(
            "SELECT act_mean, act_freq, act_max FROM neuron_activations WHERE pass_id = ? AND layer = ? AND "
            "neuron = ?", [r["pass_id"], layer, nid]).fetchone() if r["pass_id"] else None
        confirmed = [f"{k}: {s_}" for k, s_ in store.con.execute(
            "SELECT kind, subject FROM hypotheses WHERE verify_id = ? AND layer = ? AND neuron = ? AND "
            "verdict = 'confirmed' ORDER BY kind, subject", [r["verify_id"], layer, nid]).fetchall()]
        roles = [x[0] for x in store.con.execute(
            "SELECT role FROM roles WHERE checkpoint_id = ? AND layer = ? AND neuron = ? ORDER BY role",
            [ck, layer, nid]).fetchall()]
        points.append({
            "step": r["step"], "path": r["path"], "checkpoint_id": ck, "neuron": layout.name(layer, nid),
            "similarity_to_previous": sim, "roles": roles, "role": st[0] if st else None,
            "vocab_kurt": st[1] if st else None, "vocab_skew": st[2] if st else None,
            "w_out_norm": st[3] if st else None,
            "act_mean": act[0] if act else None, "act_freq": act[1] if act else None,
            "act_max": act[2] if act else None, "confirmed": confirmed,
        })
    return {"run_dir": run_dir, "series": rows[0]["series"], "start": {"step": rows[s]["step"],
            "neuron": layout.name(layer, neuron)}, "history": points,
            "complete": len(points) == len(rows)}


def role_counts_by_step(store, series_rows_: list[dict]) -> dict:
    """{role: [count per checkpoint]} and the steps, for the report's plot across a run."""
    from discover.roles import ROLES

    per = {role: [0] * len(series_rows_) for role in ROLES}
    for i, r in enumerate(series_rows_):
        for role, c in store.con.execute("SELECT role, count(*) FROM roles WHERE checkpoint_id = ? GROUP BY role",
                                         [r["checkpoint_id"]]).fetchall():
            per.setdefault(role, [0] * len(series_rows_))[i] = int(c)
    return {"steps": [r["step"] for r in series_rows_], "labels": [Path(r["path"]).name for r in series_rows_],
            "roles": per}

