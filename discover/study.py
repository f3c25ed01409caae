"""The token study (`discover study TOKEN`): the "an" neuron investigation, automated for any
single-token target (METHODS.md, "Causal tests"; Miller & Neo's GPT-2 large study).

Every step runs in batches of equal-length prompts (no padding):

1. **Prompt mining.** Corpus pieces (BOS + `context - 1` tokens, as the corpus pass) go through
   the model; at every counted position we count whether TOKEN is the model's top prediction and
   whether it is the true next token ("predicted N times, occurs M times"). A clean prompt is
   BOS + the `window` tokens ending at a position where TOKEN is the top prediction; the
   truncated prompts are run again and kept only where TOKEN is still the top prediction, the
   ones where TOKEN is also the true next token first, then by the margin over the second choice.
2. **Counterfactuals.** The contrast is `--contrast`, else the model's most frequent second
   choice over the clean prompts. For each clean prompt, every position but the BOS is replaced
   by each of the `proposals` tokens the model itself ranks highest there (its prediction from
   the previous position), and every variant is run; a variant is a corrupted prompt when its
   top prediction is the contrast. The strongest flip of a prompt (largest logit(contrast) -
   logit(TOKEN)) makes a pair; `tried` and `found` count variants and pairs.
3. **Logit lens.** logit(TOKEN) - logit(contrast) at the last position of the clean and the
   corrupted prompts after every block (the final norm and unembedding applied to the residual
   stream), mean over pairs.
4. **Layer patching.** Per layer, the attention output, and all of the MLP's neurons, of the
   clean run put into the corrupted run at every position; recovery = (m_patched - m_corr) /
   (m_clean - m_corr) with m = logit(TOKEN) - logit(contrast) at the last position; mean over pairs.
5. **Neuron patching.** Exact recovery of every neuron of every layer for every pair
   (`patch.patch_token_ids`, batched as `discover patch`), at the last position by default;
   neurons are ranked by their mean recovery over pairs, with its standard deviation.
6. **Top neurons.** For each: its congruence with TOKEN (`w_out . U[:, TOKEN]`, processed
   weights) and TOKEN's rank among every token by that congruence (1 = the token it writes most).

A study is written to the catalog in one transaction (`study_runs`, `study_neurons`); the scan
and the examination's corpus pass (a pass of its own, `purpose` 'study') commit before it."""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

from discover.errors import QueryError
from discover.patch import logit_direction


@dataclass(frozen=True)
class StudyConfig:
    tokens: int = 20_000  # corpus tokens mined
    window: int = 12  # tokens of context in a mined prompt (after its BOS)
    prompts: int = 32  # clean prompts kept for the counterfactual search
    proposals: int = 8  # substitutes tried per position: the model's own top predictions there
    pairs: int = 8  # prompt pairs patched
    top: int = 20  # neurons reported
    batch_size: int = 16  # sequences per forward pass
    positions: str = "last"  # neuron patching: the last position, or every position
    split: str = "all"
    context: int | None = None  # tokens per mined corpus piece incl. BOS; None: min(model's, 256)
    examine: int = 5  # top neurons examined further (corpus pass curve and examples, mean ablation, verdict)
    controls: int = 10  # same-layer random neurons ablated as the baseline
    ablation_sequences: int = 8  # mined pieces where TOKEN is next, for the mean ablation
    seed: int = 0

    def __post_init__(self):
        for name in ("tokens", "window", "prompts", "proposals", "pairs", "top", "batch_size", "ablation_sequences"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.positions not in ("last", "all"):
            raise ValueError(f"positions must be last or all, got {self.positions!r}")
        if self.examine < 0 or self.controls < 3:
            raise ValueError("examine must be >= 0 and controls >= 3 (the ablation's baseline)")
        if self.split not in ("all", "train", "heldout"):
            raise ValueError(f"split must be all, train or heldout, got {self.split!r}")


@dataclass
class Pair:
    clean: list  # token ids, BOS first
    corrupted: list
    position: int  # where they differ
    m_clean: float = float("nan")
    m_corrupted: float = float("nan")
    source: str = "mined"


@dataclass
class StudyResult:
    target: tuple  # (id, string)
    contrast: tuple
    counts: dict  # positions, predicted, occurs, predicted_and_next, prompts, tried, found
    pairs: list
    logit_lens: dict  # clean, corrupted: (L,) mean logit difference after each block
    layers: dict  # attn, mlp: (L,) mean recovery
    recovery_mean: np.ndarray  # (L, N)
    recovery_sd: np.ndarray  # (L, N)
    top: list = field(default_factory=list)  # ranked neurons (dicts)
    seconds: dict = field(default_factory=dict)  # per part
    pieces: list = field(default_factory=list, repr=False)  # mined (ids with BOS, next token after) where TOKEN is next
    pass_id: str | None = None  # the corpus pass that examined the top neurons


# ----------------------------------------------------------------------------- batches
class _Model:
    """Batched forward passes of equal-length prompts: final-norm outputs and logits."""

    def __init__(self, view, batch_size: int):
        import torch

        self.torch, self.view, self.bs = torch, view, batch_size
        self.head = view.model.get_output_embeddings()

    def last_logits(self, prompts: list) -> np.ndarray:
        """(P, vocab) float32 pre-cap logits at the last position of each prompt."""
        torch = self.torch
        out = []
        with torch.inference_mode():
            for i in range(0, len(prompts), self.bs):
                ids = torch.tensor(prompts[i:i + self.bs])
                h = self.view.model.base_model(input_ids=ids).last_hidden_state[:, -1]
                out.append(self.head(h).float()[:, :self.view.d_vocab].numpy())
        return np.concatenate(out) if out else np.zeros((0, self.view.d_vocab), np.float32)


def _rows_of_logits(head, h, d_vocab, fn):
    """Apply `fn` to the logits of hidden rows h (R, d) in chunks of at most 256 MiB."""
    step = max(1, int(2 ** 26 // max(1, d_vocab)))
    for i in range(0, h.shape[0], step):
        fn(i, head(h[i:i + step]).float()[:, :d_vocab])


# ----------------------------------------------------------------------------- mining
def mine(view, corpus, target: int, cfg: StudyConfig, progress: bool = False) -> tuple[dict, list, list, list]:
    """(counts, clean prompts, their second choices, up to `ablation_sequences` corpus pieces
    where TOKEN is the next token): see the module docstring, step 1."""
    import torch
    from tqdm import tqdm

    from discover.activations import sequences
    from discover.tokens import bos_id, model_context

    tok = view.tokenizer
    bos = bos_id(tok)
    context = cfg.context or min(model_context(view), 256)
    if cfg.window + 1 > context:
        raise QueryError(f"--window {cfg.window} needs {cfg.window + 1} positions; the mined pieces have {context} "
                         f"(the model's {model_context(view)}, at most 256)")
    start = 1 if bos is not None else 0
    head = view.model.get_output_embeddings()
    counts = Counter()
    found = []  # (is next, margin, prompt ids)
    pieces = []  # (ids with BOS, the token after the piece) where TOKEN is next somewhere
    bar = tqdm(total=cfg.tokens, unit="tok", desc="study: mining", disable=not progress, leave=False)
    batch: list = []

    def run(batch):
        T = max(len(s[3]) for s in batch)
        ids = torch.full((len(batch), T), batch[0][3][0], dtype=torch.long)
        nxt = np.full((len(batch), T), -1, np.int64)
        for b, (_, _, _, seq, after) in enumerate(batch):
            ids[b, :len(seq)] = torch.tensor(seq)
            nxt[b, :len(seq) - 1] = seq[1:]
            nxt[b, len(seq) - 1] = after
        with torch.inference_mode():
            h = view.model.base_model(input_ids=ids).last_hidden_state
        B = len(batch)
        flat = h.reshape(B * T, -1)
        top = np.empty(B * T, np.int64)
        margin = np.empty(B * T, np.float32)

        def take(i, logits):
            v, j = logits.topk(2, dim=-1)
            top[i:i + len(j)] = j[:, 0].numpy()
            margin[i:i + len(j)] = (logits[:, target] - v[:, 1]).numpy()

        with torch.inference_mode():
            _rows_of_logits(head, flat, view.d_vocab, take)
        top, margin = top.reshape(B, T), margin.reshape(B, T)
        n = 0
        for b, (_, _, _, seq, after) in enumerate(batch):
            if len(pieces) < cfg.ablation_sequences and (nxt[b, start:len(seq)] == target).any():
                pieces.append((list(seq), int(after)))
            for t in range(start, len(seq)):
                n += 1
                pred, is_next = top[b, t] == target, nxt[b, t] == target
                counts["positions"] += 1
                counts["predicted"] += int(pred)
                counts["occurs"] += int(is_next)
                counts["predicted_and_next"] += int(pred and is_next)
                if pred and t - cfg.window + 1 >= start:
                    body = seq[t - cfg.window + 1:t + 1]
                    found.append((bool(is_next), float(margin[b, t]), ([bos] if bos is not None else []) + list(body)))
        bar.update(n)

    for s in sequences(corpus, cfg.split, tok, context, bos):
        batch.append(s)
        if len(batch) == cfg.batch_size:
            run(batch)
            batch = []
            if counts["positions"] >= cfg.tokens:
                break
    else:
        if batch:
            run(batch)
    bar.close()
    if counts["positions"] == 0:
        from discover.errors import CorpusError

        raise CorpusError(f"the {cfg.split} split of the corpus gave no tokens; point --corpus at text")
    # the truncated prompts, run again: TOKEN must still be the top prediction
    found.sort(key=lambda f: (not f[0], -f[1]))
    seen, cands = set(), []
    for f in found:
        key = tuple(f[2])
        if key not in seen:
            seen.add(key)
            cands.append(f[2])
        if len(cands) >= 4 * cfg.prompts:
            break
    logits = _Model(view, cfg.batch_size).last_logits(cands)
    keep, second = [], []
    for p, lg in zip(cands, logits):
        order = np.argsort(-lg)[:2]
        if order[0] == target:
            keep.append(p)
            second.append(int(order[1]))
        if len(keep) == cfg.prompts:
            break
    counts["prompts"] = len(keep)
    return dict(counts), keep, second, pieces


# ----------------------------------------------------------------------- counterfactuals
def counterfactuals(view, prompts: list, target: int, contrast: int, cfg: StudyConfig,
                    progress: bool = False) -> tuple[list, int]:
    """(pairs, variants tried): step 2 of the module docstring. Stops once `cfg.pairs` pairs are found."""
    import torch
    from tqdm import tqdm

    head = view.model.get_output_embeddings()
    model = _Model(view, cfg.batch_size)
    pairs, tried = [], 0
    bar = tqdm(total=len(prompts), unit="prompt", desc="study: counterfactuals", disable=not progress, leave=False)
    for p in prompts:
        with torch.inference_mode():
            h = view.model.base_model(input_ids=torch.tensor([p])).last_hidden_state[0]
            proposals = head(h[:-1]).float()[:, :view.d_vocab].topk(cfg.proposals + 1, dim=-1).indices.numpy()
        variants, where = [], []
        for i in range(1, len(p)):
            for t in proposals[i - 1]:
                if int(t) != p[i] and len([x for x in where if x[0] == i]) < cfg.proposals:
                    v = list(p)
                    v[i] = int(t)
                    variants.append(v)
                    where.append((i, int(t)))
        tried += len(variants)
        lg = model.last_logits(variants)
        flips = np.flatnonzero(lg.argmax(1) == contrast)
        if len(flips):
            best = flips[np.argmax(lg[flips, contrast] - lg[flips, target])]
            pairs.append(Pair(clean=list(p), corrupted=variants[best], position=where[best][0]))
        bar.update(1)
        if len(pairs) >= cfg.pairs:
            break
    bar.close()
    return pairs, tried


# ------------------------------------------------------------------ lens and layer patching
def logit_lens(view, pairs: list, target: int, contrast: int) -> dict:
    """Mean over pairs of logit(target) - logit(contrast) at the last position after every block."""
    import torch

    d, bias = logit_direction(view, target, contrast)
    norm = view.model.get_submodule(view.final_norm_site())
    out = {}
    for which in ("clean", "corrupted"):
        tr = view.trace(torch.tensor([getattr(p, which) for p in pairs]))
        with torch.inference_mode():
            out[which] = [float((norm(o[:, -1:]).float()[:, 0] @ d + bias).mean()) for o in tr.outs]
    return out


def layer_patching(view, pairs: list, target: int, contrast: int) -> dict:
    """Mean recovery over pairs when a layer's attention output, or all its MLP neurons, take
    their clean values at every position of the corrupted run."""
    import torch

    d, bias = logit_direction(view, target, contrast)
    clean = torch.tensor([p.clean for p in pairs])
    corr = torch.tensor([p.corrupted for p in pairs])
    L = view.n_layers
    attn_clean, acts_clean = [None] * L, [None] * L
    hooks = []
    for l in range(L):
        hooks.append(view.attention_module(l).register_forward_hook(
            lambda m, a, o, l=l: attn_clean.__setitem__(l, (o[0] if isinstance(o, tuple) else o).detach())))
        hooks.append(view.act_module(l).register_forward_pre_hook(
            lambda m, a, l=l: acts_clean.__setitem__(l, a[0].detach())))

    def metric(ids):
        with torch.inference_mode():
            h = view.model.base_model(input_ids=ids).last_hidden_state[:, -1].float()
        return (h @ d + bias).double().numpy()

    try:
        m_clean = metric(clean)
    finally:
        for h in hooks:
            h.remove()
    m_corr = metric(corr)
    denom = m_clean - m_corr
    out = {"attn": [], "mlp": []}
    for l in range(L):
        for kind in ("attn", "mlp"):
            if kind == "attn":
                def put(m, a, o, l=l):
                    if isinstance(o, tuple):
                        return (attn_clean[l],) + tuple(o[1:])
                    return attn_clean[l]
                h = view.attention_module(l).register_forward_hook(put)
            else:
                h = view.act_module(l).register_forward_pre_hook(lambda m, a, l=l: (acts_clean[l],) + tuple(a[1:]))
            try:
                m = metric(corr)
            finally:
                h.remove()
            with np.errstate(divide="ignore", invalid="ignore"):
                out[kind].append(float(np.nanmean(np.where(np.abs(denom) > 1e-6, (m - m_corr) / denom, np.nan))))
    return out


# -------------------------------------------------------------------------------- study
def study(view, corpus, target_text: str, cfg: StudyConfig | None = None, *, contrast_text: str | None = None,
          clean: str | None = None, corrupted: str | None = None, progress: bool = False) -> StudyResult:
    """The whole investigation of one target token (see the module docstring)."""
    from tqdm import tqdm

    from discover.patch import PatchConfig, encode_prompt, patch_token_ids
    from discover.tokens import single_token

    cfg = cfg or StudyConfig()
    view.require_activations()
    if view.tokenizer is None:
        raise QueryError("this model has no tokenizer; the study needs one")
    target = single_token(view, target_text, "TOKEN")
    contrast = single_token(view, contrast_text, "--contrast") if contrast_text else None
    if contrast == target:
        raise QueryError("TOKEN and --contrast are the same token; name two different tokens")
    secs: dict = {}
    t0 = time.perf_counter()
    counts = {}
    if clean is not None or corrupted is not None:
        if not (clean and corrupted):
            raise QueryError("--clean and --corrupted go together: give both prompts, or neither to mine them")
        c_ids, x_ids = encode_prompt(view, clean, True), encode_prompt(view, corrupted, True)
        if len(c_ids) != len(x_ids):
            raise QueryError(f"--clean is {len(c_ids)} tokens and --corrupted {len(x_ids)}; the study patches "
                             "prompts of equal length: change the words")
        diff = [i for i, (a, b) in enumerate(zip(c_ids, x_ids)) if a != b]
        if not diff:
            raise QueryError("--clean and --corrupted are the same tokens; change a word of the corrupted prompt")
        lg = _Model(view, 2).last_logits([c_ids, x_ids])
        if contrast is None:  # the model's second choice after the clean prompt
            contrast = int(next(t for t in np.argsort(-lg[0]) if t != target))
        if abs((lg[0, target] - lg[0, contrast]) - (lg[1, target] - lg[1, contrast])) < 1e-6:
            raise QueryError("the clean and corrupted prompts give the same logit difference; there is nothing to "
                             "recover: choose prompts the model tells apart")
        pairs = [Pair(clean=c_ids, corrupted=x_ids, position=diff[0], source="given")]
        counts.update(tried=1, found=1)
    else:
        if corpus is None:
            raise QueryError("the study mines prompts from a corpus; give --corpus (or --clean and --corrupted)")
        counts, prompts, second, pieces = mine(view, corpus, target, cfg, progress)
        secs["mining"] = time.perf_counter() - t0
        if not prompts:
            raise QueryError(
                f"{target_text!r} is never the model's top prediction in {counts['positions']:,} corpus tokens "
                f"(it occurs {counts.get('occurs', 0):,} times); mine more text with --tokens, or give --clean and "
                "--corrupted prompts")
        if contrast is None:
            contrast = Counter(second).most_common(1)[0][0]
        t1 = time.perf_counter()
        pairs, tried = counterfactuals(view, prompts, target, contrast, cfg, progress)
        counts.update(tried=tried, found=len(pairs))
        secs["counterfactuals"] = time.perf_counter() - t1
        if not pairs:
            strings = view.token_strings()
            raise QueryError(
                f"no single-token substitution of {len(prompts)} mined prompts ({tried:,} tried) flips the top "
                f"prediction from {target_text!r} to {strings[contrast]!r}; choose another --contrast or give "
                "--clean and --corrupted prompts")
    t2 = time.perf_counter()
    lens = logit_lens(view, pairs, target, contrast)
    layers = layer_patching(view, pairs, target, contrast)
    secs["lens_and_layers"] = time.perf_counter() - t2
    t3 = time.perf_counter()
    L, N = view.n_layers, view.d_mlp
    rec = np.zeros((len(pairs), L, N))
    pcfg = PatchConfig(positions=cfg.positions)
    bar = tqdm(total=len(pairs) * L * N, unit="neuron", desc="study: patching", disable=not progress, leave=False)
    for i, p in enumerate(pairs):
        r, p.m_clean, p.m_corrupted = patch_token_ids(view, p.clean, p.corrupted, target, contrast, pcfg, bar)
        for l, v in r.items():
            rec[i, l] = v
    bar.close()
    secs["neuron_patching"] = time.perf_counter() - t3
    mean, sd = rec.mean(0), rec.std(0, ddof=1) if len(pairs) > 1 else np.full((L, N), np.nan)
    strings = view.token_strings()
    res = StudyResult(target=(target, strings[target]), contrast=(contrast, strings[contrast]), counts=counts,
                      pairs=pairs, logit_lens=lens, layers=layers, recovery_mean=mean, recovery_sd=sd,
                      pieces=pieces if clean is None else [])
    res.top = top_neurons(view, mean, sd, target, cfg.top)
    secs["total"] = time.perf_counter() - t0
    res.seconds = secs
    return res


def top_neurons(view, mean: np.ndarray, sd: np.ndarray, target: int, top: int) -> list:
    """The `top` neurons by mean recovery, with congruence with the target and its rank."""
    import torch

    U = view.processed_unembed().float()  # (d_model, vocab)
    order = np.argsort(-mean.ravel(), kind="stable")[:top]
    N = view.d_mlp
    out = []
    W = {}
    for rank, g in enumerate(order.tolist()):
        l, n = divmod(g, N)
        if l not in W:
            W[l] = view.processed_W_out(l).float()
        with torch.inference_mode():
            c = (W[l][n] @ U).double().numpy()  # congruence with every token
        out.append({"rank": rank, "neuron": view.layout.name(l, n), "layer": l, "neuron_index": n,
                    "recovery": float(mean[l, n]), "recovery_sd": float(sd[l, n]),
                    "congruence": float(c[target]), "token_rank": int((c > c[target]).sum()) + 1})
    return out


# ------------------------------------------------------------------------ examination
def _pieces_from_corpus(view, corpus, target: int, cfg: StudyConfig) -> list:
    """Corpus pieces where `target` is the next token somewhere (tokenization only)."""
    from discover.activations import sequences
    from discover.tokens import bos_id, model_context

    bos = bos_id(view.tokenizer)
    out = []
    for _, _, _, seq, after in sequences(corpus, cfg.split, view.tokenizer, cfg.context or min(model_context(view), 256),
                                         bos):
        if target in seq[1:] or after == target:
            out.append((list(seq), int(after)))
            if len(out) >= cfg.ablation_sequences:
                break
    return out


def examine(store, view, identity, res: StudyResult, corpus, described: dict, cfg: StudyConfig,
            progress: bool = False) -> str | None:
    """For the `cfg.examine` top neurons: a corpus pass over `cfg.tokens` tokens that records
    their activation-vs-prediction curves for TOKEN and their max-activating examples (its
    pass id is returned), the mean ablation of each (activation set to its corpus-pass mean at
    every position of the pieces where TOKEN is next) on log p(TOKEN) there against `controls`
    random same-layer neurons, and a verdict; written into `res.top`."""
    from types import SimpleNamespace

    from tqdm import tqdm

    from discover.activations import (
        ActivationConfig,
        Plan,
        auto_batch_size,
        model_context,
        neuron_groups,
        run_activations,
    )
    from discover.verify import (
        Ablator,
        ablation_evidence,
        curve_trend,
        draw_controls,
        pass_curves,
    )

    top = res.top[:cfg.examine]
    if not top or corpus is None:
        return None
    t0 = time.perf_counter()
    T = res.target[0]
    context = cfg.context or min(model_context(view), 256)
    plan = Plan(view.spec, identity, view, [(t["layer"], t["neuron_index"], T, "study") for t in top], context,
                auto_batch_size(view, context), corpus, described)
    acfg = ActivationConfig(tokens=cfg.tokens, split=cfg.split, context=context, purpose="study")
    summary = run_activations(view.spec, store, acfg, plan=plan, progress=progress)
    L, N = view.n_layers, view.d_mlp
    rows = store.con.execute("SELECT layer, neuron, act_mean FROM neuron_activations WHERE pass_id = ?",
                             [summary.pass_id]).fetchnumpy()
    means = np.full((L, N), np.nan)
    col = rows["act_mean"]
    means[rows["layer"].astype(int), rows["neuron"].astype(int)] = (
        col.filled(np.nan) if np.ma.isMaskedArray(col) else np.asarray(col, np.float64))
    curves = pass_curves(store, view.checkpoint_id, summary.pass_id)
    group, _ = neuron_groups(view.layout, N)  # experts: controls of the same expert (the same routed tokens)
    pieces = res.pieces or _pieces_from_corpus(view, corpus, T, cfg)
    seqs, nxt, row = [], [], 0
    for seq, after in pieces:
        m = len(seq) - 1
        seqs.append((seq, row, m))
        nxt.extend(seq[2:] + [after])
        row += m
    data = SimpleNamespace(seqs=seqs, next_token=np.array(nxt, np.int64))
    abl = Ablator(view, data) if seqs else None
    rng = np.random.default_rng(cfg.seed)
    for t in tqdm(top, desc="study: ablation", unit="neuron", disable=not progress, leave=False):
        l, n = t["layer"], t["neuron_index"]
        ev = curve_trend(curves.get((l, n, T)))
        ev["act_mean"] = float(means[l, n])
        if abl is not None:
            controls = draw_controls(rng, N, n, group, cfg.controls)
            eff, n_pos = abl.effects([T], [(l, n)] + [(l, c) for c in controls], means, len(seqs))
            ev.update(ablation_evidence(eff, n_pos))
        t["evidence"] = ev
        t["verdict"], t["decided_by"] = study_verdict(t, len(res.pairs))
    res.seconds["examination"] = time.perf_counter() - t0
    res.seconds["total"] = res.seconds.get("total", 0.0) + res.seconds["examination"]
    res.pass_id = summary.pass_id
    return summary.pass_id


def study_verdict(t: dict, n_pairs: int) -> tuple[str, str]:
    """The verdict on "this neuron carries TOKEN's prediction in this behaviour":
    `confirmed` when patching it restores at least 10% of the logit difference consistently over
    the pairs (mean >= 2 standard errors; one pair: mean >= 0.1) and mean-ablating it lowers log
    p(TOKEN) where TOKEN is next with z <= -3 against same-layer neurons; `rejected` when neither
    holds (recovery < 0.05 and z > -2); `inconclusive` otherwise."""
    rec, sd = t["recovery"], t["recovery_sd"]
    steady = rec >= 0.1 and (n_pairs < 2 or not np.isfinite(sd) or sd == 0 or rec >= 2 * sd / np.sqrt(n_pairs))
    z = t.get("evidence", {}).get("ablation_z")
    lowers = z is not None and np.isfinite(z) and z <= -3
    if steady and lowers:
        return "confirmed", ("patching restores >= 10% of the logit difference, consistently over the pairs, and mean "
                             "ablation lowers log p(TOKEN) where it is next, z <= -3 against same-layer neurons")
    if rec < 0.05 and not (z is not None and np.isfinite(z) and z <= -2):
        return "rejected", "recovery < 0.05 and ablation z > -2"
    return "inconclusive", "one test passed, the other did not (or no position had TOKEN next)"


# -------------------------------------------------------------------------------- store
def store_study(store, view, res: StudyResult, cfg: StudyConfig, described: dict | None) -> str:
    """Write one study in one transaction: the run (counts, pairs, lens, layers) and every neuron's
    mean recovery. (The scan and the examination's corpus pass commit on their own before it.)"""
    import pyarrow as pa

    from discover import __version__
    from discover.store import insert_arrow, transaction

    sid = uuid.uuid4().hex[:12]
    L, N = res.recovery_mean.shape
    sd = res.recovery_sd
    tbl = pa.table({
        "study_id": pa.repeat(pa.scalar(sid), L * N),
        "checkpoint_id": pa.repeat(pa.scalar(view.checkpoint_id), L * N),
        "layer": np.repeat(np.arange(L, dtype=np.int16), N),
        "neuron": np.tile(np.arange(N, dtype=np.int32), L),
        "recovery": res.recovery_mean.ravel(),
        "recovery_sd": pa.array(sd.ravel(), mask=np.isnan(sd.ravel())),
    })
    strings = view.token_strings()
    pairs = [{"clean": p.clean, "corrupted": p.corrupted, "position": p.position, "m_clean": p.m_clean,
              "m_corrupted": p.m_corrupted, "source": p.source,
              "clean_text": "".join(strings[t] for t in p.clean), "corrupted_text": "".join(strings[t] for t in p.corrupted),
              "substituted": [strings[p.clean[p.position]], strings[p.corrupted[p.position]]]} for p in res.pairs]
    with transaction(store.con) as con:
        con.execute("INSERT INTO study_runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, now(), ?, ?)",
                    [sid, view.checkpoint_id, res.target[1], res.target[0], res.contrast[1], res.contrast[0],
                     json.dumps(described) if described else None, json.dumps(asdict(cfg)), json.dumps(res.counts),
                     json.dumps(pairs), json.dumps(res.logit_lens), json.dumps(res.layers), json.dumps(res.top),
                     json.dumps(res.seconds), __version__, res.pass_id])
        insert_arrow(con, "study_neurons", tbl)
    return sid


def to_json(res: StudyResult, view, study_id: str | None = None) -> dict:
    """The study as `--json` prints it: counts, pairs (text and ids), lens, layers, ranked neurons."""
    strings = view.token_strings()
    return {
        "study_id": study_id, "target": {"id": res.target[0], "token": res.target[1]},
        "contrast": {"id": res.contrast[0], "token": res.contrast[1]}, "counts": res.counts,
        "pairs": [{"clean": "".join(strings[t] for t in p.clean), "corrupted": "".join(strings[t] for t in p.corrupted),
                   "clean_ids": p.clean, "corrupted_ids": p.corrupted, "position": p.position,
                   "substituted": [strings[p.clean[p.position]], strings[p.corrupted[p.position]]],
                   "m_clean": p.m_clean, "m_corrupted": p.m_corrupted, "source": p.source} for p in res.pairs],
        "logit_lens": res.logit_lens, "layer_patching": res.layers, "neurons": res.top, "seconds": res.seconds,
        "pass_id": res.pass_id,
    }
