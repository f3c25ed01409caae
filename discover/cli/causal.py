"""The causal verbs of the command line: `patch` (one prompt pair, every neuron) and `study` (the
whole investigation of one token, prompts mined from a corpus)."""

from __future__ import annotations

from discover.cli.common import (
    add_model_arg,
    add_store,
    default_model,
    open_store,
    print_json,
    settings,
    table,
    verb,
)
from discover.errors import DiscoverError

# ------------------------------------------------------------------------ patch ----
AN_CLEAN = "I climbed up the pear tree and picked a pear. I climbed up the apple tree and picked"


def add_patch(sub) -> None:
    """The `patch` verb's arguments."""
    p = verb(sub, "patch",
              "Neuron activation patching: the exact logit-difference recovery of every neuron of the chosen "
              "layers (batched), plus an attribution-patching screen over all layers.",
              f"discover patch gpt2-large --clean \"{AN_CLEAN}\" --corrupted \"{AN_CLEAN.replace('apple', 'lemon')}\" "
              "--target \" an\" --contrast \" a\" --layers 31")
    add_model_arg(p)
    p.add_argument("--clean", required=True, metavar="TEXT", help="the prompt whose activations are patched in")
    p.add_argument("--corrupted", required=True, metavar="TEXT", help="the prompt that is run and patched")
    p.add_argument("--target", required=True, metavar="TOK", help="the token whose logit the clean prompt favours")
    p.add_argument("--contrast", required=True, metavar="TOK", help="the token it is compared with")
    p.add_argument("--layers", type=int, nargs="+", default=None, metavar="L",
                   help="layers patched exactly (default: all)")
    p.add_argument("--positions", choices=("last", "all"), default="last",
                   help="patch the final position only (default) or every position (equal-length prompts)")
    p.add_argument("--top", type=int, default=15, help="neurons listed (15)")
    p.add_argument("--batch-size", type=int, default=512, help="neurons per forward pass (512)")
    p.add_argument("--no-bos", action="store_true", help="do not prepend the BOS token")
    add_store(p)
    p.add_argument("--no-store", action="store_true", help="only print: do not record the experiment in the store")
    p.add_argument("--allow-pickle", action="store_true", help="allow pickle .bin weights")
    p.add_argument("--json", action="store_true", help="every neuron's numbers as JSON")
    p.set_defaults(func=cmd_patch)


def cmd_patch(args) -> int:
    """Run `discover patch`: exact recovery of every neuron, printed or as JSON, recorded in the store."""
    import numpy as np

    from discover.adapter import load_model
    from discover.patch import PatchConfig, patch_neurons

    if args.top < 1:
        raise DiscoverError("--top must be at least 1")
    cfg = settings("patch", lambda: PatchConfig(layers=tuple(args.layers) if args.layers else None,
                                                 positions=args.positions, batch_size=args.batch_size,
                                                 bos=not args.no_bos))
    view = load_model(args.model or default_model(), allow_pickle=args.allow_pickle)
    res = patch_neurons(view, args.clean, args.corrupted, args.target, args.contrast, cfg, progress=not args.json)
    experiment = None
    if not args.no_store:
        from discover.patch import store_result

        with open_store(args, read_only=False) as store:
            experiment = store_result(store, view, res, args.clean, args.corrupted, cfg.layers)
    N = view.d_mlp
    exact = [(l, n, float(v)) for l, arr in res.recovery.items() for n, v in enumerate(arr)]
    exact.sort(key=lambda x: -abs(x[2]))
    att = res.attribution
    meta = {"model": view.spec, "checkpoint_id": view.checkpoint_id, "experiment_id": experiment, "direction": "denoising",
            "ablation": "clean activation patched into the corrupted run", "positions": res.positions,
            "target": {"id": res.target[0], "token": res.target[1]},
            "contrast": {"id": res.contrast[0], "token": res.contrast[1]},
            "clean_tokens": len(res.clean_tokens), "corrupted_tokens": len(res.corrupted_tokens),
            "m_clean": res.m_clean, "m_corrupted": res.m_corrupted, "seconds": res.seconds,
            # experts: how the flat neuron indices below map to L{l}.E{e}.N{n} (None: dense)
            "neuron_layout": view.layout.to_dict() if view.layout.moe else None}
    if args.json:
        print_json({**meta, "layers": {str(l): {"recovery": arr.tolist(), "attribution": att[l].tolist()}
                                        for l, arr in res.recovery.items()},
                     "attribution_all_layers": att.tolist()})
        return 0
    print(f"{view.spec}: m = logit({res.target[1]!r}) - logit({res.contrast[1]!r}) at the final position: "
          f"clean {res.m_clean:.4g}, corrupted {res.m_corrupted:.4g}")
    print(f"denoising: each neuron's clean activation patched into the corrupted run at "
          f"{'the final position' if res.positions == 'last' else 'every position'}; "
          f"recovery = (m_patched - m_corrupted) / (m_clean - m_corrupted) ({res.seconds:.1f} s)")
    print(f"\nexact, layers {', '.join(map(str, res.recovery))} ({len(exact):,} neurons), largest |recovery|:")
    print(table(["neuron", "recovery", "attribution"],
                 [[view.layout.name(l, n), v, float(att[l, n])] for l, n, v in exact[:args.top]]))
    for l, arr in res.recovery.items():
        corr = float(np.corrcoef(arr, att[l])[0, 1]) if np.std(arr) > 0 and np.std(att[l]) > 0 else float("nan")
        print(f"L{l}: sum of recoveries {arr.sum():.3g}, max {arr.max():.3g}, min {arr.min():.3g}; "
              f"attribution vs exact: r = {corr:.3f}")
    flat = np.argsort(-np.abs(att).ravel())[:args.top]
    print("\nattribution screen over all layers (first order; confirm with exact patching):")
    print(table(["neuron", "attribution", "exact"],
                 [[view.layout.name(g // N, g % N), float(att.ravel()[g]),
                   float(res.recovery[g // N][g % N]) if g // N in res.recovery else None] for g in flat]))
    return 0




# ------------------------------------------------------------------------ study ----
def add_study(sub) -> None:
    """The `study` verb's arguments."""
    p = verb(sub, "study",
             "The token study: mine prompts where the model predicts TOKEN, find single-token counterfactuals "
             "that flip it to the contrast, then the logit lens, layer patching and exact patching of every neuron "
             "over every pair, ranked, with each top neuron's congruence with TOKEN.",
             "discover study \" an\" SmolLM2-135M-Instruct.Q4_1.gguf --corpus default+docs --tokens 20000")
    p.add_argument("token", metavar="TOKEN", help="the token studied (one token; mind its leading space)")
    add_model_arg(p)
    p.add_argument("--contrast", metavar="TOK", default=None,
                   help="what the corrupted prompts predict instead (default: the model's usual second choice)")
    p.add_argument("--corpus", metavar="SPEC", default=None, help="the text mined (default: the built-in corpus)")
    p.add_argument("--text-field", metavar="NAME", default="text", help="JSONL field / column holding text (text)")
    p.add_argument("--split", choices=("all", "train", "heldout"), default="all", help="documents mined (all)")
    p.add_argument("--tokens", type=int, default=20_000, metavar="N", help="corpus tokens mined (20000)")
    p.add_argument("--window", type=int, default=12, metavar="N", help="tokens of context per mined prompt (12)")
    p.add_argument("--prompts", type=int, default=32, metavar="N", help="clean prompts searched (32)")
    p.add_argument("--proposals", type=int, default=8, metavar="N",
                   help="substitutes tried per position: the model's own top predictions there (8)")
    p.add_argument("--pairs", type=int, default=8, metavar="N", help="prompt pairs patched (8)")
    p.add_argument("--positions", choices=("last", "all"), default="last",
                   help="neuron patching at the final position (default) or every position")
    p.add_argument("--top", type=int, default=20, metavar="N", help="neurons listed (20)")
    p.add_argument("--examine", type=int, default=5, metavar="N",
                   help="top neurons examined further: a corpus pass for their curves and examples, mean ablation "
                        "against same-layer neurons, a verdict (5; needs the store and a corpus)")
    p.add_argument("--controls", type=int, default=10, metavar="N", help="same-layer neurons in the ablation baseline (10)")
    p.add_argument("--clean", metavar="TEXT", default=None, help="a hand-written clean prompt (with --corrupted)")
    p.add_argument("--corrupted", metavar="TEXT", default=None, help="its corrupted twin, of equal length in tokens")
    add_store(p)
    p.add_argument("--no-store", action="store_true", help="only print: do not record the study in the store")
    p.add_argument("--allow-pickle", action="store_true", help="allow pickle .bin weights")
    p.add_argument("--json", action="store_true", help="the study as JSON: ranked neurons with recovery, the pairs")
    p.set_defaults(func=cmd_study)


def cmd_study(args) -> int:
    """Run `discover study`: the study, its examination (with a store and a corpus), stored and printed."""
    from discover.adapter import identify, load_model
    from discover.study import StudyConfig, examine, store_study, study, to_json

    cfg = settings("study", lambda: StudyConfig(tokens=args.tokens, window=args.window, prompts=args.prompts,
                                                proposals=args.proposals, pairs=args.pairs, top=args.top,
                                                positions=args.positions, split=args.split, examine=args.examine,
                                                controls=args.controls))
    corp, described = None, None
    hand = args.clean is not None or args.corrupted is not None
    if not hand or args.corpus is not None:  # mined prompts, or a corpus for the examination
        from discover.corpus import open_corpus

        corp = open_corpus(args.corpus, text_field=args.text_field)
        described = corp.describe()
    spec = args.model or default_model()
    identity = identify(spec, allow_pickle=args.allow_pickle)
    view = load_model(spec, allow_pickle=args.allow_pickle, identity=identity)
    res = study(view, None if hand else corp, args.token, cfg, contrast_text=args.contrast, clean=args.clean,
                corrupted=args.corrupted, progress=not args.json)
    sid = None
    if not args.no_store:
        from discover.scan import scan_model

        with open_store(args, read_only=False) as store:
            if store.checkpoint(view.checkpoint_id) is None:
                scan_model(view.spec, store, progress=not args.json, identity=identity, view=view)
            if cfg.examine and corp is not None:
                examine(store, view, identity, res, corp, described, cfg, progress=not args.json)
            sid = store_study(store, view, res, cfg, described)
    out = to_json(res, view, sid)
    if args.json:
        print_json({"model": view.spec, "checkpoint_id": view.checkpoint_id, **out})
        return 0
    c = out["counts"]
    t, x = out["target"]["token"], out["contrast"]["token"]
    if "positions" in c:
        print(f"{view.spec}: {t!r} is the top prediction {c['predicted']:,} times and the next token {c['occurs']:,} "
              f"times in {c['positions']:,} corpus tokens (both at once {c['predicted_and_next']:,}); "
              f"{c['prompts']} clean prompts")
    print(f"contrast {x!r}: {c['found']} prompt pairs found, {c['tried']:,} single-token substitutions tried")
    for p in out["pairs"][:3]:
        print(f"  clean {p['clean']!r} -> corrupted at {p['position']}: {p['substituted'][0]!r} -> "
              f"{p['substituted'][1]!r} (m {p['m_clean']:.3g} -> {p['m_corrupted']:.3g})")
    lens = out["logit_lens"]
    lay = out["layer_patching"]
    print(f"\nper layer: logit lens of logit({t!r}) - logit({x!r}) (clean, corrupted) and layer patching recovery")
    print(table(["layer", "lens clean", "lens corrupted", "attn recovery", "mlp recovery"],
                [[l, lens["clean"][l], lens["corrupted"][l], lay["attn"][l], lay["mlp"][l]]
                 for l in range(len(lens["clean"]))]))
    print(f"\nneurons by mean exact recovery over {len(out['pairs'])} pair(s) "
          f"({'final position' if args.positions == 'last' else 'every position'}):")
    print(table(["neuron", "recovery", "sd", f"congruence with {t!r}", "token rank", "ablation z", "verdict"],
                [[n["neuron"], n["recovery"], n["recovery_sd"], n["congruence"], n["token_rank"],
                  n.get("evidence", {}).get("ablation_z"), n.get("verdict")] for n in out["neurons"]]))
    if any("verdict" in n for n in out["neurons"]):
        print("verdicts: confirmed = patching restores >= 10% consistently over the pairs and mean ablation lowers "
              f"log p({t!r}) where it is next (z <= -3 against same-layer neurons); their curves: the study panel of "
              "`discover report`; examples: discover query neuron NEURON --examples")
    secs = out["seconds"]
    print("\ntime: " + ", ".join(f"{k} {v:.1f} s" for k, v in secs.items()))
    if sid:
        print(f"stored as study {sid}: discover sql \"SELECT * FROM study_neurons WHERE study_id = '{sid}' "
              "ORDER BY recovery DESC LIMIT 10\"")
    return 0
