"""The command-line verbs that run long jobs over many checkpoints or models: `watch` (every new
checkpoint of a training run), `train` (a model from scratch) and `universality` (neurons shared
across models)."""

from __future__ import annotations

import argparse
import sys

from discover.cli.common import (
    add_ray,
    add_store,
    checkpoint_jobs,
    fmt,
    open_store,
    print_json,
    ray_cluster,
    settings,
    table,
    verb,
)
from discover.errors import DiscoverError


# ------------------------------------------------------------------------ watch ----
def add_watch(sub) -> None:
    """The `watch` verb's arguments."""
    p = verb(sub, "watch",
              "Process every new checkpoint under DIR: scan -> activations -> verify -> tracking -> report. "
              "Exit codes: 0 all processed or nothing new; 2 bad input; 3 some checkpoint failed (recorded, "
              "the others processed); 4 another watch holds the store's lock; 130 interrupted.",
              "discover watch runs/tiny --once --tokens 200000")
    p.add_argument("dir", metavar="DIR", help="directory the training run writes checkpoints into (searched recursively)")
    p.add_argument("--once", action="store_true", help="one look, then exit (for cron / systemd timers)")
    p.add_argument("--interval", type=float, default=600.0, metavar="SECONDS",
                   help="without --once: seconds between looks (600)")
    p.add_argument("--tokens", type=int, default=200_000, metavar="N", help="corpus-pass tokens per checkpoint (200000)")
    p.add_argument("--verify-tokens", type=int, default=20_000, metavar="N", help="held-out tokens for verify (20000)")
    p.add_argument("--verify-split", choices=("heldout", "all", "train"), default="heldout",
                   help="documents verify reads (heldout)")
    p.add_argument("--candidates", type=int, default=20, metavar="N", help="prediction candidates verified (20)")
    p.add_argument("--corpus", metavar="SPEC", default=None, help="the text (default: the built-in corpus)")
    p.add_argument("--text-field", metavar="NAME", default="text", help="JSONL field / column holding text (text)")
    p.add_argument("--reports", metavar="DIR", default=None, help="where reports go (default: STORE/reports)")
    p.add_argument("--format", choices=("html", "md", "json"), default="html", help="report format (html)")
    p.add_argument("--cards", type=int, default=100, metavar="N", help="report cards per checkpoint (100)")
    p.add_argument("--retry-failed", action="store_true", help="retry checkpoints that failed before")
    p.add_argument("--settle", type=float, default=60.0, metavar="SECONDS",
                   help="leave checkpoints whose files changed less than this long ago for the next look (60)")
    p.add_argument("--allow-pickle", action="store_true", help="allow pickle .bin weights")
    add_ray(p, "each checkpoint one job, as many at once as the cluster fits, committed here in turn")
    add_store(p)
    p.add_argument("--json", action="store_true", help="print each look's summary as JSON")
    p.set_defaults(func=cmd_watch)


def cmd_watch(args) -> int:
    """Run `discover watch` once or in a loop; exit codes as documented."""
    from dataclasses import asdict

    from discover.watch import WatchConfig, watch_loop, watch_once

    if args.interval <= 0:
        raise DiscoverError("--interval must be a positive number of seconds")
    cfg = settings("watch", lambda: WatchConfig(
        tokens=args.tokens, verify_tokens=args.verify_tokens, candidates=args.candidates,
        verify_split=args.verify_split, corpus=args.corpus, text_field=args.text_field, reports=args.reports,
        fmt=args.format, cards=args.cards, retry_failed=args.retry_failed, allow_pickle=args.allow_pickle,
        settle=args.settle))

    def show(s) -> None:
        if args.json:
            print_json({**asdict(s), "exit_code": s.exit_code})
            return
        print(f"{s.watch_dir}: {s.found} checkpoint(s), {s.new} new or changed: {s.processed} processed, "
              f"{s.unchanged} unchanged, {s.failed} failed" + (f", {s.settling} still being written"
                                                              if s.settling else "")
              + f" ({s.seconds:.1f} s, run {s.run_id})")
        for r in s.results:
            if r["status"] == "failed":
                print(f"  failed: {r['path']}: {r['error']}")
            elif r["status"] == "done":
                tr = r["stages"].get("track", {})
                what = (", ".join(f"{k.replace('_', ' ')} {v}" for k, v in tr["counts"].items())
                        if tr.get("status") == "matched" else "first of its run" if not tr else tr.get("why", ""))
                print(f"  {r['path']}: {what}; report {r['report']}")

    with ray_cluster(args) as cl:  # checkpoints as parallel jobs on the cluster's workers
        jobs = checkpoint_jobs(cl)
        if args.once:
            s = watch_once(args.dir, args.store, cfg, progress=not args.json, jobs=jobs)
            show(s)
            return s.exit_code
        watch_loop(args.dir, args.store, cfg, interval=args.interval, progress=not args.json, on_pass=show, jobs=jobs)
    return 0


# ---------------------------------------------------------------- train (issue 3) ----
def add_train(sub) -> None:
    """The `train` verb: train a small GPT-2 from scratch on a corpus (resumable)."""
    p = verb(
        sub,
        "train",
        "Train a small GPT-2 from scratch on a corpus; rerun the same command to resume.",
        "discover train runs/tiny --layers 2 --d-model 128 --tokens 2000000",
    )
    p.add_argument("out", metavar="OUT", help="output directory of the run (checkpoints, tokenizer, data, log)")
    g = p.add_argument_group("data")
    g.add_argument("--corpus", metavar="SPEC", default=None,
                   help="default (CPython stdlib + pydoc topics), default:STDLIB_ROOT, a text file, a directory, "
                        "FILE.jsonl, FILE.parquet, a datasets save_to_disk dir; prefix text:/dir:/jsonl:/parquet:/hf: "
                        "forces the kind (default: default)")
    g.add_argument("--text-field", metavar="NAME", default=None, help="JSONL field / column holding text (default: text)")
    g = p.add_argument_group("model")
    g.add_argument("--layers", type=int, metavar="N", default=None, help="transformer blocks (default: 2)")
    g.add_argument("--d-model", type=int, metavar="N", default=None, help="residual width (default: 256)")
    g.add_argument("--heads", type=int, metavar="N", default=None, help="attention heads (default: 4)")
    g.add_argument("--d-mlp", type=int, metavar="N", default=None, help="MLP neurons per layer (default: 1024)")
    g.add_argument("--vocab-size", type=int, metavar="N", default=None, help="BPE vocabulary size (default: 4096)")
    g.add_argument("--context", type=int, metavar="N", default=None, help="context length in tokens (default: 256)")
    g = p.add_argument_group("training")
    g.add_argument("--seed", type=int, metavar="N", default=None, help="seed of init and batches (default: 0)")
    g.add_argument("--tokens", type=int, metavar="N", default=None,
                   help="token budget; steps = tokens // (batch-size * context) (default: 10000000)")
    g.add_argument("--batch-size", type=int, metavar="N", default=None, help="sequences per step (default: 32)")
    g.add_argument("--lr", type=float, metavar="X", default=None,
                   help="peak AdamW learning rate, cosine-decayed to 10%% (default: 1e-3)")
    g.add_argument("--warmup-steps", type=int, metavar="N", default=None, help="linear warmup steps (default: 100)")
    g.add_argument("--save-every", type=int, metavar="N", default=None, help="steps between checkpoints (default: 500)")
    g.add_argument("--eval-every", type=int, metavar="N", default=None,
                   help="steps between held-out evaluations (default: 250)")
    g.add_argument("--eval-tokens", type=int, metavar="N", default=None, help="held-out tokens per evaluation (default: 65536)")
    g.add_argument("--keep-checkpoints", type=int, metavar="N", default=None,
                   help="keep only the N newest checkpoints (default: keep all)")
    g.add_argument("--device", metavar="DEV", default=None, help="auto, cpu, cuda or cuda:N (default: auto)")
    g.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="float32, or bfloat16 autocast on CUDA (default: float32)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or preparation messages on stderr")

    # CLI option -> TrainConfig field; options left out keep TrainConfig's defaults.
    fields = {
        "corpus": "corpus", "text_field": "text_field", "layers": "n_layer", "d_model": "d_model",
        "heads": "n_head", "d_mlp": "d_mlp", "vocab_size": "vocab_size", "context": "context",
        "seed": "seed", "tokens": "tokens", "batch_size": "batch_size", "lr": "lr",
        "warmup_steps": "warmup_steps", "save_every": "save_every", "eval_every": "eval_every",
        "eval_tokens": "eval_tokens", "keep_checkpoints": "keep_checkpoints", "device": "device",
        "dtype": "dtype",
    }

    def run(args: argparse.Namespace) -> int:
        from discover.errors import TrainError
        from discover.train import TrainConfig, train

        given = {f: getattr(args, a) for a, f in fields.items() if getattr(args, a) is not None}
        cfg = settings("train", lambda: TrainConfig(out=args.out, **given), TrainError)
        try:
            res = train(cfg, progress=not args.quiet)
        except KeyboardInterrupt:
            print("discover: training interrupted; rerun the same command to resume from the last checkpoint",
                  file=sys.stderr)
            return 130
        print(f"trained {res.out}: step {res.final_step}, {res.tokens_seen:,} tokens, "
              f"{res.wall_seconds:.1f} s on {res.device}")
        print(f"held-out loss {res.heldout_loss:.4f} nats/token (unigram baseline {res.unigram_loss:.4f})")
        print(f"last checkpoint: {res.checkpoint}")
        return 0

    p.set_defaults(func=run)


# ------------------------------------------------------------------ universality ----
def add_universality(sub) -> None:
    """The `universality` verb's arguments."""
    p = verb(sub, "universality",
              "Universal neurons: correlate the MLP neurons of two or more models (e.g. seeds) over the same "
              "tokens; per neuron the max correlation with each other model, its partner, the baseline after a "
              "random rotation of the other model's neurons, and universal = mean excess > --threshold.",
              "discover universality runs/seed0/checkpoint-5000 runs/seed1/checkpoint-5000 --corpus pile-10k.jsonl "
              "--tokens 100000")
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="two or more hub ids or model directories sharing one vocabulary (`default`: the embedded model)")
    p.add_argument("--corpus", metavar="SPEC", default=None,
                   help="the text (default: the built-in corpus; see `discover train --help` for the forms)")
    p.add_argument("--text-field", metavar="NAME", default="text", help="JSONL field / column holding text (text)")
    p.add_argument("--tokens", type=int, default=100_000, metavar="N",
                   help="document-token positions correlated, BOS and padding excluded (100000)")
    p.add_argument("--split", choices=("all", "train", "heldout"), default="all", help="documents to read (all)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the baseline's random rotations (0)")
    p.add_argument("--threshold", type=float, default=0.5, metavar="X",
                   help="universal: mean excess correlation (max - rotated baseline) above this (0.5)")
    p.add_argument("--memory-gb", type=float, default=2.0, metavar="GB",
                   help="bound on the float64 accumulators of one pass + finalising one block (two d_mlp^2 "
                        "rotations, one block) + one batch's activations; the models' weights come on top. "
                        "Blocks that do not fit are accumulated in further passes over the same tokens: GPT-2 "
                        "medium x 2 (48 within-layer + 576 cross blocks of 128 MiB) takes 70 passes at 2 GB, "
                        "7 at 16 GB, 4 at 32 GB (2)")
    p.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help="sequences per forward pass (default: from a quarter of --memory-gb, at most 32)")
    p.add_argument("--context", type=int, default=None, metavar="N",
                   help="tokens per sequence including the BOS (default: the models', at most 256)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (cpu)")
    p.add_argument("--top", type=int, default=10, metavar="N", help="universal neurons listed (10)")
    p.add_argument("--shard-batches", type=int, default=None, metavar="N",
                   help="stream the positions in shards of N batches merged in order, as a cluster computes them "
                        "(twice the accumulators' memory; default: one stream, or 16 with --ray)")
    p.add_argument("--allow-pickle", action="store_true", help="allow pickle .bin weights")
    add_ray(p)
    add_store(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_universality)


def cmd_universality(args) -> int:
    """Run `discover universality` and print the universal neurons."""
    from dataclasses import asdict

    from discover.universality import UniversalityConfig, prepare, universality

    shard_batches = args.shard_batches or (16 if args.ray else None)  # a cluster computes shards
    cfg = settings("universality", lambda: UniversalityConfig(
        tokens=args.tokens, split=args.split, seed=args.seed, threshold=args.threshold, memory_gb=args.memory_gb,
        batch_size=args.batch_size, context=args.context, device=args.device, shard_batches=shard_batches))
    if args.top < 0:
        raise DiscoverError("--top must be >= 0")
    cluster = ray_cluster(args)  # a malformed --ray fails here, before the models load
    # models, vocabularies, budget and corpus are checked before the store is created or touched
    plan = prepare(args.models, cfg, corpus=args.corpus, text_field=args.text_field, allow_pickle=args.allow_pickle)
    with cluster as cl, open_store(args, read_only=False) as store:
        passes = None
        if cl is not None:
            from discover.cluster import ClusterPasses

            passes = ClusterPasses(cl, allow_pickle=args.allow_pickle)
        try:
            res = universality(None, store, plan=plan, progress=not args.json, top=args.top, run_pass=passes)
        finally:
            if passes is not None:
                passes.close()
    if args.json:
        print_json(asdict(res))
        return 0
    c = res.corpus
    print(f"universality {res.universality_id}: {len(res.models)} models, {res.tokens:,} tokens of {c['kind']} "
          f"corpus {c['path']}, {res.passes} pass{'es' if res.passes > 1 else ''}, {res.seconds:.0f} s"
          + ("  (the corpus ended before --tokens)" if res.exhausted else ""))
    print(table(["model", "checkpoint", "universal", "neurons", "%", "dead"],
                 [[m["spec"], m["checkpoint_id"][:12], m["universal"], m["neurons"], f"{100 * m['fraction']:.2f}%",
                   m["dead"]] for m in res.models]))
    layers = max(m["n_layers"] for m in res.models)
    print(f"\nuniversal neurons per layer (mean excess > {res.threshold:g}):")
    print(table(["model"] + [f"L{i}" for i in range(layers)],
                 [[m["spec"]] + m["per_layer"] + [""] * (layers - m["n_layers"]) for m in res.models]))
    if res.top:
        print("\nstrongest universal neurons (correlation: max / rotated baseline):")
        print(table(["model", "neuron", "mean max", "mean baseline", "mean excess", "partners"],
                     [[t["spec"], t["neuron"], t["mean_max_corr"], t["mean_baseline"], t["mean_excess"],
                       "; ".join(f"{q['checkpoint_id'][:8]} {q['neuron']} {fmt(q['max_corr'])}/"
                                 f"{fmt(q['baseline_corr'])}" for q in t["partners"])] for t in res.top]))
    else:
        print("\nno universal neurons")
    print(f"see: discover sql \"SELECT * FROM universal_neurons WHERE universality_id = '{res.universality_id}' "
          "AND universal\"")
    return 0
