"""Ranked candidate reports: the catalog as a page researchers can read.

`build_report` gathers, for one checkpoint, the summary plots' data (role counts per layer,
vocabulary kurtosis vs skew of every neuron, verdict counts) and one card per candidate neuron
— ranked by the strength of its verdicts and evidence — with its roles, verdicts (and the
numbers that decided them), statistics, top and bottom tokens, the histogram of its direct
vocabulary effect `w_out . U[:, t]` over every token, its activation-vs-prediction curves,
max-activating examples with per-token values, its feature-test scores, and its results in the
stored `discover patch` experiments.

`render_html` writes one self-contained file: the data travels as JSON inside a
`<script type="application/json">` element (every `<`, `>` and `&` escaped, so no token or
corpus text can close it) and a small script draws the plots as SVG and the cards page by page
with `textContent` only — nothing from the data is ever parsed as HTML. No network access.
`render_markdown` and `json.dumps(build_report(...))` are the other formats.
"""

from __future__ import annotations

import html
import json
import math
from datetime import datetime, timezone

import numpy as np

from discover.errors import QueryError
from discover.names import layout_of

FORMATS = ("html", "md", "json")
VOCAB_BINS = 60


def _clean(x):
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _rank_key(c: dict) -> tuple:
    """Confirmed first, then inconclusive, then candidates never tested (in the order they were
    chosen: by role score), then neurons whose hypotheses were all rejected."""
    order = {"confirmed": 0, "inconclusive": 1, "rejected": 3}
    best = min((order[v["verdict"]] for v in c["verdicts"]), default=2)
    n_conf = sum(v["verdict"] == "confirmed" for v in c["verdicts"])
    strength = max((v["strength"] for v in c["verdicts"] if v["strength"] is not None and v["verdict"] != "rejected"),
                   default=0.0)
    return (best, -n_conf, -strength, c["_order"])


def build_report(store, model: str, *, cards: int = 100, examples: int = 8, view=None,
                 verify_id: str | None = None) -> dict:
    """The report's data for the checkpoint of `model` (a spec or checkpoint id), with the
    verdicts of `verify_id` (default: the checkpoint's latest verify run)."""
    from discover.query import latest_pass, neuron_activity, query_neuron
    from discover.roles import ROLES
    from discover.verify import subject_label

    if cards < 1:
        raise QueryError("--cards must be at least 1")
    if examples < 1:
        raise QueryError("--examples must be at least 1")
    ckpt = store.resolve_model(model)
    cid, N, L = ckpt["checkpoint_id"], ckpt["d_mlp"], ckpt["n_layers"]
    con = store.con
    # -- summary
    stats = con.execute("SELECT layer, neuron, vocab_kurt, vocab_skew, role FROM neurons WHERE checkpoint_id = ? "
                        "ORDER BY layer, neuron", [cid]).fetchnumpy()
    role_rows = con.execute("SELECT role, layer, count(*) FROM roles WHERE checkpoint_id = ? GROUP BY role, layer",
                            [cid]).fetchall()
    per_layer = {r: [0] * L for r in ROLES}
    for role, layer, n in role_rows:
        per_layer[role][layer] = int(n)
    run = con.execute("SELECT verify_id, tokens, corpus FROM verify_runs WHERE checkpoint_id = ? "
                      "AND (? IS NULL OR verify_id = ?) ORDER BY created_at DESC LIMIT 1",
                      [cid, verify_id, verify_id]).fetchone()
    hyps = []
    if run is not None:
        hyps = con.execute("SELECT layer, neuron, kind, subject, verdict, decided_by, evidence FROM hypotheses "
                           "WHERE verify_id = ?", [run[0]]).fetchall()
    verdict_counts: dict = {}
    by_neuron: dict = {}
    for l, n, kind, subj, v, why, ev in hyps:
        ev = json.loads(ev)
        verdict_counts.setdefault(kind, {"confirmed": 0, "inconclusive": 0, "rejected": 0})[v] += 1
        strength = ev.get("auroc") if kind == "feature" else ev.get("auroc_next")
        by_neuron.setdefault((l, n), []).append({"kind": kind, "subject": subject_label(subj, ev), "verdict": v,
                                                 "decided_by": why,
                                                 "evidence": ev, "strength": strength})
    # -- candidates: every neuron with a hypothesis, then role candidates by score
    chosen = list(by_neuron)
    if len(chosen) < cards:  # role candidates never tested, strongest role score first, up to the budget
        seen = set(chosen)
        for l, n in con.execute("SELECT layer, neuron FROM roles WHERE checkpoint_id = ? GROUP BY layer, neuron "
                                "ORDER BY max(score) DESC, layer, neuron LIMIT ?", [cid, cards + len(seen)]).fetchall():
            if (l, n) not in seen and len(chosen) < cards:
                seen.add((l, n))
                chosen.append((l, n))
    from discover.universality import latest_universality

    uni = latest_universality(store, cid)
    if uni is not None and len(chosen) < cards:  # universal neurons, largest excess first
        seen = set(chosen)
        for key, u in sorted(uni["neurons"].items(), key=lambda kv: -(kv[1]["mean_excess"] or -1e9)):
            if len(chosen) >= cards or not u["universal"]:
                break
            if key not in seen:
                seen.add(key)
                chosen.append(key)
    studies = latest_studies(store, cid)
    if len(chosen) < cards + len(studies) * 3:  # the neurons each study singled out
        seen = set(chosen)
        for st in studies:
            for t in st["neurons"][:3]:
                key = (t["layer"], t["neuron_index"])
                if key not in seen:
                    seen.add(key)
                    chosen.insert(0, key)
    p = latest_pass(store, ckpt)
    built = []
    for i, (l, n) in enumerate(chosen):
        q = query_neuron(store, model, layout_of(ckpt).name(l, n))
        card = {"neuron": q["neuron"], "layer": l, "index": n, "roles": q["roles"], "stats": q["stats"],
                "top_tokens": q["top_tokens"][:10], "bottom_tokens": q["bottom_tokens"][:10],
                "verdicts": sorted(by_neuron.get((l, n), []), key=lambda v: v["verdict"] != "confirmed"), "_order": i}
        card["patching"] = [
            {"experiment_id": e, "clean": c_, "corrupted": k_, "target": t, "contrast": ct, "positions": ps,
             "recovery": r, "attribution": a}
            for e, c_, k_, t, ct, ps, r, a in con.execute(
                "SELECT x.experiment_id, x.clean, x.corrupted, x.target, x.contrast, x.positions, r.recovery, "
                "r.attribution FROM patch_results r JOIN patch_experiments x USING (experiment_id) WHERE "
                "r.checkpoint_id = ? AND r.layer = ? AND r.neuron = ? ORDER BY x.created_at DESC LIMIT 5",
                [cid, l, n]).fetchall()]
        if uni is not None and (l, n) in uni["neurons"]:
            card["universality"] = uni["neurons"][(l, n)]
        if p is not None:
            act = neuron_activity(store, ckpt, l, n, limit=examples)
            for ex in act["examples"]:  # compact: [token, value] pairs (the page holds thousands of them)
                ex["tokens"] = [[t["token"], None if t["value"] is None else round(t["value"], 4)] for t in ex["tokens"]]
            card.update(activation=act["stats"], examples=act["examples"], curves=act["curves"])
        built.append(card)
    built.sort(key=_rank_key)
    built = built[:cards]
    for c in built:
        del c["_order"]
    if view is not None and view.checkpoint_id == cid:  # the very weights that were scanned
        _vocab_histograms(view, built)
    return _clean({
        "model": model, "checkpoint_id": cid, "architecture": ckpt["architecture"], "n_layers": L, "d_mlp": N,
        "source_format": ckpt.get("source_format"), "quantization": ckpt.get("quantization"),
        "d_model": ckpt["d_model"], "d_vocab": ckpt["d_vocab"],
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "corpus_pass": None if p is None else {"pass_id": p["pass_id"], "tokens": p["tokens"], "corpus": p["corpus"]},
        "verify": None if run is None else {"verify_id": run[0], "tokens": run[1],
                                            "corpus": json.loads(run[2]) if isinstance(run[2], str) else run[2]},
        "summary": {
            "roles_per_layer": per_layer,
            "verdict_counts": verdict_counts,
            "scatter": {"kurtosis": [round(float(x), 4) for x in stats["vocab_kurt"]],
                        "skew": [round(float(x), 4) for x in stats["vocab_skew"]],
                        "role": [r if isinstance(r, str) else None for r in stats["role"]]},
        },
        "cards": built,
        "studies": studies,
        "changes": changes_section(store, cid),
        "universality": None if uni is None else {
            "universality_id": uni["universality_id"], "models": uni["models"], "tokens": uni["tokens"],
            "threshold": uni["threshold"],
            "per_layer": [sum(1 for (l, _), u in uni["neurons"].items() if l == layer and u["universal"])
                          for layer in range(L)],
            "neurons": len(uni["neurons"]),
            "universal": sum(1 for u in uni["neurons"].values() if u["universal"])},
    })


def latest_studies(store, cid: str, limit: int = 5) -> list:
    """The latest token study of each target token of a checkpoint (newest first)."""
    if not store.has_table("study_runs"):
        return []
    cur = store.con.execute(
        "SELECT * FROM study_runs WHERE checkpoint_id = ? ORDER BY created_at DESC", [cid])  # any catalog version
    cols = [c[0] for c in cur.description]
    out, seen = [], set()
    for row in cur.fetchall():
        r = dict(zip(cols, row))
        if r["target"] in seen:
            continue
        seen.add(r["target"])
        r = {k: r.get(k) for k in ("study_id", "target", "target_id", "contrast", "counts", "pairs", "logit_lens",
                                   "layer_patching", "neurons", "seconds", "created_at", "pass_id")}
        for k in ("counts", "pairs", "logit_lens", "layer_patching", "neurons", "seconds"):
            r[k] = json.loads(r[k]) if isinstance(r[k], str) else r[k]
        r["pairs"] = [{k: v for k, v in p.items() if k not in ("clean", "corrupted")} for p in r["pairs"]][:5]
        r["created_at"] = str(r["created_at"])[:16]
        r["curves"] = []  # the examined neurons' activation-vs-prediction curves of the studied token
        for t in [t for t in r["neurons"] if "verdict" in t][:3] if r.get("pass_id") else []:
            bins = store.con.execute(
                "SELECT lo, hi, positions, top_prediction FROM prediction_curves WHERE pass_id = ? AND layer = ? "
                "AND neuron = ? AND token_id = ? ORDER BY bin", [r["pass_id"], t["layer"], t["neuron_index"],
                                                                 r["target_id"]]).fetchall()
            if bins:
                r["curves"].append({"neuron": t["neuron"], "token": r["target"], "bins": [
                    {"lo": lo, "hi": hi, "positions": n, "top_prediction": k} for lo, hi, n, k in bins]})
        out.append(r)
        if len(out) >= limit:
            break
    return out


def changes_section(store, cid: str) -> dict | None:
    """What changed since the previous checkpoint of the run, when `discover watch` processed it."""
    from discover.track import report_changes

    try:
        return report_changes(store, cid)
    except Exception as e:  # a catalog from before `watch` (no such tables in a read-only store)
        import duckdb

        if isinstance(e, duckdb.CatalogException):
            return None
        raise


def _vocab_histograms(view, cards: list) -> None:
    """Per card: the histogram of w_out . U[:, t] over the whole vocabulary (processed weights)."""
    import torch

    U = view.processed_unembed()
    for c in cards:
        with torch.no_grad():
            g = (view.processed_W_out(c["layer"])[c["index"]] @ U).double().numpy()
        counts, edges = np.histogram(g, bins=VOCAB_BINS)
        c["vocab_effect"] = {"edges": edges.tolist(), "counts": counts.tolist(),
                             "mean": float(g.mean()), "std": float(g.std())}


# ------------------------------------------------------------------------------ markdown
def _md(s) -> str:
    """Token / corpus text inside a Markdown table or paragraph: escaped, one line, no autolinks."""
    s = html.escape(str(s), quote=True).replace("|", "&#124;").replace("`", "&#96;").replace("*", "&#42;")
    s = s.replace("_", "&#95;").replace("[", "&#91;").replace("]", "&#93;").replace("\\", "&#92;")
    s = s.replace("~", "&#126;").replace(":", "&#58;").replace("www.", "www&#46;").replace("@", "&#64;")
    return s.replace("\n", "\u21b5").replace("\r", "").replace("\t", "\u2192")


def _num(x, nd=3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}g}"
    return str(x)


def _source(rep: dict) -> str:
    """The architecture, and the GGUF quantization the weights were dequantized from."""
    if rep.get("source_format") == "gguf":
        return f"{rep['architecture']}, GGUF {rep.get('quantization') or 'unknown type'}"
    return rep["architecture"]


def render_markdown(rep: dict) -> str:
    out = [f"# discover report: {_md(rep['model'])}", "",
           f"checkpoint <code>{rep['checkpoint_id'][:16]}</code> ({_source(rep)}, {rep['n_layers']} layers x "
           f"{rep['d_mlp']} neurons, vocab {rep['d_vocab']}), generated {rep['generated']}", ""]
    s = rep["summary"]
    shown = [r for r, counts in s["roles_per_layer"].items() if any(counts)]  # one row per layer: 48 layers stay readable
    out += ["## Roles per layer", "", "| layer | " + " | ".join(shown) + " | all |", "|---|" + "---:|" * (len(shown) + 1)]
    out += [f"| L{i} | " + " | ".join(str(s["roles_per_layer"][r][i]) for r in shown) +
            f" | {sum(c[i] for c in s['roles_per_layer'].values())} |" for i in range(rep["n_layers"])]
    out += ["", "## Verdicts", "", "| kind | confirmed | inconclusive | rejected |", "|---|---|---|---|"]
    out += [f"| {k} | {c['confirmed']} | {c['inconclusive']} | {c['rejected']} |" for k, c in s["verdict_counts"].items()]
    un = rep.get("universality")
    if un:
        out += ["", "## Universality", "",
                f"{un['universal']} of {un['neurons']} neurons universal (mean excess correlation over "
                f"{len(un['models']) - 1} other model(s) > {un['threshold']}; {un['tokens']:,} tokens; run "
                f"{un['universality_id']}); per layer: " + ", ".join(f"L{i} {c}" for i, c in enumerate(un["per_layer"]))]
    ch = rep.get("changes")
    if ch and ch.get("prev_checkpoint_id"):
        out += ["", f"## Changes since the previous checkpoint (step {ch.get('prev_step')} -> {ch['step']})", ""]
        m = ch["match"] or {}
        out += [f"neurons matched by weights: median similarity {_num(m.get('similarity_median'))}, "
                f"mutual {_num(m.get('mutual_fraction'))}, same index {_num(m.get('same_index'))}", ""]
        if ch["roles"]:
            out += ["| role | gained | lost |", "|---|---|---|"]
            out += [f"| {r} | {v['gained']} | {v['lost']} |" for r, v in ch["roles"].items()]
        else:
            out.append("no scanner role gained or lost")
        if ch["verdicts"]:
            out += ["", "| change | neuron | hypothesis | detail |", "|---|---|---|---|"]
            out += [f"| {v['change']} | {v['neuron_name'] or '(was ' + v['prev_name'] + ')'} | {_md(v['subject'])} | "
                    f"{_md(v['detail'])} |" for v in ch["verdicts"]]
        if ch["moved"]:
            out += ["", "| neuron | was | statistic | before | after | change / spread |", "|---|---|---|---|---|---|"]
            out += [f"| {v['neuron_name']} | {v['prev_name']} | {v['subject']} | {_num(v['old_value'])} | "
                    f"{_num(v['new_value'])} | {_num(v['score'])} |" for v in ch["moved"]]
    for st in rep.get("studies") or []:
        c = st["counts"]
        out += ["", f"## Token study: <code>{_md(st['target'])}</code> against <code>{_md(st['contrast'])}</code>", ""]
        if "positions" in c:
            out.append(f"top prediction {c['predicted']:,} times, next token {c['occurs']:,} times in "
                       f"{c['positions']:,} corpus tokens (both {c['predicted_and_next']:,}); ")
        out += [f"{c['found']} pair(s) from {c['tried']:,} substitution(s) tried", "",
                "| neuron | recovery | sd | congruence | token rank | ablation z | verdict |", "|---|---|---|---|---|---|---|"]
        out += [f"| {n['neuron']} | {_num(n['recovery'])} | {_num(n['recovery_sd'])} | {_num(n['congruence'])} | "
                f"{n['token_rank']} | {_num((n.get('evidence') or {}).get('ablation_z'))} | {n.get('verdict') or '-'} |"
                for n in st["neurons"]]
        out += ["", "logit lens (clean): " + ", ".join(f"L{i} {_num(v)}" for i, v in enumerate(st["logit_lens"]["clean"])),
                "", "layer patching, MLP: " + ", ".join(f"L{i} {_num(v)}" for i, v in enumerate(st["layer_patching"]["mlp"]))]
    out += ["", f"## Candidates ({len(rep['cards'])})", ""]
    for c in rep["cards"]:
        out += [f"### {c['neuron']}", ""]
        roles = ", ".join(f"{r['role']} ({_num(r['score'])})" for r in c["roles"]) or "none"
        st = c["stats"]
        out += [f"roles: {roles}; vocab kurtosis {_num(st.get('vocab_kurt'))}, skew {_num(st.get('vocab_skew'))}", ""]
        if c["verdicts"]:
            out += ["| hypothesis | verdict | evidence | decided by |", "|---|---|---|---|"]
            for v in c["verdicts"]:
                ev = ", ".join(f"{k} {_num(x)}" for k, x in v["evidence"].items() if isinstance(x, (int, float)))
                out.append(f"| {v['kind']}: {_md(v['subject'])} | **{v['verdict']}** | {_md(ev)} | {_md(v['decided_by'])} |")
            out.append("")
        u = c.get("universality")
        if u:
            out += [f"universality: {'**universal**' if u['universal'] else 'not universal'}, mean max correlation "
                    f"{_num(u['mean_max_corr'])}, rotated baseline {_num(u['mean_baseline'])}, excess "
                    f"{_num(u['mean_excess'])}; partners " + ", ".join(
                        f"{p['checkpoint_id'][:8]} L{p['layer']}.N{p['neuron']} ({_num(p['max_corr'])})"
                        for p in u["partners"] if p["layer"] is not None), ""]
        out += ["top tokens: " + " ".join(f"<code>{_md(t['token'])}</code>" for t in c["top_tokens"]), "",
                "bottom tokens: " + " ".join(f"<code>{_md(t['token'])}</code>" for t in c["bottom_tokens"]), ""]
        for x in c.get("patching", []):
            out.append(f"- patching {_md(x['target'])} vs {_md(x['contrast'])} ({x['positions']}): recovery "
                       f"{_num(x['recovery'])}, attribution {_num(x['attribution'])}")
        for ex in c.get("examples", []):
            toks = "".join((f"<b>{_md(t[0])}</b>" if i == ex["max_index"] else _md(t[0]))
                           for i, t in enumerate(ex["tokens"]))
            out.append(f"- {_num(ex['value'])} ({_md(ex['doc_id'])}): {toks}")
        out.append("")
    return "\n".join(out)


# ---------------------------------------------------------------------------------- HTML
def _json_for_script(data: dict) -> str:
    """JSON that cannot end its <script> element or open a comment: <, >, & escaped."""
    return (json.dumps(data, ensure_ascii=False, allow_nan=False)
            .replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def render_html(rep: dict) -> str:
    title = html.escape(f"discover report: {rep['model']}")
    return _PAGE.replace("__DATA__", _json_for_script(rep)).replace("__TITLE__", title, 1)


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:">
<title>__TITLE__</title>
<style>
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
header{background:#1d2330;color:#fff;padding:14px 24px}header h1{font-size:18px;margin:0}
header p{margin:4px 0 0;color:#c9cfda;font-size:13px}main{max-width:1180px;margin:0 auto;padding:16px}
[hidden]{display:none!important}.row{display:flex;flex-wrap:wrap;gap:16px}.panel{background:#fff;border:1px solid #dde1e8;border-radius:6px;padding:12px;flex:1 1 340px}
.panel h2{font-size:14px;margin:0 0 8px}.card{background:#fff;border:1px solid #dde1e8;border-radius:6px;padding:12px;margin:12px 0}
.card h3{margin:0 0 6px;font-size:16px}.tag{display:inline-block;padding:1px 7px;border-radius:9px;font-size:12px;margin-right:4px;background:#e8ebf0}
.confirmed{background:#d4f2dc;color:#12632b}.rejected{background:#f7d9d9;color:#8a1c1c}.inconclusive{background:#f3ecd0;color:#6b5a12}
table{border-collapse:collapse;font-size:12.5px}td,th{padding:2px 8px;border-bottom:1px solid #eef0f4;text-align:left;vertical-align:top}
.tok{font-family:ui-monospace,Menlo,Consolas,monospace;white-space:pre-wrap;word-break:break-all;display:inline-block;max-width:100%;vertical-align:top;background:#eef1f6;border-radius:3px;padding:0 3px;margin:1px}
.ex{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12.5px;white-space:pre-wrap;word-break:break-all;margin:4px 0;padding:4px;border-left:3px solid #dde1e8}
.ex span.max{outline:2px solid #c0392b;border-radius:2px}.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(330px,1fr));gap:12px}
.scroll{max-height:260px;overflow:auto;margin-top:6px}.roles th{position:sticky;top:0;background:#fff}.roles td.n{text-align:right}
.pager{margin:12px 0}.pager button{margin-right:6px}svg text{font-size:10px;fill:#4a5263}small{color:#6a7386}
</style></head>
<body><header><h1 id="title"></h1><p id="sub"></p></header>
<main>
<div class="row"><div class="panel"><h2>Roles per layer</h2><div id="roles"></div></div>
<div class="panel"><h2>Vocabulary kurtosis vs skew, every neuron</h2><div id="scatter"></div></div>
<div class="panel"><h2>Verdicts</h2><div id="verdicts"></div></div>
<div class="panel" id="uni-panel" hidden><h2>Universality</h2><div id="uni"></div></div></div>
<div class="row" id="changes-row" hidden><div class="panel"><h2 id="changes-title"></h2><div id="changes"></div></div>
<div class="panel"><h2>Roles along the run</h2><div id="along"></div></div></div>
<div id="studies"></div>
<h2 id="cards-title"></h2><div class="pager" id="pager"></div><div id="cards"></div><div class="pager" id="pager2"></div>
</main>
<script type="application/json" id="data">__DATA__</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const NS = "http://www.w3.org/2000/svg";
const COLORS = {prediction:"#2e7d32",suppression:"#c62828",partition:"#6a1b9a",entropy:"#ef6c00",memory_management:"#1565c0",signal_boosting:"#00838f"};
const SHORT = {prediction:"pred",suppression:"supp",partition:"part",entropy:"entropy",memory_management:"memory",signal_boosting:"boost"};
function el(tag, attrs, text){const e=document.createElement(tag);for(const k in (attrs||{}))e.setAttribute(k,attrs[k]);if(text!==undefined&&text!==null)e.textContent=String(text);return e;}
function svg(tag, attrs){const e=document.createElementNS(NS,tag);for(const k in (attrs||{}))e.setAttribute(k,attrs[k]);return e;}
function fmt(x,d){if(x===null||x===undefined)return "-";if(typeof x!=="number")return String(x);if(Number.isInteger(x))return String(x);const a=Math.abs(x);return (a!==0&&(a<1e-3||a>=1e5))?x.toExponential(2):x.toPrecision(d||3);}
function showTok(s){return String(s).replace(/\\n/g,"\\u21b5").replace(/\\t/g,"\\u2192");}
function axes(g,W,H,P,x0,x1,y0,y1,xl,yl){g.appendChild(svg("line",{x1:P,y1:H-P,x2:W-5,y2:H-P,stroke:"#99a"}));g.appendChild(svg("line",{x1:P,y1:5,x2:P,y2:H-P,stroke:"#99a"}));
 const t1=svg("text",{x:P,y:H-P+12});t1.textContent=fmt(x0);g.appendChild(t1);const t2=svg("text",{x:W-40,y:H-P+12});t2.textContent=fmt(x1);g.appendChild(t2);
 const t3=svg("text",{x:2,y:12});t3.textContent=fmt(y1);g.appendChild(t3);const t4=svg("text",{x:2,y:H-P});t4.textContent=fmt(y0);g.appendChild(t4);
 const xt=svg("text",{x:W/2-20,y:H-2});xt.textContent=xl;g.appendChild(xt);const yt=svg("text",{x:P+4,y:12});yt.textContent=yl;g.appendChild(yt);}
function bars(counts, labels, color, W, H, xl, yl, x0, x1){const P=30,g=svg("svg",{width:W,height:H,role:"img"});const m=Math.max(1,...counts);const bw=(W-P-8)/counts.length;
 counts.forEach((c,i)=>{const h=(H-P-8)*c/m;const r=svg("rect",{x:P+i*bw+1,y:H-P-h,width:Math.max(1,bw-2),height:h,fill:color});const t=svg("title");t.textContent=(labels?labels[i]+": ":"")+c;r.appendChild(t);g.appendChild(r);});
 axes(g,W,H,P,x0===undefined?0:x0,x1===undefined?counts.length:x1,0,m,xl,yl);return g;}
function rolesPlot(){const box=document.getElementById("roles");const R=D.summary.roles_per_layer,L=D.n_layers,W=340,H=150,P=30;
 const tot=[];for(let l=0;l<L;l++){let a=0;for(const r in R)a+=R[r][l];tot.push(a);}const m=Math.max(1,...tot),bw=(W-P-8)/L;const g=svg("svg",{width:W,height:H,role:"img"});
 for(let l=0;l<L;l++){let y=H-P;for(const r in R){const c=R[r][l];if(!c)continue;const h=(H-P-8)*c/m;y-=h;const b=svg("rect",{x:P+l*bw+1,y:y,width:Math.max(1,bw-2),height:h,fill:COLORS[r]||"#999"});
  const t=svg("title");t.textContent="L"+l+" "+r+": "+c;b.appendChild(t);g.appendChild(b);}}
 axes(g,W,H,P,0,L-1,0,m,"layer","neurons with a role");box.appendChild(g);
 const shown=Object.keys(R).filter(r=>R[r].some(x=>x>0));const t=el("table",{class:"roles"});const hr=el("tr");hr.appendChild(el("th",{},"layer"));
 shown.forEach(r=>{const th=el("th",{title:r});th.appendChild(el("span",{class:"tag",style:"background:"+(COLORS[r]||"#999")+";color:#fff"},SHORT[r]||r));hr.appendChild(th);});
 hr.appendChild(el("th",{},"all"));t.appendChild(hr);
 for(let l=0;l<L;l++){const tr=el("tr");tr.appendChild(el("td",{},"L"+l));shown.forEach(r=>tr.appendChild(el("td",{class:"n"},R[r][l]||"")));tr.appendChild(el("td",{class:"n"},tot[l]));t.appendChild(tr);}
 const wrap=el("div",{class:"scroll"});wrap.appendChild(t);box.appendChild(wrap);
 if(!shown.length)box.appendChild(el("small",{},"no neuron has a role"));}
function scatterPlot(){const s=D.summary.scatter,W=360,H=240,P=30;const K=s.kurtosis.map(x=>x===null?NaN:x),S=s.skew.map(x=>x===null?NaN:x);
 const fk=K.filter(isFinite),fs=S.filter(isFinite);if(!fk.length||!fs.length)return;
 const kx=fk.reduce((a,b)=>Math.max(a,b)),kn=fk.reduce((a,b)=>Math.min(a,b)),sx=fs.reduce((a,b)=>Math.max(a,b)),sn=fs.reduce((a,b)=>Math.min(a,b));
 const X=k=>P+(W-P-8)*(k-kn)/((kx-kn)||1),Y=v=>H-P-(H-P-8)*(v-sn)/((sx-sn)||1);
 const box=el("div",{style:"position:relative;width:"+W+"px;height:"+H+"px"});
 const cv=el("canvas",{width:W,height:H,style:"position:absolute;left:0;top:0"});const ctx=cv.getContext("2d");
 for(const pass of [0,1])for(let i=0;i<K.length;i++){const r=s.role[i];if(!isFinite(K[i])||!isFinite(S[i])||(pass===0)===Boolean(r))continue;
  ctx.fillStyle=r?(COLORS[r]||"#555"):"rgba(150,160,175,0.45)";ctx.beginPath();ctx.arc(X(K[i]),Y(S[i]),r?2.6:1.5,0,6.2832);ctx.fill();}
 const g=svg("svg",{width:W,height:H,style:"position:absolute;left:0;top:0"});axes(g,W,H,P,kn,kx,sn,sx,"kurtosis","skew");
 box.appendChild(cv);box.appendChild(g);document.getElementById("scatter").appendChild(box);}
function verdictPlot(){const box=document.getElementById("verdicts");const vc=D.summary.verdict_counts;if(!Object.keys(vc).length){box.appendChild(el("p",{},"no verify run yet: discover verify"));return;}
 const t=el("table");const hr=el("tr");["kind","confirmed","inconclusive","rejected"].forEach(h=>hr.appendChild(el("th",{},h)));t.appendChild(hr);
 for(const k in vc){const tr=el("tr");tr.appendChild(el("td",{},k));["confirmed","inconclusive","rejected"].forEach(v=>{const td=el("td");td.appendChild(el("span",{class:"tag "+v},vc[k][v]));tr.appendChild(td);});t.appendChild(tr);}box.appendChild(t);}
function tokenList(ts){const d=el("div");ts.forEach(t=>{const s=el("span",{class:"tok",title:"congruence "+fmt(t.congruence)},showTok(t.token));d.appendChild(s);});return d;}
function example(ex){const d=el("div",{class:"ex"});const vals=ex.tokens.map(t=>t[1]===null?0:t[1]);const top=Math.max(1e-9,...vals);
 d.appendChild(el("small",{},fmt(ex.value)+"  "+ex.doc_id+" @ token "+ex.doc_token+"\\n"));
 ex.tokens.forEach((t,i)=>{const a=Math.max(0,(t[1]||0)/top);const s=el("span",{title:fmt(t[1]),style:"background:rgba(230,81,0,"+a.toFixed(3)+")"},showTok(t[0]));if(i===ex.max_index)s.className="max";d.appendChild(s);});return d;}
function curvePlot(c){const W=330,H=170,P=30,g=svg("svg",{width:W,height:H,role:"img"});const b=c.bins.filter(x=>x.positions>0);if(!b.length)return el("span");
 const fr=b.map(x=>x.top_prediction/x.positions),m=Math.max(0.01,...fr),bw=(W-P-8)/b.length;
 b.forEach((x,i)=>{const h=(H-P-8)*fr[i]/m;const r=svg("rect",{x:P+i*bw+0.5,y:H-P-h,width:Math.max(1,bw-1),height:h,fill:"#1565c0","fill-opacity":Math.min(1,0.25+Math.log10(1+x.positions)/4)});
  const t=svg("title");t.textContent="["+fmt(x.lo)+", "+fmt(x.hi)+"): n="+x.positions+", top prediction "+x.top_prediction;r.appendChild(t);g.appendChild(r);});
 axes(g,W,H,P,b[0].lo,b[b.length-1].hi,0,m,"activation (bins; opacity = log n)","P(top prediction)");return g;}
function card(c){const d=el("div",{class:"card"});d.appendChild(el("h3",{},c.neuron));const tags=el("div");
 c.roles.forEach(r=>tags.appendChild(el("span",{class:"tag",style:"background:"+(COLORS[r.role]||"#999")+";color:#fff"},r.role)));
 c.verdicts.forEach(v=>tags.appendChild(el("span",{class:"tag "+v.verdict},v.kind+": "+v.subject+" \\u2014 "+v.verdict)));
 if(c.universality&&c.universality.universal)tags.appendChild(el("span",{class:"tag",style:"background:#00838f;color:#fff"},"universal (excess "+fmt(c.universality.mean_excess)+")"));d.appendChild(tags);
 if(c.verdicts.length){const t=el("table");const hr=el("tr");["hypothesis","verdict","evidence","decided by"].forEach(h=>hr.appendChild(el("th",{},h)));t.appendChild(hr);
  c.verdicts.forEach(v=>{const tr=el("tr");tr.appendChild(el("td",{},v.kind+": "+v.subject));tr.appendChild(el("td",{},v.verdict));
   tr.appendChild(el("td",{},Object.entries(v.evidence).filter(e=>typeof e[1]==="number").map(e=>e[0]+" "+fmt(e[1])).join(", ")));tr.appendChild(el("td",{},v.decided_by));t.appendChild(tr);});d.appendChild(t);}
 const grid=el("div",{class:"grid"});
 if(c.vocab_effect){const p=el("div");p.appendChild(el("b",{},"direct effect on every token, w_out \\u00b7 U"));const e=c.vocab_effect.edges;
  p.appendChild(bars(c.vocab_effect.counts.map(x=>Math.log10(1+x)),e.slice(0,-1).map((x,i)=>fmt(x)+".."+fmt(e[i+1])),"#546e7a",330,150,"w_out \\u00b7 U[:, t]","log10(1+tokens)",e[0],e[e.length-1]));grid.appendChild(p);}
 const tk=el("div");tk.appendChild(el("b",{},"top tokens"));tk.appendChild(tokenList(c.top_tokens));tk.appendChild(el("b",{},"bottom tokens"));tk.appendChild(tokenList(c.bottom_tokens));
 const st=el("small",{},"vocab kurtosis "+fmt(c.stats.vocab_kurt)+", skew "+fmt(c.stats.vocab_skew)+(c.activation?"; activation mean "+fmt(c.activation.act_mean)+", kurtosis "+fmt(c.activation.act_kurt)+", freq>0 "+fmt(c.activation.act_freq)+(c.activation.act_tokens!=null?", over "+c.activation.act_tokens+" tokens":""):""));tk.appendChild(st);grid.appendChild(tk);
 (c.curves||[]).forEach(cv=>{const p=el("div");p.appendChild(el("b",{},"activation vs top prediction of "+showTok(cv.token)));p.appendChild(curvePlot(cv));grid.appendChild(p);});
 d.appendChild(grid);
 if(c.patching&&c.patching.length){d.appendChild(el("b",{},"activation patching (denoising; recovery of logit(target) \u2212 logit(contrast))"));const t=el("table");const hr=el("tr");
  ["target / contrast","positions","recovery (exact)","attribution","clean prompt"].forEach(h=>hr.appendChild(el("th",{},h)));t.appendChild(hr);
  c.patching.forEach(x=>{const tr=el("tr");[showTok(x.target)+" / "+showTok(x.contrast),x.positions,fmt(x.recovery),fmt(x.attribution),x.clean].forEach(v=>tr.appendChild(el("td",{},v)));t.appendChild(tr);});d.appendChild(t);}
 if(c.universality)d.appendChild(uniBlock(c.universality));
 if(c.examples&&c.examples.length){d.appendChild(el("b",{},"max-activating examples"));c.examples.forEach(ex=>d.appendChild(example(ex)));}
 return d;}
function uniPanel(){const u=D.universality;if(!u)return;document.getElementById("uni-panel").hidden=false;const box=document.getElementById("uni");
 box.appendChild(el("p",{},u.universal+" of "+u.neurons+" neurons universal: mean excess correlation over "+(u.models.length-1)+" other model(s) > "+u.threshold+" ("+u.tokens+" tokens)"));
 box.appendChild(bars(u.per_layer,u.per_layer.map((x,i)=>"L"+i),"#00838f",320,130,"layer","universal neurons",0,u.per_layer.length-1));}
function uniBlock(u){const d=el("div");d.appendChild(el("b",{},"universality: "+(u.universal?"universal":"not universal")));
 d.appendChild(el("small",{}," mean max correlation "+fmt(u.mean_max_corr)+", rotated baseline "+fmt(u.mean_baseline)+", excess "+fmt(u.mean_excess)));
 const t=el("table");const hr=el("tr");["other model","partner","max corr","baseline"].forEach(h=>hr.appendChild(el("th",{},h)));t.appendChild(hr);
 u.partners.forEach(p=>{const tr=el("tr");[p.checkpoint_id.slice(0,12),p.layer===null?"-":"L"+p.layer+".N"+p.neuron,fmt(p.max_corr),fmt(p.baseline_corr)].forEach(v=>tr.appendChild(el("td",{},v)));t.appendChild(tr);});d.appendChild(t);return d;}
function changesPanel(){const ch=D.changes;if(!ch||!ch.prev_checkpoint_id)return;document.getElementById("changes-row").hidden=false;
 document.getElementById("changes-title").textContent="Changes since the previous checkpoint (step "+fmt(ch.prev_step)+" \u2192 "+fmt(ch.step)+")";
 const box=document.getElementById("changes");const m=ch.match||{};
 box.appendChild(el("small",{},"neurons matched by weights (FAISS, w_in and w_out cosines): median similarity "+fmt(m.similarity_median)+", mutual "+fmt(m.mutual_fraction)+", same index "+fmt(m.same_index)));
 const t=el("table");const hr=el("tr");["role","gained","lost"].forEach(h=>hr.appendChild(el("th",{},h)));t.appendChild(hr);
 for(const r in ch.roles){const tr=el("tr");const td=el("td");td.appendChild(el("span",{class:"tag",style:"background:"+(COLORS[r]||"#999")+";color:#fff"},r));tr.appendChild(td);tr.appendChild(el("td",{},"+"+ch.roles[r].gained));tr.appendChild(el("td",{},"\u2212"+ch.roles[r].lost));t.appendChild(tr);}
 if(Object.keys(ch.roles).length)box.appendChild(t);
 if(ch.verdicts.length){const v=el("table");const h=el("tr");["change","neuron","hypothesis","detail"].forEach(x=>h.appendChild(el("th",{},x)));v.appendChild(h);
  ch.verdicts.forEach(x=>{const tr=el("tr");const td=el("td");td.appendChild(el("span",{class:"tag "+(x.change==="verdict_confirmed"?"confirmed":"rejected")},x.change==="verdict_confirmed"?"newly confirmed":"lost"));tr.appendChild(td);
   [x.neuron_name||("(was "+x.prev_name+")"),x.subject,x.detail].forEach(y=>tr.appendChild(el("td",{},y)));v.appendChild(tr);});box.appendChild(v);}
 if(ch.moved.length){box.appendChild(el("b",{},"statistics that moved most (change minus the common drift, in units of the statistic's spread)"));const v=el("table");const h=el("tr");["neuron","was","statistic","before","after","score"].forEach(x=>h.appendChild(el("th",{},x)));v.appendChild(h);
  ch.moved.forEach(x=>{const tr=el("tr");[x.neuron_name,x.prev_name,x.subject,fmt(x.old_value),fmt(x.new_value),fmt(x.score)].forEach(y=>tr.appendChild(el("td",{},y)));v.appendChild(tr);});box.appendChild(v);}
 const A=ch.along_run,W=360,H=200,P=30,n=A.steps.length;const g=svg("svg",{width:W,height:H,role:"img"});let mx=1;for(const r in A.roles)mx=Math.max(mx,...A.roles[r]);
 const byStep=A.steps.every(x=>x!==null)&&n>1&&A.steps[n-1]>A.steps[0];const s0=byStep?A.steps[0]:0,s1=byStep?A.steps[n-1]:n-1;
 const X=i=>P+(W-P-10)*(n<2?0.5:((byStep?A.steps[i]:i)-s0)/(s1-s0)),Y=c=>H-P-(H-P-8)*c/mx;
 for(const r in A.roles){const c=A.roles[r];if(!c.some(x=>x>0))continue;const pts=c.map((x,i)=>X(i)+","+Y(x)).join(" ");g.appendChild(svg("polyline",{points:pts,fill:"none",stroke:COLORS[r]||"#999","stroke-width":2}));
  c.forEach((x,i)=>{const d=svg("circle",{cx:X(i),cy:Y(x),r:A.steps[i]===ch.step?4:2.5,fill:COLORS[r]||"#999"});const tt=svg("title");tt.textContent=r+" at "+A.labels[i]+": "+x;d.appendChild(tt);g.appendChild(d);});}
 axes(g,W,H,P,s0,s1,0,mx,byStep?"step":"checkpoint (in order)","neurons with the role");document.getElementById("along").appendChild(g);}
function linePlot(series,W,H,xl,yl){const P=34,g=svg("svg",{width:W,height:H,role:"img"});const all=[].concat(...series.map(s=>s.y)).filter(v=>v!==null&&isFinite(v));if(!all.length)return g;
 const n=Math.max(...series.map(s=>s.y.length)),y0=Math.min(0,...all),y1=Math.max(0,...all),X=i=>P+(W-P-10)*(n<2?0.5:i/(n-1)),Y=v=>H-P-(H-P-8)*(v-y0)/((y1-y0)||1);
 g.appendChild(svg("line",{x1:P,y1:Y(0),x2:W-5,y2:Y(0),stroke:"#dde1e8"}));
 series.forEach(s=>{g.appendChild(svg("polyline",{points:s.y.map((v,i)=>X(i)+","+Y(v===null?0:v)).join(" "),fill:"none",stroke:s.color,"stroke-width":2}));
  s.y.forEach((v,i)=>{const c=svg("circle",{cx:X(i),cy:Y(v===null?0:v),r:2.2,fill:s.color});const t=svg("title");t.textContent=s.name+" L"+i+": "+fmt(v);c.appendChild(t);g.appendChild(c);});});
 axes(g,W,H,P,0,n-1,y0,y1,xl,yl);const lg=svg("text",{x:W-150,y:12});lg.textContent=series.map(s=>s.name).join(" / ");g.appendChild(lg);return g;}
function studiesPanel(){const box=document.getElementById("studies");(D.studies||[]).forEach(st=>{const c=st.counts,row=el("div",{class:"row"});
 const a=el("div",{class:"panel"});const q=t=>"\u201c"+showTok(t)+"\u201d";a.appendChild(el("h2",{},"Token study: "+q(st.target)+" against "+q(st.contrast)+" ("+st.created_at+")"));
 if(c.positions!==undefined)a.appendChild(el("p",{},q(st.target)+" is the model's top prediction "+c.predicted+" times and the next token "+c.occurs+" times in "+c.positions+" corpus tokens (both at once "+c.predicted_and_next+")."));
 a.appendChild(el("p",{},c.found+" prompt pair(s) from "+c.tried+" single-token substitution(s) tried."));
 const pt=el("table");const ph=el("tr");["clean prompt","substitution","m clean \u2192 corrupted"].forEach(h=>ph.appendChild(el("th",{},h)));pt.appendChild(ph);
 st.pairs.forEach(p=>{const tr=el("tr");[showTok(p.clean_text||""),p.substituted?showTok(p.substituted[0])+" \u2192 "+showTok(p.substituted[1]):"-",fmt(p.m_clean)+" \u2192 "+fmt(p.m_corrupted)].forEach(v=>tr.appendChild(el("td",{},v)));pt.appendChild(tr);});a.appendChild(pt);
 const nt=el("table");const nh=el("tr");["neuron","recovery","sd","congruence","token rank","ablation z","verdict"].forEach(h=>nh.appendChild(el("th",{},h)));nt.appendChild(nh);
 st.neurons.forEach(n=>{const tr=el("tr");[n.neuron,fmt(n.recovery),fmt(n.recovery_sd),fmt(n.congruence),n.token_rank,fmt(n.evidence?n.evidence.ablation_z:null)].forEach(v=>tr.appendChild(el("td",{},v)));
  const td=el("td");if(n.verdict)td.appendChild(el("span",{class:"tag "+n.verdict},n.verdict));tr.appendChild(td);nt.appendChild(tr);});a.appendChild(el("b",{},"neurons by mean exact recovery"));a.appendChild(nt);row.appendChild(a);
 const b=el("div",{class:"panel"});b.appendChild(el("h2",{},"Logit lens: logit("+showTok(st.target)+") \u2212 logit("+showTok(st.contrast)+") after each block"));
 b.appendChild(linePlot([{name:"clean",y:st.logit_lens.clean,color:"#2e7d32"},{name:"corrupted",y:st.logit_lens.corrupted,color:"#c62828"}],360,200,"layer","logit difference"));
 b.appendChild(el("h2",{},"Layer patching: recovery per layer"));
 b.appendChild(linePlot([{name:"attention",y:st.layer_patching.attn,color:"#1565c0"},{name:"MLP",y:st.layer_patching.mlp,color:"#ef6c00"}],360,200,"layer","recovery"));row.appendChild(b);
 if(st.curves&&st.curves.length){const cp=el("div",{class:"panel"});cp.appendChild(el("h2",{},"Activation vs top prediction of "+q(st.target)+" (the study's corpus pass)"));
  st.curves.forEach(cv=>{cp.appendChild(el("b",{},cv.neuron));cp.appendChild(curvePlot(cv));});row.appendChild(cp);}
 box.appendChild(row);});}
const PER=25;let page=0;
function pager(id){const p=document.getElementById(id);p.textContent="";const n=Math.ceil(D.cards.length/PER);if(n<2)return;
 for(let i=0;i<n;i++){const b=el("button",{type:"button"},String(i+1));if(i===page)b.disabled=true;b.addEventListener("click",()=>{page=i;draw();window.scrollTo(0,document.getElementById("cards-title").offsetTop);});p.appendChild(b);}}
function draw(){const box=document.getElementById("cards");box.textContent="";D.cards.slice(page*PER,(page+1)*PER).forEach(c=>box.appendChild(card(c)));pager("pager");pager("pager2");}
document.getElementById("title").textContent="discover report: "+D.model;
document.getElementById("sub").textContent="checkpoint "+D.checkpoint_id.slice(0,16)+" \\u00b7 "+D.architecture+(D.source_format==="gguf"?", GGUF "+(D.quantization||"unknown type"):"")+", "+D.n_layers+" layers \\u00d7 "+D.d_mlp+" neurons, vocab "+D.d_vocab+
 (D.corpus_pass?" \\u00b7 corpus pass: "+D.corpus_pass.tokens+" tokens":"")+(D.verify?" \\u00b7 verified on "+D.verify.tokens+" held-out tokens":"")+" \\u00b7 "+D.generated;
document.getElementById("cards-title").textContent="Candidates, strongest evidence first ("+D.cards.length+")";
rolesPlot();scatterPlot();verdictPlot();uniPanel();changesPanel();studiesPanel();draw();
</script></body></html>
"""
