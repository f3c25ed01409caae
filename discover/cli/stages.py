"""The pipeline's verbs of the command line: `scan`, `activations`, `verify`, `report` and `run`."""

from __future__ import annotations

import sys
from pathlib import Path

from discover.cli.common import (
    add_model_arg,
    add_ray,
    add_store,
    cluster_verify,
    cluster_stream,
    default_model,
    open_store,
    print_json,
    ray_cluster,
    settings,
    table,
    verb,
)
from discover.errors import DiscoverError


# ------------------------------------------------------------------------ scan ----
def add_scan(sub) -> None:
    p = verb(sub, "scan", "Scan every MLP neuron of a model into the store (weights only).",
              'discover scan gpt2-large --store indexes')
    add_model_arg(p)
    add_store(p)
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

    cfg = settings("scan", lambda: ScanConfig(
        top_k=args.top_k, token_top_k=args.token_top_k, chunk_rows=args.chunk_rows,
        roles=RoleThresholds(kurtosis=args.kurtosis, partition_var=args.partition_var,
                             entropy_norm_z=args.entropy_norm_z, entropy_var=args.entropy_var,
                             io_cos=args.io_cos),
    ))
    from discover.adapter import identify

    # check the model before the store is created or touched
    model = args.model or default_model()
    identity = identify(model, allow_pickle=args.allow_pickle)
    with open_store(args, read_only=False) as store:
        summary = scan_model(model, store, cfg, allow_pickle=args.allow_pickle,
                             progress=not args.json, force=args.force, identity=identity)
    if args.json:
        print_json(asdict(summary))
        return 0
    what = {"scanned": "scanned", "unchanged": "already in the store, nothing to do",
            "roles-updated": "already in the store; roles re-derived with the new thresholds"}[summary.status]
    print(f"{summary.spec}: {what} (checkpoint {summary.checkpoint_id[:12]}, {summary.n_layers} layers x "
          f"{summary.d_mlp} neurons, d_model {summary.d_model}, vocab {summary.d_vocab}, {summary.seconds:.1f} s)")
    print("roles: " + ", ".join(f"{r} {c}" for r, c in summary.role_counts.items()))
    return 0


# ------------------------------------------------------------------ activations ----
def add_activations(sub) -> None:
    p = verb(sub, "activations",
              "Run the model over corpus text: exact activation statistics, max-activating examples, "
              "histograms and activation-vs-prediction curves for every neuron (resumable, extendable).",
              "discover activations gpt2-large --corpus pile-10k.jsonl --tokens 2000000 --pair 'L31.N892:\" an\"'")
    add_model_arg(p)
    p.add_argument("--corpus", metavar="SPEC", default=None,
                   help="default, a text file, a directory, FILE.jsonl, FILE.parquet, a datasets dir "
                        "(see `discover train --help`; default: the built-in default corpus)")
    p.add_argument("--text-field", metavar="NAME", default="text", help="JSONL field / column holding text (text)")
    p.add_argument("--split", choices=("all", "train", "heldout"), default="all", help="documents to read (all)")
    p.add_argument("--tokens", type=int, default=1_000_000, metavar="N",
                   help="document tokens to process, in whole batches; more than before extends the pass (1000000)")
    p.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help="sequences per forward pass (default: from a 0.5 GB activation budget, at most 32)")
    p.add_argument("--context", type=int, default=None, metavar="N",
                   help="tokens per sequence including the BOS (default: the model's, at most 256)")
    p.add_argument("--shard-batches", type=int, default=16, metavar="N",
                   help="batches per shard: the unit a cluster's workers compute and merge (16)")
    p.add_argument("--top-k", type=int, default=20, metavar="K", help="examples kept per neuron and kind (20)")
    p.add_argument("--pair", action="append", default=[], metavar="L1.N42:TOKEN",
                   help="also record the activation-vs-prediction curve of this neuron and token (repeatable)")
    p.add_argument("--max-candidates", type=int, default=256, metavar="N",
                   help="strongest prediction/suppression candidates of the scan that get curves (256)")
    p.add_argument("--save-every", type=float, default=30.0, metavar="S",
                   help="seconds between saves of the resumable state (30)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (cpu)")
    p.add_argument("--allow-pickle", action="store_true", help="allow pickle .bin weights")
    add_ray(p)
    add_store(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_cmd_activations)


def _cmd_activations(args) -> int:
    from dataclasses import asdict

    from discover.activations import ActivationConfig, prepare, run_activations

    cfg = settings("activations", lambda: ActivationConfig(
        tokens=args.tokens, batch_size=args.batch_size, context=args.context, top_k=args.top_k, split=args.split,
        pairs=tuple(args.pair), max_candidates=args.max_candidates, save_every=args.save_every, device=args.device,
        shard_batches=args.shard_batches))
    model = args.model or default_model()
    cluster = ray_cluster(args)  # a malformed --ray fails here, before the model loads
    # model, pairs and corpus are checked before the store is created or touched
    plan = prepare(model, cfg, corpus=args.corpus, text_field=args.text_field, allow_pickle=args.allow_pickle)
    with cluster as cl, open_store(args, read_only=False) as store:
        try:
            res = run_activations(model, store, cfg, progress=not args.json, plan=plan, stream=cluster_stream(cl))
        except KeyboardInterrupt:
            print("discover: interrupted; the catalog keeps the last committed results; rerun the same "
                  "command to continue from the last saved state", file=sys.stderr)
            return 130
    if args.json:
        print_json(asdict(res))
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
def add_verify(sub) -> None:
    p = verb(sub, "verify",
              "Test the top hypotheses of a model on held-out text (feature rules, prediction-role tests with "
              "mean ablation) and store verdicts with their evidence.",
              "discover verify gpt2-large --corpus pile-10k.jsonl --tokens 100000 --candidates 50")
    add_model_arg(p)
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
    add_ray(p)
    add_store(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_cmd_verify)


def _cmd_verify(args) -> int:
    from dataclasses import asdict

    from discover.verify import VerifyConfig, prepare, verify_model

    cfg = settings("verify", lambda: VerifyConfig(
        candidates=args.candidates, per_rule=args.per_rule, tokens=args.tokens, controls=args.controls,
        alpha=args.alpha, min_auroc=args.min_auroc, min_f1=args.min_f1, split=args.split))
    cluster = ray_cluster(args)  # a malformed --ray fails here, before the model loads
    prepared = prepare(args.model or default_model(), corpus=args.corpus, text_field=args.text_field,
                       rules_dirs=args.rules, allow_pickle=args.allow_pickle, split=args.split)
    from discover.pipeline import verify_key

    key = verify_key(prepared[1][1], prepared[4]["fingerprint"], cfg, prepared[2])  # lets `discover run` reuse it
    with cluster as cl, open_store(args, read_only=False) as store, cluster_verify(cl, args.allow_pickle) as spread:
        res = verify_model(None, store, cfg, progress=not args.json, prepared=prepared, key=key, spread=spread)
    if args.json:
        print_json(asdict(res))
        return 0
    print(f"verify {res.verify_id} (checkpoint {res.checkpoint_id[:12]}): {res.tokens:,} held-out tokens from "
          f"{res.documents} documents, {res.rules} rules, {res.seconds:.0f} s")
    if res.skipped_rules:
        print(f"skipped (no spaCy pipeline): {len(res.skipped_rules)} rules")
    print(table(["hypotheses", "confirmed", "inconclusive", "rejected"],
                 [[k, c["confirmed"], c["inconclusive"], c["rejected"]] for k, c in res.counts.items()]))
    sh = res.shuffled
    print(f"shuffled-label check: {sh['passing']} of {sh['pairs']:,} (neuron, rule) pairs pass the FDR control "
          f"with shuffled labels (expected: about alpha or fewer)")
    print("see: discover query verdicts")
    return 0


# ----------------------------------------------------------------------- report ----
def add_report(sub) -> None:
    p = verb(sub, "report",
              "Write a ranked candidate report: summary plots, then one card per neuron (verdicts and evidence, "
              "vocabulary-effect histogram, tokens, activation-vs-prediction curves, shaded examples).",
              "discover report gpt2-large --out report.html")
    add_model_arg(p)
    p.add_argument("--out", metavar="FILE", default=None,
                   help="output file (default: report.html / report.md / report.json by --format)")
    p.add_argument("--format", choices=("html", "md", "json"), default="html", help="html (default), md or json")
    p.add_argument("--cards", type=int, default=200, metavar="N", help="neuron cards, strongest first (200)")
    p.add_argument("--examples", type=int, default=8, metavar="K", help="max-activating examples per card (8)")
    p.add_argument("--allow-pickle", action="store_true", help="allow pickle .bin weights")
    add_store(p)
    p.set_defaults(func=_cmd_report)


def _cmd_report(args) -> int:
    import json as _json

    from discover.report import build_report, render_html, render_markdown

    model = args.model or default_model()
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
    with open_store(args, read_only=True) as store:
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
def add_run(sub) -> None:
    p = verb(sub, "run",
              "The main job: scan -> activations -> verify -> report, reusing whatever the store already has.",
              "discover run gpt2-large --corpus pile-10k.jsonl --tokens 2000000")
    add_model_arg(p)
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
    add_ray(p)
    add_store(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_cmd_run)


def _cmd_run(args) -> int:
    from dataclasses import asdict

    from discover.activations import ActivationConfig
    from discover.pipeline import prepare, run_pipeline
    from discover.verify import VerifyConfig

    act = settings("run", lambda: ActivationConfig(tokens=args.tokens))
    ver = settings("run", lambda: VerifyConfig(tokens=args.verify_tokens, candidates=args.candidates,
                                                split=args.verify_split))
    if args.cards < 1:
        raise DiscoverError("--cards must be at least 1")
    out = Path(args.out or f"report.{args.format}")
    if out.is_dir() or not out.parent.exists():
        raise DiscoverError(f"--out {out}: name a file in an existing directory")
    cluster = ray_cluster(args)  # a malformed --ray fails here, before the model loads
    prepared = prepare(args.model or default_model(), corpus=args.corpus, text_field=args.text_field,
                       act_config=act, rules_dirs=args.rules, allow_pickle=args.allow_pickle, split=ver.split)
    with cluster as cl, open_store(args, read_only=False) as store, cluster_verify(cl, args.allow_pickle) as spread:
        res = run_pipeline(None, store, act_config=act, verify_config=ver, out=out, fmt=args.format,
                           cards=args.cards, progress=not args.json, prepared=prepared, stream=cluster_stream(cl),
                           spread=spread)
    if args.json:
        print_json(asdict(res))
        return 0
    print(table(["stage", "status", "seconds"], [[k, v["status"], round(v["seconds"], 1)] for k, v in res.stages.items()]))
    if res.top:
        print("\nconfirmed neurons, strongest first:")
        print(table(["neuron", "what it does"], [[t["neuron"], t["description"]] for t in res.top]))
    else:
        print("\nno confirmed neurons (see the report for the inconclusive ones)")
    print(f"\nreport: {res.report}   ({res.seconds:.0f} s in all)")
    return 0
