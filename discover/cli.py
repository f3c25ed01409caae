"""The `discover` command line: parse arguments, open the store, call one library function,
format the result. Every user error becomes one line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from discover.cli_causal import add_patch, add_study
from discover.cli_common import add_model_arg as _add_model_arg
from discover.cli_common import add_store as _add_store
from discover.cli_common import default_model as _default_model
from discover.cli_common import open_store as _open_store
from discover.cli_common import print_json as _print_json
from discover.cli_common import settings as _settings
from discover.cli_common import table as _table
from discover.cli_common import toks as _toks
from discover.cli_common import verb as _verb
from discover.cli_runs import add_train, add_universality, add_watch
from discover.errors import DiscoverError, first_line


# ------------------------------------------------------------------------ scan ----
def _add_scan(sub) -> None:
    p = _verb(sub, "scan", "Scan every MLP neuron of a model into the store (weights only).",
              'discover scan gpt2-large --store indexes')
    _add_model_arg(p)
    _add_store(p)
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow pickle .bin weights (loaded with weights_only=True)")
    p.add_argument("--top-k", type=int, default=20, help="top and bottom tokens kept per neuron (20)")
    p.add_argument("--token-top-k", type=int, default=50,
                   help="neurons kept per token and sign: the exact depth of `query token` (50)")
    p.add_argument("--chunk-rows", type=int, default=1024,
                   help="neurons per matmul chunk (1024: a (1024, vocab) float32 block, 206 MB for GPT-2)")
    p.add_argument("--kurtosis", type=float, default=10.0,
                   help="prediction/suppression: vocabulary kurtosis above this (10)")
    p.add_argument("--partition-var", type=float, default=5.12,
                   help="partition: vocabulary variance above this / d_model (5.12)")
    p.add_argument("--entropy-norm-z", type=float, default=3.0,
                   help="entropy: ||w_out|| z-score at least this (3)")
    p.add_argument("--entropy-var", type=float, default=0.5,
                   help="entropy: vocabulary variance below this / d_model (0.5)")
    p.add_argument("--io-cos", type=float, default=0.5,
                   help="memory management / signal boosting: |cos(w_in, w_out)| above this (0.5)")
    p.add_argument("--force", action="store_true", help="rescan even if this checkpoint is in the store")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_cmd_scan)


def _cmd_scan(args) -> int:
    from dataclasses import asdict

    from discover.scan import RoleThresholds, ScanConfig, scan_model

    cfg = _settings("scan", lambda: ScanConfig(
        top_k=args.top_k, token_top_k=args.token_top_k, chunk_rows=args.chunk_rows,
        roles=RoleThresholds(kurtosis=args.kurtosis, partition_var=args.partition_var,
                             entropy_norm_z=args.entropy_norm_z, entropy_var=args.entropy_var,
                             io_cos=args.io_cos),
    ))
    from discover.adapter import identify

    # check the model before the store is created or touched
    model = args.model or _default_model()
    identity = identify(model, allow_pickle=args.allow_pickle)
    with _open_store(args, read_only=False) as store:
        summary = scan_model(model, store, cfg, allow_pickle=args.allow_pickle,
                             progress=not args.json, force=args.force, identity=identity)
    if args.json:
        _print_json(asdict(summary))
        return 0
    what = {"scanned": "scanned", "unchanged": "already in the store, nothing to do",
            "roles-updated": "already in the store; roles re-derived with the new thresholds"}[summary.status]
    print(f"{summary.spec}: {what} (checkpoint {summary.checkpoint_id[:12]}, {summary.n_layers} layers x "
          f"{summary.d_mlp} neurons, d_model {summary.d_model}, vocab {summary.d_vocab}, {summary.seconds:.1f} s)")
    print("roles: " + ", ".join(f"{r} {c}" for r, c in summary.role_counts.items()))
    return 0


# ----------------------------------------------------------------------- query ----
def _add_query(sub) -> None:
    p = _verb(sub, "query", "Ask the store: neurons by token, one neuron, role candidates.",
              'discover query token " an" --model gpt2-large --top 20')
    qs = p.add_subparsers(dest="what", metavar="WHAT")
    qs.required = True

    t = _verb(qs, "token", "Neurons ranked by congruence w_out . U[:, t] with a token (exact).",
              'discover query token " an" --model gpt2-large --top 20')
    t.add_argument("text", nargs="?", default=None, metavar="TEXT", help="the token's text, e.g. \" an\"")
    t.add_argument("--token-id", type=int, default=None, help="the token by id instead of text")
    t.add_argument("--negative", action="store_true", help="the most suppressing neurons instead")
    t.add_argument("--top", type=int, default=20, help="how many neurons (20)")
    _add_model_opt(t)
    t.set_defaults(func=_cmd_query_token)

    n = _verb(qs, "neuron", "One neuron's statistics, roles and top/bottom tokens.",
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

    c = _verb(qs, "changes", "What changed between consecutive checkpoints of a watched training run.",
              "discover query changes --model runs/tiny")
    c.add_argument("--top", type=int, default=10, help="neurons whose statistics moved most, per checkpoint (10)")
    _add_model_opt(c)
    c.set_defaults(func=_cmd_query_changes)

    v = _verb(qs, "verdicts", "The verdicts of the latest `discover verify` run, confirmed first.",
              "discover query verdicts --model gpt2-large --verdict confirmed")
    v.add_argument("--verdict", choices=("confirmed", "rejected", "inconclusive"), default=None,
                   help="only this verdict")
    v.add_argument("--kind", choices=("feature", "prediction", "suppression"), default=None, help="only this kind")
    v.add_argument("--top", type=int, default=50, help="how many (50)")
    _add_model_opt(v)
    v.set_defaults(func=_cmd_query_verdicts)

    r = _verb(qs, "roles", "Role candidates, strongest first.",
              "discover query roles --model gpt2-large --role prediction --top 50")
    r.add_argument("--role", required=True,
                   help="prediction | suppression | partition | entropy | memory_management | signal_boosting")
    r.add_argument("--top", type=int, default=50, help="how many candidates (50)")
    _add_model_opt(r)
    r.set_defaults(func=_cmd_query_roles)


def _add_model_opt(p) -> None:
    p.add_argument("--model", default=None, metavar="MODEL",
                   help="the hub id or path that was scanned (default: the embedded default model)")
    _add_store(p)
    p.add_argument("--json", action="store_true", help="JSON on stdout, nothing else")


def _model(args) -> str:
    return args.model or _default_model()


def _cmd_query_token(args) -> int:
    from discover.query import query_token

    if args.text is None and args.token_id is None:
        raise DiscoverError('give the token text (e.g. " an") or --token-id')
    with _open_store(args, read_only=True) as store:
        res = query_token(store, _model(args), args.text, token_id=args.token_id, top=args.top,
                          negative=args.negative)
    if args.json:
        _print_json(res)
        return 0
    if res["tokenization"] and len(res["tokenization"]) > 1:
        print(res["note"])
    kind = "most negative" if args.negative else "most congruent"
    print(f"{kind} neurons for token {res['token']!r} (id {res['token_id']}):")
    print(_table(["rank", "neuron", "congruence", "role", "kurtosis", "top tokens"],
                 [[r["rank"], r["neuron"], r["congruence"], r["role"], r["vocab_kurt"], _toks(r["top_tokens"])]
                  for r in res["results"]]))
    return 0


def _cmd_query_neuron(args) -> int:
    from discover.query import query_neuron

    if args.history:
        return _neuron_history(args)
    with _open_store(args, read_only=True) as store:
        res = query_neuron(store, _model(args), args.neuron, similar=args.similar, k_similar=args.k,
                           examples=args.examples or args.dla, kind="dla" if args.dla else "activation",
                           n_examples=args.examples_k)
    if args.json:
        _print_json(res)
        return 0
    s = res["stats"]
    print(f"{res['neuron']} of {res['model']} (checkpoint {res['checkpoint_id'][:12]})")
    print("roles: " + (", ".join(f"{r['role']} ({r['score']:.3g})" for r in res["roles"]) or "none"))
    print(_table(["statistic", "value"], [[k, v] for k, v in s.items() if k != "role"]))
    for side in ("top", "bottom"):
        print(f"\n{side} tokens:")
        print(_table(["token", "id", "congruence", "cosine"],
                     [[repr(t["token"]), t["token_id"], t["congruence"], t["cosine"]] for t in res[f"{side}_tokens"]]))
    if args.similar:
        print("\nmost similar w_out (cosine):")
        print(_table(["neuron", "cosine", "checkpoint", "model"],
                     [[r["neuron"], r["cosine"], r["checkpoint_id"][:12] + (" (this)" if r["same_checkpoint"] else ""),
                       r["model"]] for r in res["similar"]]))
    if "activity" in res:
        _print_activity(res["activity"], _use_color(args.color))
    return 0


def _neuron_history(args) -> int:
    from discover.track import neuron_history

    if not args.model:
        raise DiscoverError("--history needs --model RUN_DIR: the directory `discover watch` processed")
    with _open_store(args, read_only=True) as store:
        res = neuron_history(store, args.model, args.neuron, at=args.at)
    if args.json:
        _print_json(res)
        return 0
    print(f"{res['start']['neuron']} at step {res['start']['step']} of {res['series']}, followed through "
          f"{len(res['history'])} checkpoint(s) by weight matching:")
    print(_table(["step", "neuron", "sim. to prev", "role", "kurtosis", "skew", "act freq", "act max", "confirmed"],
                 [[p["step"], p["neuron"], p["similarity_to_previous"], p["role"], p["vocab_kurt"], p["vocab_skew"],
                   p["act_freq"], p["act_max"], "; ".join(p["confirmed"]) or "-"] for p in res["history"]]))
    if not res["complete"]:
        print("(the chain stops where a checkpoint has no tracking rows)")
    return 0


def _cmd_query_changes(args) -> int:
    from discover.track import query_changes

    if not args.model:
        raise DiscoverError("give --model RUN_DIR: the directory `discover watch` processed")
    with _open_store(args, read_only=True) as store:
        res = query_changes(store, args.model, top=args.top)
    if args.json:
        _print_json(res)
        return 0
    rows = []
    for c in res["checkpoints"]:
        k = c["counts"]
        rows.append([c["step"], c["checkpoint_id"][:12], Path(c["path"]).name,
                     "-" if not c["prev_checkpoint_id"] else f"{k.get('role_gained', 0)}/{k.get('role_lost', 0)}",
                     "-" if not c["prev_checkpoint_id"] else
                     f"{k.get('verdict_confirmed', 0)}/{k.get('verdict_lost', 0)}",
                     c["match"]["similarity_median"] if c["match"] else None])
    print(_table(["step", "checkpoint", "directory", "roles +/-", "verdicts +/-", "median match sim."], rows))
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
            print(_table(["neuron", "was", "statistic", "before", "after", "change / spread"],
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
    print(_table(["mean", "var", "skew", "kurtosis", "freq > 0", "min", "max"],
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
        print(_table(["activation range", "positions", "top prediction", "fraction", "is next"],
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

    with _open_store(args, read_only=True) as store:
        res = query_verdicts(store, _model(args), verdict=args.verdict, kind=args.kind, top=args.top)
    if args.json:
        _print_json(res)
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
    print(_table(["neuron", "kind", "subject", "verdict", "evidence", "decided by"], rows))
    return 0


def _cmd_query_roles(args) -> int:
    from discover.query import query_roles

    with _open_store(args, read_only=True) as store:
        res = query_roles(store, _model(args), args.role, top=args.top)
    if args.json:
        _print_json(res)
        return 0
    if not res:
        print(f"no {args.role} candidates (thresholds: see `discover scan --help`)")
        return 0
    print(_table(["neuron", "score", "kurtosis", "skew", "var", "top tokens", "bottom tokens"],
                 [[r["neuron"], r["score"], r["vocab_kurt"], r["vocab_skew"], r["vocab_var"],
                   _toks(r["top_tokens"]), _toks(r["bottom_tokens"], 3)] for r in res]))
    return 0


# ------------------------------------------------------------------------- sql ----
def _add_sql(sub) -> None:
    p = _verb(sub, "sql", "Read-only SQL over the catalog (schema in the README).",
              'discover sql "SELECT layer, count(*) FROM roles WHERE role = \'prediction\' GROUP BY layer"')
    p.add_argument("query", metavar="SQL", help="one SQL statement (SELECT ...); the catalog is read-only")
    _add_store(p)
    p.add_argument("--json", action="store_true", help="rows as a JSON array of objects")
    p.set_defaults(func=_cmd_sql)


def _cmd_sql(args) -> int:
    from discover.query import run_sql

    with _open_store(args, read_only=True) as store:
        cols, rows = run_sql(store, args.query)
    if args.json:
        _print_json([dict(zip(cols, r)) for r in rows])
    else:
        print(_table(cols, [list(r) for r in rows]) if cols else "ok")
    return 0


# ------------------------------------------------------------------ activations ----
def _add_activations(sub) -> None:
    p = _verb(sub, "activations",
              "Run the model over corpus text: exact activation statistics, max-activating examples, "
              "histograms and activation-vs-prediction curves for every neuron (resumable, extendable).",
              "discover activations gpt2-large --corpus pile-10k.jsonl --tokens 2000000 --pair 'L31.N892:\" an\"'")
    _add_model_arg(p)
    p.add_argument("--corpus", metavar="SPEC", default=None,
                   help="default, a text file, a directory, FILE.jsonl, FILE.parquet, a datasets dir "
                        "(see `discover train --help`; default: the built-in default corpus)")
    p.add_argument("--text-field", metavar="NAME", default="text", help="JSONL field / column holding text (text)")
    p.add_argument("--split", choices=("all", "train", "heldout"), default="all", help="documents to read (all)")
    p.add_argument("--tokens", type=int, default=1_000_000, metavar="N",
                   help="document tokens to process, in whole batches; more than before extends the pass (1000000)")
    p.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help="sequences per forward pass (default: from a 1.5 GB activation budget, at most 32)")
    p.add_argument("--context", type=int, default=None, metavar="N",
                   help="tokens per sequence including the BOS (default: the model's, at most 256)")
    p.add_argument("--top-k", type=int, default=20, metavar="K", help="examples kept per neuron and kind (20)")
    p.add_argument("--pair", action="append", default=[], metavar="L1.N42:TOKEN",
                   help="also record the activation-vs-prediction curve of this neuron and token (repeatable)")
    p.add_argument("--max-candidates", type=int, default=256, metavar="N",
                   help="strongest prediction/suppression candidates of the scan that get curves (256)")
    p.add_argument("--save-every", type=float, default=30.0, metavar="S",
                   help="seconds between saves of the resumable state (30)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (cpu)")
    p.add_argument("--allow-pickle", action="store_true", help="allow pickle .bin weights")
    _add_store(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_cmd_activations)


def _cmd_activations(args) -> int:
    from dataclasses import asdict

    from discover.activations import ActivationConfig, prepare, run_activations

    cfg = _settings("activations", lambda: ActivationConfig(
        tokens=args.tokens, batch_size=args.batch_size, context=args.context, top_k=args.top_k, split=args.split,
        pairs=tuple(args.pair), max_candidates=args.max_candidates, save_every=args.save_every, device=args.device))
    model = args.model or _default_model()
    # model, pairs and corpus are checked before the store is created or touched
    plan = prepare(model, cfg, corpus=args.corpus, text_field=args.text_field, allow_pickle=args.allow_pickle)
    with _open_store(args, read_only=False) as store:
        try:
            res = run_activations(model, store, cfg, progress=not args.json, plan=plan)
        except KeyboardInterrupt:
            print("discover: interrupted; the catalog keeps the last committed results; rerun the same "
                  "command to continue from the last saved state", file=sys.stderr)
            return 130
    if args.json:
        _print_json(asdict(res))
        return 0
    what = {"ran": "processed", "extended": "extended to", "resumed": "resumed and finished at",
            "unchanged": "already had"}[res.status]
    c = res.corpus
    print(f"pass {res.pass_id} (checkpoint {res.checkpoint_id[:12]}): {what} {res.tokens:,} tokens "
          f"({res.sequences:,} sequences, {res.documents:,} documents of {c['kind']} corpus {c['path']})"
          + (f" at {res.tokens_per_second:,.0f} tokens/s" if res.tokens_per_second else ""))
    if res.exhausted:
        print(f"the corpus ended before --tokens {args.tokens:,}: every document was read")
    print(f"activation-vs-prediction curves: {res.pairs} neuron-token pairs")
    print("see: discover query neuron L0.N0 --examples   |   discover sql \"SELECT * FROM neuron_activations LIMIT 5\"")
    return 0


# ----------------------------------------------------------------------- verify ----
def _add_verify(sub) -> None:
    p = _verb(sub, "verify",
              "Test the top hypotheses of a model on held-out text (feature rules, prediction-role tests with "
              "mean ablation) and store verdicts with their evidence.",
              "discover verify gpt2-large --corpus pile-10k.jsonl --tokens 100000 --candidates 50")
    _add_model_arg(p)
    p.add_argument("--corpus", metavar="SPEC", default=None, help="the text (default: the built-in corpus)")
    p.add_argument("--text-field", metavar="NAME", default="text", help="JSONL field / column holding text (text)")
    p.add_argument("--split", choices=("heldout", "all", "train"), default="heldout",
                   help="documents the tests read (heldout)")
    p.add_argument("--tokens", type=int, default=50_000, metavar="N", help="document tokens read (50000)")
    p.add_argument("--rules", action="append", default=[], metavar="DIR",
                   help="also read the *.toml rule files of DIR (repeatable)")
    p.add_argument("--candidates", type=int, default=20, metavar="N",
                   help="prediction/suppression candidates tested, strongest first (20)")
    p.add_argument("--per-rule", type=int, default=3, metavar="N", help="feature hypotheses per rule (3)")
    p.add_argument("--controls", type=int, default=20, metavar="N",
                   help="random same-layer neurons ablated as the baseline (20)")
    p.add_argument("--alpha", type=float, default=0.05, help="false discovery rate (0.05)")
    p.add_argument("--min-auroc", type=float, default=0.85, help="feature: AUROC needed to confirm (0.85)")
    p.add_argument("--min-f1", type=float, default=0.5, help="feature: held-out F1 needed to confirm (0.5)")
    p.add_argument("--allow-pickle", action="store_true", help="allow pickle .bin weights")
    _add_store(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_cmd_verify)


def _cmd_verify(args) -> int:
    from dataclasses import asdict

    from discover.verify import VerifyConfig, prepare, verify_model

    cfg = _settings("verify", lambda: VerifyConfig(
        candidates=args.candidates, per_rule=args.per_rule, tokens=args.tokens, controls=args.controls,
        alpha=args.alpha, min_auroc=args.min_auroc, min_f1=args.min_f1, split=args.split))
    prepared = prepare(args.model or _default_model(), corpus=args.corpus, text_field=args.text_field,
                       rules_dirs=args.rules, allow_pickle=args.allow_pickle, split=args.split)
    from discover.pipeline import verify_key

    key = verify_key(prepared[1][1], prepared[4]["fingerprint"], cfg, prepared[2])  # lets `discover run` reuse it
    with _open_store(args, read_only=False) as store:
        res = verify_model(None, store, cfg, progress=not args.json, prepared=prepared, key=key)
    if args.json:
        _print_json(asdict(res))
        return 0
    print(f"verify {res.verify_id} (checkpoint {res.checkpoint_id[:12]}): {res.tokens:,} held-out tokens from "
          f"{res.documents} documents, {res.rules} rules, {res.seconds:.0f} s")
    if res.skipped_rules:
        print(f"skipped (no spaCy pipeline): {len(res.skipped_rules)} rules")
    print(_table(["hypotheses", "confirmed", "inconclusive", "rejected"],
                 [[k, c["confirmed"], c["inconclusive"], c["rejected"]] for k, c in res.counts.items()]))
    sh = res.shuffled
    print(f"shuffled-label check: {sh['passing']} of {sh['pairs']:,} (neuron, rule) pairs pass the FDR control "
          f"with shuffled labels (expected: about alpha or fewer)")
    print("see: discover query verdicts")
    return 0


# ----------------------------------------------------------------------- report ----
def _add_report(sub) -> None:
    p = _verb(sub, "report",
              "Write a ranked candidate report: summary plots, then one card per neuron (verdicts and evidence, "
              "vocabulary-effect histogram, tokens, activation-vs-prediction curves, shaded examples).",
              "discover report gpt2-large --out report.html")
    _add_model_arg(p)
    p.add_argument("--out", metavar="FILE", default=None,
                   help="output file (default: report.html / report.md / report.json by --format)")
    p.add_argument("--format", choices=("html", "md", "json"), default="html", help="html (default), md or json")
    p.add_argument("--cards", type=int, default=200, metavar="N", help="neuron cards, strongest first (200)")
    p.add_argument("--examples", type=int, default=8, metavar="K", help="max-activating examples per card (8)")
    p.add_argument("--allow-pickle", action="store_true", help="allow pickle .bin weights")
    _add_store(p)
    p.set_defaults(func=_cmd_report)


def _cmd_report(args) -> int:
    import json as _json
    from pathlib import Path

    from discover.report import build_report, render_html, render_markdown

    model = args.model or _default_model()
    out = Path(args.out or f"report.{args.format}")
    if out.is_dir():
        raise DiscoverError(f"--out {out} is a directory; name a file")
    if not out.parent.exists():
        raise DiscoverError(f"the directory of --out {out} does not exist")
    view = None
    try:  # the vocabulary-effect histograms need the weights; everything else comes from the store
        from discover.adapter import load_model

        view = load_model(model, allow_pickle=args.allow_pickle)
    except DiscoverError as e:
        print(f"discover: note: no vocabulary-effect histograms ({e})", file=sys.stderr)
    with _open_store(args, read_only=True) as store:
        rep = build_report(store, model, cards=args.cards, examples=args.examples, view=view)
    if view is not None and view.checkpoint_id != rep["checkpoint_id"]:
        print(f"discover: note: {model} has changed since it was scanned: no vocabulary-effect histograms "
              "(rescan it to get them)", file=sys.stderr)
    text = {"html": render_html, "md": render_markdown,
            "json": lambda r: _json.dumps(r, indent=1, ensure_ascii=False)}[args.format](rep)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)
    print(f"{out} ({args.format}, {len(rep['cards'])} cards, {len(text) / 1e6:.1f} MB)")
    return 0


# -------------------------------------------------------------------------- run ----
def _add_run(sub) -> None:
    p = _verb(sub, "run",
              "The main job: scan -> activations -> verify -> report, reusing whatever the store already has.",
              "discover run gpt2-large --corpus pile-10k.jsonl --tokens 2000000")
    _add_model_arg(p)
    p.add_argument("--corpus", metavar="SPEC", default=None, help="the text (default: the built-in corpus)")
    p.add_argument("--text-field", metavar="NAME", default="text", help="JSONL field / column holding text (text)")
    p.add_argument("--tokens", type=int, default=1_000_000, metavar="N", help="corpus-pass tokens (1000000)")
    p.add_argument("--verify-tokens", type=int, default=50_000, metavar="N", help="held-out tokens for verify (50000)")
    p.add_argument("--verify-split", choices=("heldout", "all", "train"), default="heldout",
                   help="documents verify reads (heldout; `all` for a corpus too small to hold some out)")
    p.add_argument("--candidates", type=int, default=20, metavar="N", help="prediction candidates verified (20)")
    p.add_argument("--rules", action="append", default=[], metavar="DIR", help="extra rule files (repeatable)")
    p.add_argument("--out", metavar="FILE", default=None, help="the report (default: report.html / .md / .json)")
    p.add_argument("--format", choices=("html", "md", "json"), default="html", help="report format (html)")
    p.add_argument("--cards", type=int, default=200, metavar="N", help="report cards (200)")
    p.add_argument("--allow-pickle", action="store_true", help="allow pickle .bin weights")
    _add_store(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_cmd_run)


def _cmd_run(args) -> int:
    from dataclasses import asdict
    from pathlib import Path

    from discover.activations import ActivationConfig
    from discover.pipeline import prepare, run_pipeline
    from discover.verify import VerifyConfig

    act = _settings("run", lambda: ActivationConfig(tokens=args.tokens))
    ver = _settings("run", lambda: VerifyConfig(tokens=args.verify_tokens, candidates=args.candidates,
                                                split=args.verify_split))
    if args.cards < 1:
        raise DiscoverError("--cards must be at least 1")
    out = Path(args.out or f"report.{args.format}")
    if out.is_dir() or not out.parent.exists():
        raise DiscoverError(f"--out {out}: name a file in an existing directory")
    prepared = prepare(args.model or _default_model(), corpus=args.corpus, text_field=args.text_field,
                       act_config=act, rules_dirs=args.rules, allow_pickle=args.allow_pickle, split=ver.split)
    with _open_store(args, read_only=False) as store:
        res = run_pipeline(None, store, act_config=act, verify_config=ver, out=out, fmt=args.format,
                           cards=args.cards, progress=not args.json, prepared=prepared)
    if args.json:
        _print_json(asdict(res))
        return 0
    print(_table(["stage", "status", "seconds"], [[k, v["status"], round(v["seconds"], 1)] for k, v in res.stages.items()]))
    if res.top:
        print("\nconfirmed neurons, strongest first:")
        print(_table(["neuron", "what it does"], [[t["neuron"], t["description"]] for t in res.top]))
    else:
        print("\nno confirmed neurons (see the report for the inconclusive ones)")
    print(f"\nreport: {res.report}   ({res.seconds:.0f} s in all)")
    return 0


# ------------------------------------------------------------------------ main ----
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="discover",
        description="Automated neuron discovery for GPT-style language models.",
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    _add_run(sub)
    _add_scan(sub)
    _add_query(sub)
    _add_activations(sub)
    add_patch(sub)
    add_study(sub)
    _add_verify(sub)
    _add_report(sub)
    _add_sql(sub)
    add_train(sub)
    add_watch(sub)
    add_universality(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int | None] = args.func
    try:
        return int(func(args) or 0)
    except DiscoverError as e:
        print(f"discover: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("discover: interrupted; the store is unchanged by the unfinished work", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `discover ... | head`: stop quietly
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    except OSError as e:  # disk full, permissions... raised below the library's own checks
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"discover: error: {e.strerror or e}{where}; nothing unfinished was committed", file=sys.stderr)
        return 1
    except Exception as e:
        import duckdb

        if isinstance(e, duckdb.Error) or type(e).__module__.startswith("faiss"):
            print(f"discover: error: {first_line(e)}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    raise SystemExit(main())
