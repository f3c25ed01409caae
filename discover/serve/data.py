"""What the server's pages and API read, assembled from the query library: search across every
checkpoint of a store, a neuron with everything known about it, paged listings, token studies.
Each function takes a read-only `Store` handle and returns plain JSON-able dictionaries."""

from __future__ import annotations

import json

from discover.errors import NotFound, QueryError


def models(store) -> list[dict]:
    """Every scanned checkpoint, newest first, with the names it was scanned under."""
    out = []
    for c in reversed(store.checkpoints()):
        specs = [r[0] for r in store.con.execute(
            "SELECT spec FROM models WHERE checkpoint_id = ? ORDER BY seen_at DESC", [c["checkpoint_id"]]).fetchall()]
        cfg = c.get("config") or {}
        out.append({"checkpoint_id": c["checkpoint_id"], "id": c["checkpoint_id"][:12], "specs": specs,
                    "architecture": cfg.get("model_type") or cfg.get("architecture"), "n_layers": c["n_layers"],
                    "d_mlp": c["d_mlp"], "d_model": c["d_model"], "d_vocab": c["d_vocab"],
                    "scanned_at": str(c.get("scanned_at"))[:19]})
    return out


def search(store, text: str | None, token_id: int | None, top: int, model: str | None = None) -> dict:
    """Neurons most congruent with a token (both signs), in every checkpoint of the store (or one).
    A checkpoint whose tokenizer cannot take the text says why, and the others still answer."""
    from discover.query import query_token

    if (text is None or text == "") and token_id is None:
        raise QueryError("give the token's text (text=...) or its id (token_id=...)")
    targets = [store.resolve_model(model)] if model else list(reversed(store.checkpoints()))
    if not targets:
        raise QueryError("the store holds no scanned model")
    out = []
    for ckpt in targets:
        cid = ckpt["checkpoint_id"]
        try:
            pos = query_token(store, cid, text if token_id is None else None, token_id=token_id, top=top)
            neg = query_token(store, cid, None, token_id=pos["token_id"], top=top, negative=True)
        except QueryError as e:
            out.append({"checkpoint_id": cid, "id": cid[:12], "error": str(e)})
            continue
        out.append({"checkpoint_id": cid, "id": cid[:12], "token": pos["token"], "token_id": pos["token_id"],
                    "note": pos["note"], "positive": pos["results"], "negative": neg["results"]})
    return {"text": text, "token_id": token_id, "top": top, "models": out}


def neuron(store, model: str, name: str, *, examples: int = 8, similar: int = 8) -> dict:
    """One neuron: statistics, roles, top and bottom tokens, similar neurons; max-activating
    examples and curves when a corpus pass exists; verdicts, studies and patching results naming it;
    its history when the checkpoint belongs to a watched run."""
    from discover.names import layout_of
    from discover.query import latest_pass, neuron_activity, query_neuron

    res = query_neuron(store, model, name, similar=similar > 0, k_similar=max(1, similar))
    ckpt = store.resolve_model(model)
    cid, layer, idx = ckpt["checkpoint_id"], res["layer"], res["neuron_index"]
    res["id"] = cid[:12]
    res["activity"] = (neuron_activity(store, ckpt, layer, idx, limit=examples)
                       if examples > 0 and latest_pass(store, ckpt) is not None else None)
    has = store.has_table  # a catalog written by an older version lacks the newer tables
    run = None if not has("verify_runs") else store.con.execute(
        "SELECT verify_id FROM verify_runs WHERE checkpoint_id = ? ORDER BY created_at DESC LIMIT 1", [cid]).fetchone()
    res["verdicts"] = [] if run is None else [
        {"kind": k, "subject": s, "verdict": v, "decided_by": why, "evidence": json.loads(ev)}
        for k, s, v, why, ev in store.con.execute(
            "SELECT kind, subject, verdict, decided_by, evidence FROM hypotheses WHERE verify_id = ? AND layer = ? "
            "AND neuron = ? ORDER BY kind, subject", [run[0], layer, idx]).fetchall()]
    res["studies"] = [] if not (has("study_neurons") and has("study_runs")) else [
        {"study_id": sid, "target": t, "contrast": c, "recovery": r, "recovery_sd": sd, "created_at": str(at)[:16]}
        for sid, t, c, r, sd, at in store.con.execute(
            "SELECT s.study_id, s.target, s.contrast, n.recovery, n.recovery_sd, s.created_at FROM study_neurons n "
            "JOIN study_runs s USING (study_id) WHERE n.checkpoint_id = ? AND n.layer = ? AND n.neuron = ? "
            "ORDER BY s.created_at DESC", [cid, layer, idx]).fetchall()]
    res["patching"] = [] if not (has("patch_results") and has("patch_experiments")) else [
        {"experiment_id": e, "target": t, "contrast": c, "clean": cl, "recovery": r, "attribution": a}
        for e, t, c, cl, r, a in store.con.execute(
            "SELECT e.experiment_id, e.target, e.contrast, e.clean, r.recovery, r.attribution FROM patch_results r "
            "JOIN patch_experiments e USING (experiment_id) WHERE r.checkpoint_id = ? AND r.layer = ? "
            "AND r.neuron = ? ORDER BY e.created_at DESC LIMIT 10", [cid, layer, idx]).fetchall()]
    res["history"] = None
    watched = None if not has("watch_checkpoints") else store.con.execute(
        "SELECT path, step FROM watch_checkpoints WHERE checkpoint_id = ? AND status = 'done' "
        "ORDER BY processed_at DESC LIMIT 1", [cid]).fetchone()
    if watched is not None:
        from pathlib import Path

        from discover.track import neuron_history

        try:
            res["history"] = neuron_history(store, str(Path(watched[0]).parent), layout_of(ckpt).name(layer, idx),
                                            at=watched[1])
        except QueryError:
            res["history"] = None
    return res


def roles(store, model: str, role: str, offset: int, limit: int) -> dict:
    from discover.query import query_roles

    rows = query_roles(store, model, role, top=offset + limit)
    ckpt = store.resolve_model(model)
    total = store.con.execute("SELECT count(*) FROM roles WHERE checkpoint_id = ? AND role = ?",
                              [ckpt["checkpoint_id"], role]).fetchone()[0]
    return {"checkpoint_id": ckpt["checkpoint_id"], "id": ckpt["checkpoint_id"][:12], "role": role,
            "offset": offset, "limit": limit, "total": int(total), "rows": rows[offset:offset + limit]}


def verdicts(store, model: str, verdict: str | None, kind: str | None, offset: int, limit: int) -> dict:
    from discover.verify import query_verdicts

    res = query_verdicts(store, model, verdict=verdict, kind=kind, top=offset + limit)
    res["id"] = res["checkpoint_id"][:12]
    res["hypotheses"] = res["hypotheses"][offset:offset + limit]
    res.update(offset=offset, limit=limit)
    return res


def studies(store, model: str) -> list[dict]:
    from discover.report import latest_studies

    ckpt = store.resolve_model(model)
    return latest_studies(store, ckpt["checkpoint_id"], limit=50)


def study(store, study_id: str) -> dict:
    if not store.has_table("study_runs"):
        raise NotFound(f"no token study {study_id} in this store")
    cur = store.con.execute("SELECT * FROM study_runs WHERE study_id = ?", [study_id])
    row = cur.fetchone()
    if row is None:
        raise NotFound(f"no token study {study_id} in this store")
    r = dict(zip([c[0] for c in cur.description], row))
    for k in ("corpus", "settings", "counts", "pairs", "logit_lens", "layer_patching", "neurons", "seconds"):
        if isinstance(r.get(k), str):
            r[k] = json.loads(r[k])
    r["created_at"] = str(r["created_at"])[:19]
    r["id"] = r["checkpoint_id"][:12]
    return r


def default_model(store) -> str:
    """The newest checkpoint's id: what listings show when no model is chosen."""
    ms = store.checkpoints()
    if not ms:
        raise QueryError("the store holds no scanned model")
    return ms[-1]["checkpoint_id"]
