"""The read verbs of the command line: `query token|neuron|roles|verdicts|changes` and `sql`. They
import neither torch nor transformers (a fresh process answers in a fraction of a second; tested)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from discover.cli.common import (
    add_store,
    default_model,
    open_store,
    print_json,
    table,
    toks,
    verb,
)
from discover.errors import DiscoverError


# ----------------------------------------------------------------------- query ----
def add_query(sub) -> None:
    p = verb(sub, "query", "Ask the store: neurons by token, one neuron, role candidates.",
              'discover query token " an" --model gpt2-large --top 20')
    qs = p.add_subparsers(dest="what", metavar="WHAT")
    qs.required = True

    t = verb(qs, "token", "Neurons ranked by congruence w_out . U[:, t] with a token (exact).",
              'discover query token " an" --model gpt2-large --top 20')
    t.add_argument("text", nargs="?", default=None, metavar="TEXT", help="the token's text, e.g. \" an\"")
    t.add_argument("--token-id", type=int, default=None, help="the token by id instead of text")
    t.add_argument("--negative", action="store_true", help="the most suppressing neurons instead")
    t.add_argument("--top", type=int, default=20, help="how many neurons (20)")
    _add_model_opt(t)
    t.set_defaults(func=_cmd_query_token)

    n = verb(qs, "neuron", "One neuron's statistics, roles and top/bottom tokens.",
              "discover query neuron L3.N120 --model gpt2-large --similar")
    n.add_argument("neuron", metavar="NEURON", help="L<layer>.N<index>, e.g. L3.N120")
    n.add_argument("--similar", action="store_true",
                   help="nearest neurons by w_out cosine, across layers and other scanned checkpoints")
    n.add_argument("--k", type=int, default=10, help="similar neurons per checkpoint (10)")
    n.add_argument("--examples", action="store_true",
                   help="activation statistics and max-activating examples from the latest `discover activations` pass")
    n.add_argument("--dla", action="store_true",
                   help="with --examples: the top examples by direct logit attribution to the true next token")
    n.add_argument("--examples-k", type=int, default=10, help="examples to show (10)")
    n.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                   help="shade tokens by activation with terminal colours (auto: when stdout is a terminal)")
    n.add_argument("--history", action="store_true",
                   help="follow the neuron through the checkpoints of a watched run (--model RUN_DIR)")
    n.add_argument("--at", type=int, default=None, metavar="STEP",
                   help="with --history: the neuron is named at this step (default: the newest checkpoint)")
    _add_model_opt(n)
    n.set_defaults(func=_cmd_query_neuron)

    c = verb(qs, "changes", "What changed between consecutive checkpoints of a watched training run.",
              "discover query changes --model runs/tiny")
    c.add_argument("--top", type=int, default=10, help="neurons whose statistics moved most, per checkpoint (10)")
    _add_model_opt(c)
    c.set_defaults(func=_cmd_query_changes)

    v = verb(qs, "verdicts", "The verdicts of the latest `discover verify` run, confirmed first.",
              "discover query verdicts --model gpt2-large --verdict confirmed")
    v.add_argument("--verdict", choices=("confirmed", "rejected", "inconclusive"), default=None,
                   help="only this verdict")
    v.add_argument("--kind", choices=("feature", "prediction", "suppression"), default=None, help="only this kind")
    v.add_argument("--top", type=int, default=50, help="how many (50)")
    _add_model_opt(v)
    v.set_defaults(func=_cmd_query_verdicts)

    r = verb(qs, "roles", "Role candidates, strongest first.",
              "discover query roles --model gpt2-large --role prediction --top 50")
    r.add_argument("--role", required=True,
                   help="prediction | suppression | partition | entropy | memory_management | signal_boosting")
    r.add_argument("--top", type=int, default=50, help="how many candidates (50)")
    _add_model_opt(r)
    r.set_defaults(func=_cmd_query_roles)


def _add_model_opt(p) -> None:
    p.add_argument("--model", default=None, metavar="MODEL",
                   help="the hub id or path that was scanned (default: the embedded default model)")
    add_store(p)
    p.add_argument("--json", action="store_true", help="JSON on stdout, nothing else")


def _model(args) -> str:
    return args.model or default_model()


def _cmd_query_token(args) -> int:
    from discover.query import query_token

    if args.text is None and args.token_id is None:
        raise DiscoverError('give the token text (e.g. " an") or --token-id')
    with open_store(args, read_only=True) as store:
        res = query_token(store, _model(args), args.text, token_id=args.token_id, top=args.top,
                          negative=args.negative)
    if args.json:
        print_json(res)
        return 0
    if res["tokenization"] and len(res["tokenization"]) > 1:
        print(res["note"])
    kind = "most negative" if args.negative else "most congruent"
    print(f"{kind} neurons for token {res['token']!r} (id {res['token_id']}):")
    print(table(["rank", "neuron", "congruence", "role", "kurtosis", "top tokens"],
                 [[r["rank"], r["neuron"], r["congruence"], r["role"], r["vocab_kurt"], toks(r["top_tokens"])]
                  for r in res["results"]]))
    return 0


def _cmd_query_neuron(args) -> int:
    from discover.query import query_neuron

    if args.history:
        return _neuron_history(args)
    with open_store(args, read_only=True) as store:
        res = query_neuron(store, _model(args), args.neuron, similar=args.similar, k_similar=args.k,
                           examples=args.examples or args.dla, kind="dla" if args.dla else "activation",
                           n_examples=args.examples_k)
    if args.json:
        print_json(res)
        return 0
    s = res["stats"]
    print(f"{res['neuron']} of {res['model']} (checkpoint {res['checkpoint_id'][:12]})")
    print("roles: " + (", ".join(f"{r['role']} ({r['score']:.3g})" for r in res["roles"]) or "none"))
    print(table(["statistic", "value"], [[k, v] for k, v in s.items() if k != "role"]))
    for side in ("top", "bottom"):
        print(f"\n{side} tokens:")
        print(table(["token", "id", "congruence", "cosine"],
                     [[repr(t["token"]), t["token_id"], t["congruence"], t["cosine"]] for t in res[f"{side}_tokens"]]))
    if args.similar:
        print("\nmost similar w_out (cosine):")
        print(table(["neuron", "cosine", "checkpoint", "model"],
                     [[r["neuron"], r["cosine"], r["checkpoint_id"][:12] + (" (this)" if r["same_checkpoint"] else ""),
                       r["model"]] for r in res["similar"]]))
    if "activity" in res:
        _print_activity(res["activity"], _use_color(args.color))
    return 0


def _neuron_history(args) -> int:
    from discover.track import neuron_history

    if not args.model:
        raise DiscoverError("--history needs --model RUN_DIR: the directory `discover watch` processed")
    with open_store(args, read_only=True) as store:
        res = neuron_history(store, args.model, args.neuron, at=args.at)
    if args.json:
        print_json(res)
        return 0
    print(f"{res['start']['neuron']} at step {res['start']['step']} of {res['series']}, followed through "
          f"{len(res['history'])} checkpoint(s) by weight matching:")
    print(table(["step", "neuron", "sim. to prev", "role", "kurtosis", "skew", "act freq", "act max", "confirmed"],
                 [[p["step"], p["neuron"], p["similarity_to_previous"], p["role"], p["vocab_kurt"], p["vocab_skew"],
                   p["act_freq"], p["act_max"], "; ".join(p["confirmed"]) or "-"] for p in res["history"]]))
    if not res["complete"]:
        print("(the chain stops where a checkpoint has no tracking rows)")
    return 0


def _cmd_query_changes(args) -> int:
    from discover.track import query_changes

    if not args.model:
        raise DiscoverError("give --model RUN_DIR: the directory `discover watch` processed")
    with open_store(args, read_only=True) as store:
        res = query_changes(store, args.model, top=args.top)
    if args.json:
        print_json(res)
        return 0
    rows = []
    for c in res["checkpoints"]:
        k = c["counts"]
        rows.append([c["step"], c["checkpoint_id"][:12], Path(c["path"]).name,
                     "-" if not c["prev_checkpoint_id"] else f"{k.get('role_gained', 0)}/{k.get('role_lost', 0)}",
                     "-" if not c["prev_checkpoint_id"] else
                     f"{k.get('verdict_confirmed', 0)}/{k.get('verdict_lost', 0)}",
                     c["match"]["similarity_median"] if c["match"] else None])
    print(table(["step", "checkpoint", "directory", "roles +/-", "verdicts +/-", "median match sim."], rows))
    for c in res["checkpoints"]:
        if not c["prev_checkpoint_id"]:
            continue
        print(f"\nstep {c['step']} ({Path(c['path']).name}) against the previous checkpoint:")
        if c["roles"]:
            print("  roles: " + ", ".join(f"{r} +{v['gained']}/-{v['lost']}" for r, v in c["roles"].items()))
        for v in c["verdicts"]:
            who = v["neuron_name"] or f"(was {v['prev_name']})"
            print(f"  {v['change'].replace('_', ' ')}: {who} {v['subject']} ({v['detail']})")
        if c["moved"]:
            print(table(["neuron", "was", "statistic", "before", "after", "change / spread"],
                         [[m["neuron_name"], m["prev_name"], m["subject"], m["old_value"], m["new_value"], m["score"]]
                          for m in c["moved"]]))
    return 0


def _use_color(mode: str) -> bool:
    if mode == "auto":
        return sys.stdout.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"
    return mode == "always"


_RAMP = (231, 230, 229, 222, 215, 208, 202)  # white -> orange (xterm-256 backgrounds)


def _show_token(t: str) -> str:
    return t.replace("\n", "\u21b5").replace("\r", "").replace("\t", "\u2192")


def shade_example(ex: dict, color: bool) -> str:
    """One example on one line: tokens shaded by value (colour) and the maximum marked."""
    vals = [t["value"] for t in ex["tokens"] if t["value"] is not None]
    top = max([v for v in vals if v > 0], default=0.0)
    out = []
    for i, t in enumerate(ex["tokens"]):
        text = _show_token(t["token"])
        is_max = i == ex["max_index"]
        if not color:
            out.append(f"\u27e6{text}\u27e7" if is_max else text)
            continue
        v = t["value"] or 0.0
        level = 0 if top <= 0 or v <= 0 else min(len(_RAMP) - 1, 1 + int(v / top * (len(_RAMP) - 1)))
        style = f"\x1b[48;5;{_RAMP[level]}m\x1b[38;5;16m" + ("\x1b[1;4m" if is_max else "")
        out.append(f"{style}{text}\x1b[0m")
    return "".join(out)


def _print_activity(act: dict, color: bool) -> None:
    c = act["corpus"]
    s = act["stats"]
    counted = s.get("act_tokens")
    routed = (f" ({counted:,} routed to this expert)" if counted is not None and counted != act["tokens"]
              else "")
    print(f"\nactivations over {act['tokens']:,} tokens{routed} of {c['kind']} corpus {c['path']} "
          f"(split {act['split']}, pass {act['pass_id']}):")
    print(table(["mean", "var", "skew", "kurtosis", "freq > 0", "min", "max"],
                 [[s["act_mean"], s["act_var"], s["act_skew"], s["act_kurt"], s["act_freq"], s["act_min"],
                   s["act_max"]]]))
    what = ("direct logit attribution to the true next token" if act["kind"] == "dla" else "activation")
    mark = "maximum in bold" if color else "maximum in \u27e6brackets\u27e7"
    print(f"\ntop examples by {what} (one per document; {mark}):")
    for ex in act["examples"]:
        print(f"#{ex['rank']:<3} {ex['value']:.4g}  {ex['doc_id']} @ token {ex['doc_token']}  {ex['token']!r}")
        print("     " + shade_example(ex, color))
    for cv in act["curves"]:
        print(f"\nactivation vs top prediction of {cv['token']!r} ({cv['source']}; adjacent bins merged "
              f"to about equal counts, --json has every bin):")
        print(table(["activation range", "positions", "top prediction", "fraction", "is next"],
                     [[(f"[{b['lo']:.3g}, {b['hi']:.3g})" if b["hi"] > 0 else f"({b['lo']:.3g}, {b['hi']:.3g}]"),
                       b["positions"], b["top_prediction"],
                       b["top_prediction"] / b["positions"], b["is_next"]] for b in _merge_bins(cv["bins"])]))


def _merge_bins(bins: list[dict], rows: int = 12) -> list[dict]:
    """Merge adjacent histogram bins, in order, into about `rows` groups of similar counts."""
    total = sum(b["positions"] for b in bins)
    target = max(1, total // rows)
    out: list[dict] = []
    for b in bins:
        cur = out[-1] if out else None
        if cur is None or cur["positions"] >= target:
            out.append({k: b[k] for k in ("lo", "hi", "positions", "top_prediction", "is_next")})
        else:
            cur["hi"] = b["hi"]
            for k in ("positions", "top_prediction", "is_next"):
                cur[k] += b[k]
    return out


def _num(ev: dict, key: str, spec: str) -> str:
    v = ev.get(key)
    return "-" if v is None else format(v, spec)


def _cmd_query_verdicts(args) -> int:
    from discover.verify import query_verdicts, subject_label

    with open_store(args, read_only=True) as store:
        res = query_verdicts(store, _model(args), verdict=args.verdict, kind=args.kind, top=args.top)
    if args.json:
        print_json(res)
        return 0
    print(f"verify {res['verify_id']}: {res['total']} hypotheses on {res['tokens']:,} tokens of "
          f"{res['corpus']['kind']} corpus {res['corpus']['path']}")
    rows = []
    for h in res["hypotheses"]:
        ev = h["evidence"]
        if h["kind"] == "feature":
            nums = f"AUROC {_num(ev, 'auroc', '.3f')}  F1 {_num(ev, 'f1', '.2f')}  q {_num(ev, 'q', '.1e')}"
        else:
            nums = f"AUROC(next) {_num(ev, 'auroc_next', '.3f')}  ablation z {_num(ev, 'ablation_z', '.2f')}"
        rows.append([h["neuron"], h["kind"], subject_label(h["subject"], ev), h["verdict"], nums, h["decided_by"]])
    print(table(["neuron", "kind", "subject", "verdict", "evidence", "decided by"], rows))
    return 0


def _cmd_query_roles(args) -> int:
    from discover.query import query_roles

    with open_store(args, read_only=True) as store:
        res = query_roles(store, _model(args), args.role, top=args.top)
    if args.json:
        print_json(res)
        return 0
    if not res:
        print(f"no {args.role} candidates (thresholds: see `discover scan --help`)")
        return 0
    print(table(["neuron", "score", "kurtosis", "skew", "var", "top tokens", "bottom tokens"],
                 [[r["neuron"], r["score"], r["vocab_kurt"], r["vocab_skew"], r["vocab_var"],
                   toks(r["top_tokens"]), toks(r["bottom_tokens"], 3)] for r in res]))
    return 0


# ------------------------------------------------------------------------- sql ----
def add_sql(sub) -> None:
    p = verb(sub, "sql", "Read-only SQL over the catalog (schema in the README).",
              'discover sql "SELECT layer, count(*) FROM roles WHERE role = \'prediction\' GROUP BY layer"')
    p.add_argument("query", metavar="SQL", help="one SQL statement (SELECT ...); the catalog is read-only")
    add_store(p)
    p.add_argument("--json", action="store_true", help="rows as a JSON array of objects")
    p.set_defaults(func=_cmd_sql)


def _cmd_sql(args) -> int:
    from discover.query import run_sql

    with open_store(args, read_only=True) as store:
        cols, rows = run_sql(store, args.query)
    if args.json:
        print_json([dict(zip(cols, r)) for r in rows])
    else:
        print(table(cols, [list(r) for r in rows]) if cols else "ok")
    return 0
