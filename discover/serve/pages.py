"""HTML of `discover serve`, rendered on the server from the same dictionaries the JSON API
returns. Every piece of text from a store (token strings, corpus text, model paths, rule names)
passes through `esc` or is placed as an attribute through `attr`: nothing a model or corpus holds
can become markup. Pages need no script; plots are inline SVG built here."""

from __future__ import annotations

import html
import math
from urllib.parse import quote, urlencode


class Html(str):
    """Markup built here (already escaped)."""


def esc(x) -> Html:
    if isinstance(x, Html):
        return x
    return Html(html.escape("" if x is None else str(x), quote=True))


def show_token(t) -> str:
    """A token as it reads: spaces and newlines made visible."""
    return "" if t is None else str(t).replace("\n", "\u21b5").replace("\t", "\u21e5").replace(" ", "\u2423")


def num(x, nd: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if isinstance(x, int):
        return f"{x:,}"
    return f"{x:.{nd}g}" if abs(x) < 1e4 else f"{x:,.0f}"


def href(path: str, **params) -> str:
    q = {k: v for k, v in params.items() if v is not None and v != ""}
    return path + ("?" + urlencode(q) if q else "")


def neuron_href(ckpt_id: str, neuron: str) -> str:
    return f"/neuron/{quote(ckpt_id[:12])}/{quote(neuron)}"


def link(url: str, text) -> Html:
    return Html(f'<a href="{esc(url)}">{esc(text)}</a>')


def tok(t) -> Html:
    return Html(f'<code class="tok">{esc(show_token(t))}</code>')


def toks(ts, k: int = 6) -> Html:
    return Html(" ".join(tok(t) for t in list(ts)[:k]))


def table(headers: list, rows: list[list], cls: str = "") -> Html:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    return Html(f'<table class="{esc(cls)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>')


CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
header{background:#1d2a44;color:#fff;padding:10px 20px;display:flex;gap:18px;align-items:center}
header a{color:#cfe0ff;text-decoration:none}header form{margin-left:auto}
header input[type=text]{width:280px;padding:4px 6px}main{padding:16px 20px;max-width:1200px}
.card{background:#fff;border:1px solid #dde1e8;border-radius:6px;padding:12px 16px;margin:0 0 14px;overflow-x:auto}
table{border-collapse:collapse}td,th{padding:3px 8px;border-bottom:1px solid #eceef2;text-align:left;vertical-align:top}
th{background:#f0f2f6}code.tok{background:#eef1f6;border-radius:3px;padding:0 3px;white-space:pre-wrap;word-break:break-all}
.ex{font-family:ui-monospace,monospace;white-space:pre-wrap;word-break:break-all;margin:4px 0}
.ex span{border-radius:2px}.ex .max{outline:2px solid #c0392b}.err{color:#a61b1b}small{color:#5d6675}
.probe span{display:inline-block;margin:1px;padding:1px 3px;border-radius:3px;font-family:ui-monospace,monospace}
"""


def page(title: str, body: str, q: str = "") -> str:
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{esc(title)} - discover</title>"
            f"<meta name=viewport content='width=device-width'><style>{CSS}</style></head><body>"
            f"<header><a href='/'><b>discover</b></a><a href='/roles'>roles</a><a href='/verdicts'>verdicts</a>"
            f"<a href='/docs/api'>API</a><form action='/search' method=get role=search>"
            f"<input type=text name=q id=q placeholder='token text, e.g. \" an\", or #id' value=\"{esc(q)}\">"
            f" <button id=go>search</button></form></header><main><h1>{esc(title)}</h1>{body}</main></body></html>")


def card(title: str, body: str) -> Html:
    return Html(f'<section class="card"><h2>{esc(title)}</h2>{body}</section>')


def error_page(status: int, message: str) -> str:
    return page(f"{status}", f'<p class="err" id="error">{esc(message)}</p>')


# -------------------------------------------------------------------------- plots
def bars_svg(items: list[tuple[str, float]], color: str = "#3b6fd4", width: int = 420) -> Html:
    """Horizontal bars, one per (label, value), labels as SVG text (escaped)."""
    if not items:
        return Html("")
    m = max(abs(v) for _, v in items) or 1.0
    rowh, lw = 18, 120
    out = [f'<svg width="{width}" height="{rowh * len(items) + 4}" role="img">']
    for i, (label, v) in enumerate(items):
        w = (width - lw - 60) * abs(v) / m
        y = 2 + i * rowh
        out.append(f'<text x="0" y="{y + 13}" font-size="12">{esc(show_token(label)[:16])}</text>'
                   f'<rect x="{lw}" y="{y + 3}" width="{w:.1f}" height="{rowh - 6}" fill="{color}"/>'
                   f'<text x="{lw + w + 4:.1f}" y="{y + 13}" font-size="11">{esc(num(v))}</text>')
    return Html("".join(out) + "</svg>")


def curve_svg(bins: list[dict], width: int = 420, height: int = 180) -> Html:
    """Fraction of positions where the token is the top prediction, per activation bin (x: bin
    order, low to high activation); bar opacity shows how many positions a bin holds."""
    bins = [b for b in bins if b["positions"] > 0]
    if not bins:
        return Html("")
    P = 30
    bw = (width - P - 6) / len(bins)
    nmax = max(b["positions"] for b in bins)
    out = [f'<svg width="{width}" height="{height}" role="img">',
           f'<line x1="{P}" y1="{height - P}" x2="{width}" y2="{height - P}" stroke="#99a"/>',
           f'<text x="2" y="12" font-size="10">1</text><text x="2" y="{height - P}" font-size="10">0</text>',
           f'<text x="{P}" y="{height - 4}" font-size="10">activation bins, low to high '
           f'({esc(num(bins[0]["lo"]))} .. {esc(num(bins[-1]["hi"]))})</text>']
    for i, b in enumerate(bins):
        f = b["top_prediction"] / b["positions"]
        h = (height - P - 8) * f
        op = 0.25 + 0.75 * b["positions"] / nmax
        out.append(f'<rect x="{P + i * bw + 1:.1f}" y="{height - P - h:.1f}" width="{max(1.0, bw - 2):.1f}" '
                   f'height="{h:.1f}" fill="#c0392b" fill-opacity="{op:.2f}"><title>'
                   f'[{esc(num(b["lo"]))}, {esc(num(b["hi"]))}): {b["top_prediction"]} of {b["positions"]} '
                   f'positions top prediction</title></rect>')
    return Html("".join(out) + "</svg>")


def shade(tokens: list[dict], values: list, max_index: int | None = None, cls: str = "ex") -> Html:
    """Tokens shaded by value: orange for positive, blue for negative, relative to the largest |value|."""
    vals = [v for v in values if v is not None]
    top = max([abs(v) for v in vals], default=0.0) or 1.0
    out = []
    for i, (t, v) in enumerate(zip(tokens, values)):
        a = 0.0 if v is None else min(1.0, abs(v) / top)
        rgb = "230,126,34" if (v or 0) >= 0 else "52,120,220"
        mark = ' class="max"' if i == max_index else ""
        out.append(f'<span{mark} style="background:rgba({rgb},{a:.2f})" title="{esc(num(v))}">'
                   f'{esc(show_token(t["token"]))}</span>')
    return Html(f'<div class="{cls}">' + "".join(out) + "</div>")


# -------------------------------------------------------------------------- pages
def home(models: list[dict]) -> str:
    rows = [[link(f"/model/{m['id']}", m["id"]), Html("<br>".join(esc(s) for s in m["specs"][:3])),
             m["architecture"], m["n_layers"], num(m["d_mlp"]), num(m["d_vocab"]), m["scanned_at"],
             Html(" ".join([link(href("/roles", model=m["id"]), "roles"), link(href("/verdicts", model=m["id"]), "verdicts"),
                            link(f"/studies/{m['id']}", "studies"), link(href("/probe", model=m["id"]), "probe")]))]
            for m in models]
    body = ("<p>Search a token above (both signs, every model), or open a model.</p>" +
            card("models in this store", table(["checkpoint", "scanned as", "architecture", "layers", "neurons/layer",
                                               "vocabulary", "scanned", ""], rows)))
    return page("neurons", body)


def search(res: dict, q: str) -> str:
    parts = []
    for m in res["models"]:
        if "error" in m:
            parts.append(card(f"checkpoint {m['id']}", Html(f'<p class="err">{esc(m["error"])}</p>')))
            continue
        note = Html(f"<p><small>{esc(m['note'])}</small></p>") if m.get("note") else Html("")
        body = [note]
        for side, title in (("positive", "writes the token (most congruent)"), ("negative", "writes against it")):
            rows = [[r["rank"], link(neuron_href(m["checkpoint_id"], r["neuron"]), r["neuron"]), num(r["congruence"]),
                     r["role"] or "", num(r["vocab_kurt"]), toks(r["top_tokens"], 5)] for r in m[side]]
            body.append(Html(f"<h3>{esc(title)}</h3>") + table(["rank", "neuron", "congruence", "role", "kurtosis",
                                                                "top tokens"], rows, cls=f"results {side}"))
        parts.append(card(f"checkpoint {m['id']}: token {show_token(m['token'])!r} (id {m['token_id']})",
                          Html("".join(body))))
    return page(f"search {q!r}", "".join(parts) or "<p>nothing found</p>", q=q)


def neuron(d: dict) -> str:
    cid, name = d["checkpoint_id"], d["neuron"]
    s = d["stats"]
    parts = [card("statistics and roles", Html(
        "<p>roles: " + (", ".join(f"{esc(r['role'])} ({esc(num(r['score']))})" for r in d["roles"]) or "none") + "</p>" +
        table(["statistic", "value"], [[k, num(v) if v is None or isinstance(v, (int, float)) else v] for k, v in s.items()])))]
    parts.append(card("vocabulary: top and bottom tokens (congruence w_out . U)", Html(
        "<div style='display:flex;gap:24px;flex-wrap:wrap'>" +
        "<div><h3>top</h3>" + bars_svg([(t["token"], t["congruence"]) for t in d["top_tokens"]][:15]) + "</div>" +
        "<div><h3>bottom</h3>" + bars_svg([(t["token"], t["congruence"]) for t in d["bottom_tokens"]][:15], "#c0392b") +
        "</div></div>")))
    act = d.get("activity")
    if act:
        ex = "".join(f"<p><small>#{e['rank']} value {esc(num(e['value']))} in {esc(e['doc_id'])} at token "
                     f"{e['doc_token']}</small></p>" + shade(e["tokens"], [t["value"] for t in e["tokens"]], e["max_index"])
                     for e in act["examples"])
        parts.append(card(f"max-activating examples ({act['tokens']:,} tokens of {act['corpus'].get('path', '')})",
                          Html(ex or "<p>none</p>")))
        curves = "".join(f"<div><h3>{esc(show_token(c['token']))} ({esc(c['source'])})</h3>{curve_svg(c['bins'])}</div>"
                         for c in act["curves"])
        if curves:
            parts.append(card("activation vs top prediction", Html(f"<div style='display:flex;gap:24px;flex-wrap:wrap'>"
                                                                   f"{curves}</div>")))
    if d["verdicts"]:
        rows = [[v["kind"], tok(v["subject"]), v["verdict"], v["decided_by"],
                 ", ".join(f"{k} {num(x)}" for k, x in v["evidence"].items() if isinstance(x, (int, float)))[:400]]
                for v in d["verdicts"]]
        parts.append(card("verdicts", table(["kind", "subject", "verdict", "decided by", "evidence"], rows)))
    if d["studies"] or d["patching"]:
        rows = [[link(f"/study/{st['study_id']}", st["target"]), st["contrast"], num(st["recovery"]),
                 num(st["recovery_sd"]), st["created_at"]] for st in d["studies"]]
        rows += [[p["target"], p["contrast"], num(p["recovery"]), f"attribution {num(p['attribution'])}",
                  (p["clean"] or "")[:60]] for p in d["patching"]]
        parts.append(card("token studies and patching", table(["target", "contrast", "recovery", "sd", "when / prompt"],
                                                              rows)))
    if d.get("similar"):
        rows = [[link(neuron_href(r["checkpoint_id"], r["neuron"]), r["neuron"]), num(r["cosine"]),
                 r["checkpoint_id"][:12] + (" (this)" if r["same_checkpoint"] else ""), r["model"]] for r in d["similar"]]
        parts.append(card("similar w_out (cosine), across layers and checkpoints",
                          table(["neuron", "cosine", "checkpoint", "model"], rows)))
    h = d.get("history")
    if h:
        rows = [[p["step"], link(neuron_href(p["checkpoint_id"], p["neuron"]), p["neuron"]) if p.get("checkpoint_id")
                 else p["neuron"], num(p["similarity_to_previous"]), p["role"] or "", num(p["vocab_kurt"]),
                 "; ".join(p["confirmed"]) or "-"] for p in h["history"]]
        parts.append(card("history through the watched run", table(["step", "neuron", "sim. to prev", "role", "kurtosis",
                                                                    "confirmed"], rows)))
    parts.append(card("probe", Html(
        f"<form action='/probe' method=get><input type=hidden name=model value=\"{esc(cid[:12])}\">"
        f"<input type=hidden name=neuron value=\"{esc(name)}\"><textarea name=text id=probe-text rows=3 cols=70>"
        f"</textarea><br><button id=probe-go>show activations</button> <small>(loads the model once)</small></form>")))
    return page(f"{name} of {cid[:12]}", "".join(parts))


def pager(path: str, params: dict, offset: int, limit: int, total: int) -> Html:
    links = []
    if offset > 0:
        links.append(link(href(path, **params, offset=max(0, offset - limit), limit=limit), "previous"))
    if offset + limit < total:
        links.append(link(href(path, **params, offset=offset + limit, limit=limit), "next"))
    return Html(f"<p>{offset + 1 if total else 0}-{min(total, offset + limit)} of {total:,} " + " ".join(links) + "</p>")


def roles_page(res: dict, roles_all: tuple) -> str:
    opts = "".join(f"<option{' selected' if r == res['role'] else ''}>{esc(r)}</option>" for r in roles_all)
    form = Html(f"<form action='/roles' method=get><input type=hidden name=model value=\"{esc(res['id'])}\">"
                f"<select name=role>{opts}</select> <button>show</button></form>")
    rows = [[link(neuron_href(res["checkpoint_id"], r["neuron"]), r["neuron"]), num(r["score"]), num(r["vocab_kurt"]),
             num(r["vocab_skew"]), toks(r["top_tokens"], 5), toks(r["bottom_tokens"], 3)] for r in res["rows"]]
    return page(f"{res['role']} neurons of {res['id']}", form + pager(
        "/roles", {"model": res["id"], "role": res["role"]}, res["offset"], res["limit"], res["total"]) +
        table(["neuron", "score", "kurtosis", "skew", "top tokens", "bottom tokens"], rows, cls="results"))


def verdicts_page(res: dict, verdict: str | None, kind: str | None) -> str:
    def sel(name, cur, options):
        o = "".join(f"<option value=\"{esc(x)}\"{' selected' if x == (cur or '') else ''}>{esc(x or 'any')}</option>"
                    for x in options)
        return f"<select name={name}>{o}</select>"

    form = Html(f"<form action='/verdicts' method=get><input type=hidden name=model value=\"{esc(res['id'])}\">"
                f"{sel('verdict', verdict, ['', 'confirmed', 'inconclusive', 'rejected'])} "
                f"{sel('kind', kind, ['', 'feature', 'prediction', 'suppression'])} <button>filter</button></form>")
    rows = []
    for h in res["hypotheses"]:
        ev = h["evidence"]
        nums = (f"AUROC {num(ev.get('auroc'))} F1 {num(ev.get('f1'))}" if h["kind"] == "feature" else
                f"AUROC(next) {num(ev.get('auroc_next'))} ablation z {num(ev.get('ablation_z'))}")
        rows.append([link(neuron_href(res["checkpoint_id"], h["neuron"]), h["neuron"]), h["kind"], tok(h["subject"]),
                     h["verdict"], nums, h["decided_by"]])
    return page(f"verdicts of {res['id']}", form + Html(
        f"<p>verify {esc(res['verify_id'])}: {res['total']:,} hypotheses on {res['tokens']:,} held-out tokens</p>") +
        pager("/verdicts", {"model": res["id"], "verdict": verdict, "kind": kind}, res["offset"], res["limit"],
              res["total"]) + table(["neuron", "kind", "subject", "verdict", "evidence", "decided by"], rows,
                                    cls="results"))


def studies_page(model_id: str, rows: list[dict]) -> str:
    t = [[link(f"/study/{s['study_id']}", s["target"]), s["contrast"], num((s["counts"] or {}).get("predicted")),
          num((s["counts"] or {}).get("occurs")), len(s["pairs"] or []), s["created_at"]] for s in rows]
    return page(f"token studies of {model_id}", table(["target", "contrast", "predicted", "occurs", "pairs", "when"], t)
                if t else "<p>no token studies: run <code>discover study TOKEN MODEL</code></p>")


def study_page(s: dict) -> str:
    c = s.get("counts") or {}
    head = Html(f"<p>{esc(show_token(s['target']))} against {esc(show_token(s['contrast']))}: predicted "
                f"{esc(num(c.get('predicted')))} times, occurs {esc(num(c.get('occurs')))} times; "
                f"{esc(num(c.get('found')))} prompt pairs found of {esc(num(c.get('tried')))} tried</p>")
    rows = [[link(neuron_href(s["checkpoint_id"], n["neuron"]), n["neuron"]), num(n.get("recovery")),
             num(n.get("recovery_sd")), num(n.get("congruence")), n.get("token_rank"), n.get("verdict", "")]
            for n in s.get("neurons") or []]
    lens = s.get("logit_lens") or {}
    lens_rows = [[i, num(a), num(b)] for i, (a, b) in enumerate(zip(lens.get("clean", []), lens.get("corrupted", [])))]
    return page(f"token study {show_token(s['target'])!r} of {s['id']}", head + card(
        "neurons ranked by mean exact recovery", table(["neuron", "recovery", "sd", "congruence", "token rank", "verdict"],
                                                       rows)) + card("logit lens (mean logit difference after each block)",
                                                                     table(["block", "clean", "corrupted"], lens_rows)))


def probe_page(model_id: str, neuron: str | None, text: str, res: dict | None, error: str | None) -> str:
    form = Html(f"<form action='/probe' method=get><input type=hidden name=model value=\"{esc(model_id)}\">"
                f"neuron <input type=text name=neuron id=probe-neuron value=\"{esc(neuron or '')}\" size=12> "
                f"<br><textarea name=text id=probe-text rows=3 cols=70>{esc(text)}</textarea><br>"
                f"<button id=probe-go>show activations</button></form>")
    body = [form]
    if error:
        body.append(Html(f'<p class="err" id="error">{esc(error)}</p>'))
    if res:
        if "values" in res:
            body.append(card(f"{res['neuron']} on every token", shade(res["tokens"], res["values"], cls="probe")))
        for side, title in (("top", "highest activations"), ("bottom", "lowest activations")):
            rows = [[link(neuron_href(res["checkpoint_id"], r["neuron"]), r["neuron"]), num(r["activation"])]
                    for r in res[side]]
            at = res["tokens"][res["position"]]["token"]
            body.append(card(f"{title} at position {res['position']} ({show_token(at)!r})",
                             table(["neuron", "activation"], rows, cls=f"probe-{side}")))
        pos_links = " ".join(link(href("/probe", model=model_id, neuron=neuron, text=text, position=t["position"]),
                                  show_token(t["token"])) for t in res["tokens"][:200])
        body.append(card("choose the position", Html(f"<p>{pos_links}</p>")))
    return page(f"probe {model_id}", "".join(body))
