"""The main job, `discover run`: scan -> activations -> verify -> report, reusing the store.

Each stage reuses what the store already has: an unchanged checkpoint is not rescanned, a corpus
pass with enough tokens is not rerun (a larger budget extends it), and a verify run with the same
corpus, settings and rules is reused. The report is always rewritten (it is cheap).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class RunSummary:
    spec: str
    checkpoint_id: str
    stages: dict = field(default_factory=dict)  # stage -> {"status", "seconds", ...}
    top: list = field(default_factory=list)  # the strongest confirmed hypotheses
    report: str = ""
    seconds: float = 0.0

    def brief_stages(self) -> dict:
        """Each stage's status, seconds, tokens and counts (what a watch records per checkpoint)."""
        return {k: {kk: vv for kk, vv in v.items() if kk in ("status", "seconds", "tokens", "counts")}
                for k, v in self.stages.items()}


def _say(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def _release() -> None:
    """Hand memory a finished stage freed back to the system (pyarrow's pool and glibc keep freed
    blocks for reuse), so that the next stage's peak does not stand on the last one's."""
    import gc

    gc.collect()
    try:
        import pyarrow as pa

        pa.default_memory_pool().release_unused()
    except ImportError:
        pass
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _peak(res: RunSummary, stage: str) -> None:
    """The process's peak RSS so far (MB), recorded when `stage` ends: the stage that raised it is
    the first whose figure is the run's peak."""
    try:
        import resource
    except ImportError:  # not on this platform
        return
    res.stages[stage]["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def run_pipeline(spec: str | None, store, *, corpus: str | None = None, text_field: str = "text",
                 act_config=None, verify_config=None, rules_dirs=None, out: str | Path | None = "report.html",
                 fmt: str = "html", cards: int = 200, allow_pickle: bool = False, progress: bool = True,
                 prepared=None, stream=None, spread=None) -> RunSummary:
    """Run every stage on `spec` (None: the embedded default) and `corpus` (None: the built-in).
    `stream`: what folds the corpus pass's batches, `spread`: what runs verify's forward passes
    and ablations (`discover.cluster.ClusterStream` / `ClusterVerify`: a Ray cluster's workers;
    None: this process)."""
    from discover.activations import ActivationConfig, run_activations
    from discover.query import parse_neuron
    from discover.scan import scan_model
    from discover.verify import VerifyConfig, query_verdicts, verify_model

    quiet = not progress
    t0 = time.perf_counter()
    act_config = act_config or ActivationConfig()
    verify_config = verify_config or VerifyConfig()
    plan, verify_prep = prepared or prepare(spec, corpus=corpus, text_field=text_field, act_config=act_config,
                                            rules_dirs=rules_dirs, allow_pickle=allow_pickle,
                                            split=verify_config.split)
    view, identity = plan.view, plan.identity
    res = RunSummary(spec=view.spec, checkpoint_id=identity[1])

    _say("[1/4] scan: every neuron's weights against the vocabulary", quiet)
    t = time.perf_counter()
    if store.checkpoint(identity[1]) is None:  # an existing scan keeps its settings and role thresholds
        s = scan_model(view.spec, store, progress=progress, identity=identity, view=view)
        res.stages["scan"] = {"status": s.status, "seconds": time.perf_counter() - t, "roles": s.role_counts}
    else:
        store.add_alias(identity[0], identity[1])
        res.stages["scan"] = {"status": "unchanged", "seconds": time.perf_counter() - t}

    _peak(res, "scan")
    _release()
    _say(f"[2/4] activations: {act_config.tokens:,} tokens of corpus text", quiet)
    t = time.perf_counter()
    p = run_activations(view.spec, store, act_config, progress=progress, plan=plan, stream=stream)
    res.stages["activations"] = {"status": p.status, "seconds": time.perf_counter() - t, "tokens": p.tokens,
                                 "tokens_per_second": p.tokens_per_second, "pass_id": p.pass_id}

    _peak(res, "activations")
    _release()
    _say(f"[3/4] verify: hypotheses on {verify_config.tokens:,} held-out tokens", quiet)
    t = time.perf_counter()
    key = verify_key(identity[1], plan.described["fingerprint"], verify_config, verify_prep[2])
    reused = _find_verify(store, identity[1], key)
    if reused is None:
        v = verify_model(view.spec, store, verify_config, progress=progress, prepared=verify_prep, key=key,
                         spread=spread)
        vid = v.verify_id
        res.stages["verify"] = {"status": "ran", "seconds": time.perf_counter() - t, "counts": v.counts,
                                "verify_id": vid}
    else:
        vid = reused
        res.stages["verify"] = {"status": "unchanged", "seconds": time.perf_counter() - t, "verify_id": vid}

    _peak(res, "verify")
    _release()
    if out is not None:  # `discover watch` writes the report itself, after recording what changed
        _say("[4/4] report", quiet)
        t = time.perf_counter()
        n_cards = write_report(store, view, vid, out, fmt=fmt, cards=cards)
        res.stages["report"] = {"status": "written", "seconds": time.perf_counter() - t, "cards": n_cards}
        res.report = str(Path(out).resolve())
        _peak(res, "report")
    top = query_verdicts(store, view.spec, verdict="confirmed", top=10, verify_id=vid)["hypotheses"]
    strings = {}
    for h in top:  # the strongest tokens each confirmed neuron writes (for or against), from the scan
        layer, neuron = parse_neuron(h["neuron"], view.layout)
        strings[h["neuron"]] = {f"{side}_tokens": [{"token": t} for (t,) in store.con.execute(
            "SELECT token FROM neuron_tokens WHERE checkpoint_id = ? AND layer = ? AND neuron = ? AND side = ? "
            "ORDER BY rank LIMIT 3", [identity[1], layer, neuron, side]).fetchall()] for side in ("top", "bottom")}
    res.top = [{"neuron": h["neuron"], "kind": h["kind"], "subject": h["subject"],
                "description": describe(h, strings.get(h["neuron"]))} for h in top]
    res.seconds = time.perf_counter() - t0
    return res


def write_report(store, view, verify_id: str, out, *, fmt: str = "html", cards: int = 200) -> int:
    """Build the report of `view`'s checkpoint with `verify_id`'s verdicts; write it atomically.
    Returns the number of cards."""
    from discover.report import build_report

    rep = build_report(store, view.spec, cards=cards, view=view, verify_id=verify_id)
    return save_report(rep, out, fmt=fmt)


def save_report(rep: dict, out, *, fmt: str = "html") -> int:
    """Render report data (`report.build_report`) as `fmt` and write it atomically (a temporary
    file beside `out`, then a rename). Returns the number of cards."""
    from discover.report import render_html, render_markdown

    text = render_html(rep) if fmt == "html" else (render_markdown(rep) if fmt == "md" else json.dumps(rep, indent=1))
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)
    return len(rep["cards"])


def describe(h: dict, card: dict | None) -> str:
    """One line a researcher can read: what the neuron was confirmed to do, with its numbers."""
    ev = h["evidence"]
    if h["kind"] == "feature":
        line = f"detects {h['subject']} (AUROC {ev['auroc']:.3f}, held-out F1 {ev['f1']:.2f})"
    else:
        verb = "predicts" if h["kind"] == "prediction" else "suppresses"
        toks = ev.get("tokens") or [h["subject"]]
        size = ev.get("tail_size") or len(toks)
        shown = " ".join(repr(t) for t in toks[:4]) + (f" (+{size - 4} more)" if size > 4 else "")
        def num(k):
            return float("nan") if ev.get(k) is None else ev[k]

        line = f"{verb} {shown} (AUROC next {num('auroc_next'):.3f}, ablation z {num('ablation_z'):.1f})"
    side = "bottom_tokens" if h["kind"] == "suppression" else "top_tokens"
    if card and card.get(side):
        line += ("; writes against " if side == "bottom_tokens" else "; writes ") + " ".join(
            repr(t["token"]) for t in card[side][:3])
    return line


def prepare(spec, *, corpus=None, text_field="text", act_config=None, rules_dirs=None, allow_pickle=False,
            split: str = "heldout", identity=None):
    """Check the model, corpus and rules once, before the store is touched."""
    from discover.activations import ActivationConfig
    from discover.activations import prepare as prepare_pass
    from discover.rules import load_rules

    plan = prepare_pass(spec, act_config or ActivationConfig(), corpus=corpus, text_field=text_field,
                        allow_pickle=allow_pickle, identity=identity)
    from discover.verify import check_split

    rules = load_rules(rules_dirs)
    check_split(plan.corpus, split)
    return plan, (plan.view, plan.identity, rules, plan.corpus, plan.described)


def verify_key(checkpoint_id: str, fingerprint: str, cfg, rules) -> str:
    """What makes two verify runs the same: checkpoint, corpus, settings, the rules' contents,
    whether spaCy rules can run, and the discover version."""
    from discover import __version__
    from discover.rules import load_spacy

    rules_id = [(r.name, r.kind, r.pattern, r.flags, str(r.group), r.attr, r.values, json.dumps(r.matcher),
                 r.positive) for r in rules]
    spacy_ok = load_spacy() is not None if any(r.kind == "spacy" for r in rules) else None
    blob = json.dumps([checkpoint_id, fingerprint, asdict(cfg), rules_id, spacy_ok, __version__], sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _find_verify(store, checkpoint_id: str, key: str) -> str | None:
    row = store.con.execute("SELECT verify_id FROM verify_runs WHERE checkpoint_id = ? AND json_extract_string("
                            "checks, '$.key') = ? ORDER BY created_at DESC LIMIT 1", [checkpoint_id, key]).fetchone()
    return None if row is None else row[0]
