"""The verifier: hypotheses from the scan and the feature rules become verdicts with evidence.

`verify_model` runs the model once over held-out text (`features.collect`) and tests:

- **feature hypotheses**: for every rule with enough positives, the `per_rule` neurons with the
  highest AUROC as detectors of it (`features.score`). Decision rule:
  `confirmed` if q <= alpha (Benjamini-Hochberg over every (neuron, rule) pair scored) and
  AUROC >= min_auroc and held-out F1 >= min_f1; `rejected` if q > alpha or AUROC < 0.6;
  otherwise `inconclusive` (significant but weak).
- **prediction / suppression hypotheses**: the `candidates` strongest candidates of every source
  (`discover.candidates`: the scan's roles, neurons whose strongest token stands out of their own
  vocabulary distribution, the neurons token studies singled out, the most congruent neurons of
  the tokens most often next in the held-out text; strongest |z| first), each with its tail X:
  the top (prediction) or bottom (suppression) tokens of the whole vocabulary whose
  standardised cosine `z = (cos(w_out, U[:, t]) - mean) / sd` is beyond
  `Phi^-1(1 - tail_alpha / d_vocab)` (4.1 sd for a 2,048-token vocabulary, 4.8 for GPT-2's),
  and always the candidate's token, which names the hypothesis (at most 256 tokens, strongest
  first; `tail_size` is the size of X before that cut).
  **Signed activations**: the hypothesis is stated in the neuron's effective direction `s * w_out`,
  s = the sign of its strong activations (`tail_sign`: the larger in magnitude of its 0.1% and
  99.9% quantiles on the held-out text; -1 for a gated neuron that acts through negative
  activations), so the weights' role flips when s = -1 and the tests read `s * act`.
  Evidence: the AUROC of `s * act` for "the true next token is in X" and for "the model's top
  prediction is in X" (plus, when the checkpoint has a corpus pass, how its activation-vs-top-
  prediction curve rises: Spearman correlation over bins with >= 20 positions), and a mean
  ablation: the activation set to its held-out mean at every position of the sequences where a
  token of X is next; the change of log p(X) (log of the summed probability of X's tokens) there
  is compared with `controls` random neurons of the same layer ablated the same way
  (z = (effect - mean of controls) / sd of controls) and with the neuron's own effect at up to
  512 other positions of those sequences (Welch t: is the effect specific to where X is next? A
  neuron whose w_out merely points at X moves log p(X) wherever it is ablated).
  Decision rule: `confirmed` if the ablation moves log p(X) the predicted way (down for
  prediction, up for suppression) with z and t beyond 3 and, for prediction, AUROC(X next) >=
  pred_auroc; `rejected` if |z| < 2 or |t| < 2 (and AUROC(X next) < 0.55 for prediction);
  otherwise `inconclusive`, also when no token of X is next in the held-out text. When the
  ablation contradicts the hypothesis (z and t beyond 3 the other way), the revised hypothesis
  (direction -s: the other role) is tested by its own rule and, if confirmed, stated with
  `revised` in the evidence. A suppression verdict says when the neuron acts: `when` = "X is
  likely" if AUROC(X next) >= 0.7 (it fires where X is next and lowers it: calibration).

Every number that decided a verdict is stored with it (`hypotheses.evidence`, JSON), with the
decision rule that decided (`decided_by`). One run is one transaction.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass

import numpy as np

from discover.errors import QueryError

VERDICTS = ("confirmed", "rejected", "inconclusive")


@dataclass(frozen=True)
class VerifyConfig:
    candidates: int = 20  # prediction / suppression candidates tested (strongest first)
    per_rule: int = 3  # feature hypotheses per rule
    tokens: int = 50_000  # held-out document tokens
    context: int | None = None
    controls: int = 20  # same-layer random neurons for the ablation baseline
    max_ablation_sequences: int = 32
    alpha: float = 0.05
    min_auroc: float = 0.85
    min_f1: float = 0.5
    pred_auroc: float = 0.7
    min_positives: int = 20
    tail_alpha: float = 0.05  # a token is in a candidate's tail X when z > Phi^-1(1 - tail_alpha / d_vocab)
    seed: int = 0
    split: str = "heldout"

    def __post_init__(self):
        for name in ("candidates", "per_rule", "controls"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.tokens < 1:
            raise ValueError(f"tokens must be a positive number of tokens, got {self.tokens}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if not 0 < self.tail_alpha < 1:
            raise ValueError(f"tail_alpha must be in (0, 1), got {self.tail_alpha}")
        if self.controls < 3 and self.candidates > 0:
            raise ValueError("controls must be >= 3 to compare an ablation with random neurons")


@dataclass
class Hypothesis:
    layer: int
    neuron: int
    kind: str  # feature | prediction | suppression
    subject: str  # the rule name, or the token
    subject_id: int | None
    verdict: str
    decided_by: str
    evidence: dict


# ---------------------------------------------------------------------- feature tests
def feature_hypotheses(scores, N: int, cfg: VerifyConfig) -> list[Hypothesis]:
    out = []
    for j, rule in enumerate(scores.rules):
        ok = scores.tested[:, j]
        if not ok.any():
            continue
        col = np.where(ok, np.nan_to_num(scores.auroc[:, j], nan=-1), -2)  # untested neurons last
        for g in np.argsort(-col, kind="stable")[:min(cfg.per_rule, int(ok.sum()))]:
            ev = {k: float(getattr(scores, k)[g, j]) for k in ("auroc", "p", "q", "precision", "recall", "f1", "f1_a",
                                                              "threshold")}
            ev.update(n_positive=int(scores.n_pos[g, j]), alpha=cfg.alpha)
            if scores.counted is not None:  # an expert: scored over the tokens routed to it
                ev.update(counted_tokens=int(scores.counted[g]))
            if not np.isfinite(ev["q"]):
                v, why = "rejected", "no test possible: the activation is constant on this text"
            elif ev["q"] <= cfg.alpha and ev["auroc"] >= cfg.min_auroc and ev["f1"] >= cfg.min_f1:
                v, why = "confirmed", f"q <= {cfg.alpha} and AUROC >= {cfg.min_auroc} and held-out F1 >= {cfg.min_f1}"
            elif ev["q"] > cfg.alpha or ev["auroc"] < 0.6:
                v, why = "rejected", f"q > {cfg.alpha} or AUROC < 0.6"
            else:
                v, why = "inconclusive", (f"q <= {cfg.alpha} but AUROC < {cfg.min_auroc} or held-out F1 < "
                                          f"{cfg.min_f1}")
            out.append(Hypothesis(int(g // N), int(g % N), "feature", rule, None, v, why, ev))
    return out


# -------------------------------------------------------------------- prediction tests
def auroc_score(x: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import rankdata

    n1 = int(y.sum())
    n0 = len(y) - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    r = rankdata(x)
    return float((r[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


class Ablator:
    """Mean ablation of neurons on the held-out sequences where a token is next, from the
    residual stream cached after the neuron's layer (`ModelView.run_blocks`)."""

    def __init__(self, view, data):
        import torch

        self.torch, self.view, self.data = torch, view, data
        self.row0 = np.array([s[1] for s in data.seqs], np.int64)
        self.start = 1 if len(data.seqs) and len(data.seqs[0][0]) > data.seqs[0][2] else 0
        self.W_out = [view.W_out(l) for l in range(view.n_layers)]
        self._last = (None, None)  # (sequences, layers) -> trace: the last traced forward pass, reused
        self._shapes: dict = {}  # length -> a one-row trace of it: block arguments for shorter reruns

    def _trace(self, chosen: list, ids, layers: set):
        key = (tuple(chosen), frozenset(layers))
        if self._last[0] != key:
            self._last = (None, None)  # free the old trace before the new one is made
            self._last = (key, self.view.trace(ids, layers=layers))  # only the ablated layers' activations
        return self._last[1]

    def _shape(self, ids, T: int):
        """A one-row trace of length T (no activations kept): the block arguments with which
        `run_blocks` reruns any number of sequences cut to their first T positions."""
        if T not in self._shapes:
            if len(self._shapes) >= 16:  # bounded: a few lengths recur across hypotheses
                self._shapes.clear()
            tr = self.view.trace(ids[:1, :T], layers=set())
            tr.hidden = None  # only the arguments are read
            self._shapes[T] = tr
        return self._shapes[T]

    def _cut(self, need: np.ndarray, T: int, suffix: int) -> list:
        """Groups of the traced sequences for the controls' reruns, each cut after the last
        position any of its sequences needs (causal: the positions before are unchanged):
        [(batch rows, length)], chosen to minimise rows x length x `suffix` blocks plus, per
        group, a one-row trace of the length and a fixed cost; one group of everything at length
        T when cutting does not pay (always for the last layer, whose rerun is the norm alone)."""
        L = self.view.n_layers
        order = np.argsort(-need, kind="stable")
        s = need[order]
        n = len(s)

        def cost(i, j):  # sequences order[i:j] cut at s[i]; the uncut group needs no new trace
            return (j - i) * int(s[i]) * suffix + (0 if (i == 0 and j == n and s[0] == T) else int(s[i]) * L) + 64 * L

        best = [0.0] + [float("inf")] * n
        back = [0] * (n + 1)
        for j in range(1, n + 1):
            for i in range(j):
                c = best[i] + cost(i, j)
                if c < best[j]:
                    best[j], back[j] = c, i
        whole = n * T * suffix + 64 * L
        if whole <= best[n]:
            return [(np.arange(n), T)]
        groups, j = [], n
        while j > 0:
            i = back[j]
            groups.append((np.sort(order[i:j]), int(s[i])))
            j = i
        return groups[::-1]

    def effects(self, tokens, neurons: list, means: np.ndarray, max_seqs: int, elsewhere: int = 0):
        """Mean change of log p(X) = log sum of p(t), t in `tokens`, at the positions where a token of
        X is next, per (layer, neuron): (effects, positions). With `elsewhere` > 0 also the first
        neuron's change at each of those positions and at up to `elsewhere` other positions of the
        same sequences (evenly spaced; X not next there): (effects, positions, at X-next, elsewhere)."""
        torch, view, data = self.torch, self.view, self.data
        tokens = np.atleast_1d(np.asarray(tokens, np.int64))
        tok_idx = torch.from_numpy(tokens)
        rows = np.flatnonzero(np.isin(data.next_token, tokens))
        if len(rows) == 0:
            empty = np.zeros(0)
            return (np.full(len(neurons), np.nan), 0) + ((empty, empty) if elsewhere else ())
        seq_of = np.searchsorted(self.row0, rows, side="right") - 1
        chosen = list(dict.fromkeys(seq_of.tolist()))[:max_seqs]
        keep = np.isin(seq_of, chosen)
        rows, seq_of = rows[keep], seq_of[keep]
        local = {s: i for i, s in enumerate(chosen)}
        b_idx = torch.tensor([local[s] for s in seq_of])
        t_idx = torch.tensor(rows - self.row0[seq_of] + self.start)
        seqs = [data.seqs[s][0] for s in chosen]
        T = max(len(s) for s in seqs)
        ids = torch.tensor([s + [s[0]] * (T - len(s)) for s in seqs])
        tr = self._trace(chosen, ids, {l for l, _ in neurons})
        n_next = len(rows)
        if elsewhere:  # other real positions of the chosen sequences, X not next there
            is_x = np.zeros((len(seqs), T), bool)
            is_x[b_idx.numpy(), t_idx.numpy()] = True
            other = [(b, t) for b, s in enumerate(seqs) for t in range(self.start, len(s)) if not is_x[b, t]]
            pick = np.linspace(0, len(other) - 1, min(elsewhere, len(other))).astype(int) if other else []
            b_idx = torch.cat([b_idx, torch.tensor([other[i][0] for i in pick], dtype=torch.long)])
            t_idx = torch.cat([t_idx, torch.tensor([other[i][1] for i in pick], dtype=torch.long)])

        def logp(hidden, rows=b_idx, cols=t_idx):  # log p(X) at positions (rows, cols) of hidden
            logits = view.logits(hidden[rows, cols]).float()
            return torch.logsumexp(torch.log_softmax(logits, -1)[:, tok_idx], -1)

        # where X is next, per sequence: the controls' reruns stop after the last such position
        xb, xt = b_idx[:n_next].numpy(), t_idx[:n_next].numpy()
        need = np.zeros(len(seqs), np.int64)
        np.maximum.at(need, xb, xt + 1)
        layer = neurons[0][0] if len({l for l, _ in neurons}) == 1 else None
        whole_only = layer is None or view.positions_depend_on_length
        groups = [(np.arange(len(seqs)), T)] if whole_only else self._cut(need, T, view.n_layers - 1 - layer)
        cuts = []  # per group: (its sequences, None when it is the whole trace; length; block-argument
        #             trace; the X-next entries in it; their rows in it)
        for members, Tg in groups:
            inside = np.flatnonzero(np.isin(xb, members))
            in_group = torch.from_numpy(np.searchsorted(members, xb[inside]))
            if len(members) == len(seqs) and Tg == T:
                cuts.append((None, T, tr, inside, in_group))
            else:
                cuts.append((torch.from_numpy(members), Tg, self._shape(ids, Tg), inside, in_group))
        at = np.concatenate([c[3] for c in cuts])  # the X-next entries in the groups' order
        sliced: dict = {}  # (group, layer) -> its block outputs and raw MLP outputs, cut (shared by its controls)

        def ablate(l, n, members, Tg, g):
            """The block output, raw MLP output and the change of neuron n's mean ablation on the
            sequences `members` cut at Tg (None: the whole trace)."""
            def part(x):
                return x if members is None else x[members, :Tg]

            m = float(means[l, n])  # NaN: an expert no held-out token was routed to (it writes nothing)
            change = (m if np.isfinite(m) else 0.0) - part(tr.acts[l][:, :, n])
            if tr.scales is not None:  # an expert writes through its routing weight (0: not routed)
                change = change * part(tr.scales[l][:, :, n])
            delta = change[..., None] * self.W_out[l][n]  # (S, T, d)
            delta[:, :self.start] = 0  # the BOS position is not counted in the mean: leave it alone
            if (g, l) not in sliced:
                raw = tr.mlp_raw[l]
                sliced[g, l] = (part(tr.outs[l]), None if raw is None else part(raw))
            return (*sliced[g, l], delta)

        with torch.inference_mode():
            base = logp(tr.hidden)
            out = np.empty(len(neurons))
            first = None
            for i, (l, n) in enumerate(neurons):
                if i == 0 and elsewhere:  # the neuron itself: also at the other positions, on whole sequences
                    hid = view.run_blocks(tr, l, view.add_to_mlp(l, *ablate(l, n, None, T, "whole")))
                    d = (logp(hid) - base).double().numpy()
                    first = d
                else:  # where X is next only, each group of sequences cut after its last such position
                    parts = []
                    for g, (members, Tg, targs, inside, in_group) in enumerate(cuts):
                        hid = view.run_blocks(targs, l, view.add_to_mlp(l, *ablate(l, n, members, Tg, g)))
                        parts.append(logp(hid, in_group, t_idx[:n_next][inside]))
                    d = np.empty(n_next)
                    d[at] = (torch.cat(parts) - base[torch.from_numpy(at)]).double().numpy()
                    if i == 0:
                        first = d
                out[i] = float(d[:n_next].mean())
        if elsewhere:
            return out, n_next, first[:n_next], first[n_next:]
        return out, n_next


MAX_TAIL = 256  # tokens of X kept (strongest first); evidence's tail_size is X's size before truncation


def counted_means(data, block: int = 1024) -> np.ndarray:
    """(G,) float64: each neuron's mean activation over the tokens it counts (every token; for an
    expert, the tokens routed to it; NaN if none)."""
    out = np.full(data.acts.shape[0], np.nan)
    for g0, g1, rows in data.segments(block):
        x = np.asarray(data.acts[g0:g1], dtype=np.float64)
        if rows is not None:
            x = x[:, rows]
        if x.shape[1]:
            out[g0:g1] = x.mean(1)
    return out


def subject_label(subject: str, evidence: dict) -> str:
    """How a verdict's subject is shown: the strongest token, and how many more X holds."""
    more = (evidence.get("tail_size") or len(evidence.get("token_ids") or [0])) - 1
    return f"{subject} +{more}" if more > 0 else subject


def prediction_hypotheses(view, store, ckpt_id: str, data, cfg: VerifyConfig, progress: bool = False,
                          effects=None) -> list[Hypothesis]:
    """Test the scan's prediction / suppression candidates (and the corpus's under-predicted
    words') by AUROC and mean ablation. `effects`: what runs the mean ablations,
    `effects(view, data, jobs, means, progress)` -> one `Ablator.effects` result per job
    (default: `local_effects`, this process; `discover.cluster.ClusterVerify.effects`: a Ray cluster's
    workers). Each job is (tokens of X, [(layer, neuron), *controls], max sequences, elsewhere)."""
    from discover.candidates import Tails, candidates, underpredicted, word_tokens

    tails = Tails(view, cfg.tail_alpha)
    strings = view.token_strings()
    interesting = underpredicted(data.next_token, data.top_pred, eligible=word_tokens(strings))
    cands = candidates(store, ckpt_id, cfg.candidates, tail_alpha=cfg.tail_alpha, tails=tails, interesting=interesting)
    if not cands:
        return []
    N, L = view.d_mlp, view.n_layers
    acts = data.acts  # (G, R) neuron-major, on disk (features.DiskMatrix)
    means = counted_means(data).reshape(L, N)
    has_next_all = data.next_token >= 0
    rng = np.random.default_rng(cfg.seed)
    curves = pass_curves(store, ckpt_id)
    drawn = [draw_controls(rng, N, c["neuron"], data.group, cfg.controls) for c in cands]  # in candidate order
    # the tails and the ablation jobs first; the ablations run layer by layer (candidates of one
    # layer whose X is next in the same sequences share one traced forward pass)
    order = sorted(range(len(cands)), key=lambda i: (cands[i]["layer"], i))
    tail_of = {}
    for i in order:
        c = cands[i]
        tail_of[i] = tails(c["layer"], c["neuron"], c["role"], c["token_id"], MAX_TAIL)
    jobs = [(np.array(tail_of[i][0], np.int64), [(cands[i]["layer"], cands[i]["neuron"])]
             + [(cands[i]["layer"], k) for k in drawn[i]], cfg.max_ablation_sequences, ELSEWHERE) for i in order]
    results = dict(zip(order, (effects or local_effects)(view, data, jobs, means, progress)))
    out: list = [None] * len(cands)
    for i in order:
        c, controls = cands[i], drawn[i]
        l, n, tok, role = c["layer"], c["neuron"], c["token_id"], c["role"]
        tail, tail_z, n_tail = tail_of[i]
        ids = np.array(tail, np.int64)
        x = np.asarray(acts[l * N + n], dtype=np.float64)
        is_next, is_top = np.isin(data.next_token, ids), np.isin(data.top_pred, ids)
        has_next = has_next_all
        rows = data.counted(l, n)  # an expert: the tokens routed to it
        if rows is not None:
            x, is_next, is_top, has_next = x[rows], is_next[rows], is_top[rows], has_next[rows]
        s = tail_sign(x)  # the side of its strong activations: its effective direction is s * w_out
        ev = {"token": strings[tok], "tokens": [strings[t] for t in ids], "token_ids": ids.tolist(),
              "tokens_z": [round(z, 3) for z in tail_z], "tail_cut_z": round(tails.cut, 3), "tail_size": n_tail,
              "weights_role": role, "tail_sign": s, "sources": c["sources"], "candidate_z": c["z"],
              "n_next": int(is_next.sum()), "n_top_prediction": int(is_top.sum()), "held_out_tokens": len(x)}
        if rows is not None:
            ev.update(counted_tokens=len(x), held_out_tokens=data.tokens)
        if "underpredicted" in c:  # the corpus source's reason: X is predicted far less often than it occurs
            ev["underpredicted"] = c["underpredicted"]
        ev.update(curve_trend(curves.get((l, n, tok))))
        eff, n_pos, at_x, other = results[i]
        z = t = float("nan")
        if n_pos:
            t = welch_t(at_x, other)
            ev.update(ablation_evidence(eff, n_pos), controls=[view.layout.name(l, c) for c in controls],
                      ablation_delta_elsewhere=float(other.mean()) if len(other) else None,
                      elsewhere_positions=len(other), specificity_t=t)
            z = ev["ablation_z"]
        else:
            ev.update(ablation_positions=0)
        kind, v, why = _decide(role, s, x, is_next, is_top, has_next, z, t, n_pos, ev, cfg)
        if n_pos == 0:
            why = (f"{strings[tok]!r} is never the next token in the held-out text" if len(ids) == 1 else
                   f"none of the {len(ids)} tokens of X is ever the next token in the held-out text")
        out[i] = Hypothesis(l, n, kind, strings[tok], tok, v, why, ev)
    return out


def local_effects(view, data, jobs: list, means: np.ndarray, progress: bool = False) -> list:
    """`Ablator.effects` of every job in this process, in order (a trace is reused while
    consecutive jobs ablate the same sequences and layer)."""
    from tqdm import tqdm

    abl = Ablator(view, data)
    return [abl.effects(*job[:2], means, job[2], elsewhere=job[3])
            for job in tqdm(jobs, desc="verify predictions", unit="hypothesis", disable=not progress, leave=False)]


def draw_controls(rng, N: int, n: int, group, k: int) -> list[int]:
    """`k` random neurons of neuron n's layer for the ablation baseline: any other neuron, or for
    an expert (`group`: each neuron's expert, None when dense) one of the same expert (the same
    routed tokens)."""
    pool = [i for i in range(N) if i != n and (group is None or group[i] == group[n])]
    return [int(c) for c in rng.choice(pool, size=min(k, len(pool)), replace=False)]


def ablation_evidence(eff: np.ndarray, n_pos: int) -> dict:
    """The mean ablation's numbers from `Ablator.effects` of (neuron, *controls): its change of
    log p(X), the controls' mean and sd, and z = (change - mean) / sd."""
    ctrl = eff[1:]
    sd = float(ctrl.std(ddof=1)) if len(ctrl) > 1 else float("nan")
    z = (eff[0] - float(ctrl.mean())) / sd if sd > 0 else float("nan")
    return {"ablation_positions": n_pos, "ablation_delta_logp": float(eff[0]), "control_mean": float(ctrl.mean()),
            "control_sd": sd, "ablation_z": z}


FLIP = {"prediction": "suppression", "suppression": "prediction"}
ELSEWHERE = 512  # positions where X is not next, for the ablation's specificity test


def welch_t(a: np.ndarray, b: np.ndarray) -> float:
    """Welch's t of mean(a) - mean(b) (NaN when either side has fewer than 2 values)."""
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    se = np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
    return float((a.mean() - b.mean()) / se) if se > 0 else float("nan")


def tail_sign(x: np.ndarray) -> int:
    """+1 if a neuron's strong activations are positive, -1 if negative: the sign of the larger
    of its 0.1% and 99.9% quantiles in magnitude (GELU neurons: +1; gated ones either)."""
    if len(x) == 0:
        return 1
    lo, hi = np.quantile(x, [0.001, 0.999])
    return 1 if hi >= -lo else -1


def _rule(kind: str, z: float, t: float, auc: float, cfg) -> tuple[str, str]:
    """The verdict of an effective hypothesis from its ablation z (against same-layer neurons),
    the ablation's specificity t (where X is next against elsewhere) and AUROC(X next)."""
    specific = (t <= -3) if kind == "prediction" else (t >= 3)
    if kind == "prediction":
        if z <= -3 and specific and np.isfinite(auc) and auc >= cfg.pred_auroc:
            return "confirmed", (f"mean ablation lowers log p(X) where X is next, z <= -3 against same-layer "
                                 f"neurons and t <= -3 against elsewhere, and AUROC(X next) >= {cfg.pred_auroc}")
        if (abs(z) < 2 or abs(t) < 2) and not (auc >= 0.55):
            return "rejected", "ablation |z| < 2 or |t| < 2, and AUROC(X next) < 0.55"
        return "inconclusive", "one test passed, the other did not, or weakly"
    if z >= 3 and specific:
        return "confirmed", ("mean ablation raises log p(X) where X is next, z >= 3 against same-layer neurons and "
                             "t >= 3 against elsewhere")
    if abs(z) < 2 or abs(t) < 2:
        return "rejected", "ablation |z| < 2 or |t| < 2"
    return "inconclusive", "2 <= |z| < 3, the effect is not specific to where X is next, or it has the wrong sign"


def _decide(role, s, x, is_next, is_top, has_next, z, t, n_pos, ev, cfg) -> tuple[str, str, str]:
    """(kind, verdict, decided_by). The hypothesis is stated in the neuron's effective direction
    d * w_out, d = its tail sign s: the weights' role, flipped when its strong activations are
    negative, tested with the activation d * x. When the ablation contradicts it strongly (|z| >= 3
    the other way), the revised hypothesis (direction -s: the other role, its own AUROC) is tested
    instead and, if its rule confirms it, stated with `revised` in the evidence."""
    def state(d):
        kind = role if d > 0 else FLIP[role]
        xd = d * x
        auc = auroc_score(xd[has_next], is_next[has_next])
        return kind, auc, auroc_score(xd, is_top)

    kind, auc, auc_top = state(s)
    ev.update(direction=s, auroc_next=auc, auroc_top_prediction=auc_top)
    if n_pos == 0 or not np.isfinite(z):
        return kind, "inconclusive", "no ablation test possible"
    v, why = _rule(kind, z, t, auc, cfg)
    contradicted = (z >= 3 and t >= 3) if kind == "prediction" else (z <= -3 and t <= -3)
    if v != "confirmed" and contradicted:
        kind2, auc2, auc_top2 = state(-s)
        v2, why2 = _rule(kind2, z, t, auc2, cfg)
        if kind2 == "suppression" and v2 == "confirmed" and not (np.isfinite(auc2) and auc2 >= cfg.pred_auroc):
            # the contradiction alone is the suppression rule: the revision must also show, on its own
            # evidence, when it acts: active (in the revised direction) where X is next, X likely
            v2 = "inconclusive"
        elif kind2 == "suppression" and v2 == "confirmed":
            why2 += f", and AUROC(X next) >= {cfg.pred_auroc}: it suppresses X when X is likely"
        if v2 == "confirmed":
            ev.update(revised=True, revised_from=kind, direction=-s, auroc_next=auc2, auroc_top_prediction=auc_top2)
            kind, v, why = kind2, v2, f"revised from {kind} (the ablation contradicted it, z = {z:+.3g}): {why2}"
    if kind == "suppression" and np.isfinite(ev["auroc_next"]):
        # a suppression neuron active where X is next lowers p(X) when X is likely (calibration)
        ev["when"] = "X is likely" if ev["auroc_next"] >= 0.7 else "X is unlikely" if ev["auroc_next"] <= 0.3 else "mixed"
    return kind, v, why


def pass_curves(store, ckpt_id: str, pass_id: str | None = None) -> dict:
    """{(layer, neuron, token): [(bin lo, bin hi, positions, top_prediction), ...]} of pass
    `pass_id`, else the checkpoint's latest corpus pass (empty if it has none)."""
    from discover.query import latest_pass

    p = {"pass_id": pass_id} if pass_id else latest_pass(store, {"checkpoint_id": ckpt_id})
    if p is None:
        return {}
    out: dict = {}
    for l, n, t, lo, hi, pos, top in store.con.execute(
            "SELECT layer, neuron, token_id, lo, hi, positions, top_prediction FROM prediction_curves "
            "WHERE pass_id = ? ORDER BY layer, neuron, token_id, bin", [p["pass_id"]]).fetchall():
        out.setdefault((l, n, t), []).append((lo, hi, pos, top))
    return out


def curve_trend(bins) -> dict:
    """Does the corpus pass's activation-vs-top-prediction curve rise? Spearman correlation of the
    bin order with the fraction, over bins with at least 20 positions (reported as evidence)."""
    if not bins:
        return {"curve_bins": 0}
    from scipy.stats import spearmanr

    rows = [(i, top / pos) for i, (lo, hi, pos, top) in enumerate(bins) if pos >= 20]
    res = {"curve_bins": len(rows), "curve_positions": int(sum(b[2] for b in bins)),
           "curve_top_fraction_highest_bin": rows[-1][1] if rows else None}
    if len(rows) >= 3 and len({f for _, f in rows}) > 1:
        res["curve_spearman"] = float(spearmanr([r[0] for r in rows], [r[1] for r in rows])[0])
    return res


# ---------------------------------------------------------------------------- pipeline
@dataclass
class VerifySummary:
    verify_id: str
    checkpoint_id: str
    tokens: int
    documents: int
    rules: int
    skipped_rules: list
    counts: dict  # kind -> verdict -> n
    shuffled: dict
    seconds: float


def verify_model(spec: str | None, store, config: VerifyConfig | None = None, *, corpus: str | None = None,
                 text_field: str = "text", rules_dirs=None, allow_pickle: bool = False, progress: bool = True,
                 prepared=None, key: str | None = None, spread=None) -> VerifySummary:
    """Test the top hypotheses of a model and commit verdicts and evidence to `store`. `spread`:
    what runs the held-out forward passes and the mean ablations elsewhere (`.forward`, `.effects`:
    `discover.cluster.ClusterVerify`, a Ray cluster's workers; None: this process)."""
    from discover.features import collect, score_sets, shuffle_summary, shuffled_labels
    from discover.scan import scan_model

    cfg = config or VerifyConfig()
    t0 = time.perf_counter()
    view, identity, rules, corp, described = prepared or prepare(spec, corpus=corpus, text_field=text_field,
                                                                 rules_dirs=rules_dirs, allow_pickle=allow_pickle,
                                                                 split=cfg.split)
    if store.checkpoint(identity[1]) is None:  # an existing scan keeps its settings and role thresholds
        scan_model(view.spec, store, progress=progress, identity=identity, view=view)
    data = collect(view, corp, rules, tokens=cfg.tokens, context=cfg.context, split=cfg.split, progress=progress,
                   forward=spread.forward if spread is not None else None)
    # the rules' labels and their shuffle (the false-positive check) in one pass over the activations
    scores, shuf = score_sets(data, [data.labels, shuffled_labels(data, cfg.seed)], min_positives=cfg.min_positives,
                              progress=progress)
    shuffled = shuffle_summary(shuf, cfg.alpha)
    hyps = feature_hypotheses(scores, view.d_mlp, cfg)
    hyps += prediction_hypotheses(view, store, identity[1], data, cfg, progress=progress,
                                  effects=spread.effects if spread is not None else None)
    seconds = time.perf_counter() - t0
    vid = uuid.uuid4().hex[:12]
    _write(store, vid, identity[1], described, cfg, data, shuffled, hyps, seconds, key)
    counts: dict = {}
    for h in hyps:
        counts.setdefault(h.kind, {v: 0 for v in VERDICTS})[h.verdict] += 1
    return VerifySummary(vid, identity[1], data.tokens, data.documents, len(rules), data.skipped, counts, shuffled,
                         seconds)


def check_split(corp, split: str) -> None:
    """The split the tests read must have text (the held-out split is 5% of the documents)."""
    from discover.errors import CorpusError

    for _ in corp.iter_documents(split):
        return
    raise CorpusError(f"the {split} split of corpus {corp.path} has no documents (held-out = about 5% of the "
                      f"documents, chosen by a hash of their ids); use --split all / --verify-split all or a bigger corpus")


def prepare(spec, *, corpus=None, text_field="text", rules_dirs=None, allow_pickle=False, split="heldout"):
    """Load and check the model, the rules and the corpus before the store is touched."""
    from discover.adapter import identify, load_model, require_statistics
    from discover.corpus import open_corpus
    from discover.defaults import default_model_spec
    from discover.rules import load_rules

    spec = spec or default_model_spec()
    require_statistics(spec)  # from the config alone, before the weights are hashed or loaded
    identity = identify(spec, allow_pickle=allow_pickle)
    view = load_model(spec, allow_pickle=allow_pickle, identity=identity)
    view.require_statistics()
    if view.tokenizer is None:
        raise QueryError(f"model {spec} has no tokenizer; the verifier needs one")
    rules = load_rules(rules_dirs)
    corp = open_corpus(corpus, text_field=text_field)
    described = corp.describe()
    check_split(corp, split)
    return view, identity, rules, corp, described


def _write(store, vid, ckpt_id, described, cfg, data, shuffled, hyps, seconds, key=None) -> None:
    import pyarrow as pa

    from discover import __version__
    from discover.store import insert_arrow, transaction

    tbl = pa.table({
        "verify_id": pa.repeat(pa.scalar(vid), len(hyps)),
        "checkpoint_id": pa.repeat(pa.scalar(ckpt_id), len(hyps)),
        "layer": pa.array([h.layer for h in hyps], pa.int16()),
        "neuron": pa.array([h.neuron for h in hyps], pa.int32()),
        "kind": pa.array([h.kind for h in hyps], pa.string()),
        "subject": pa.array([h.subject for h in hyps], pa.string()),
        "subject_id": pa.array([h.subject_id for h in hyps], pa.int32()),
        "verdict": pa.array([h.verdict for h in hyps], pa.string()),
        "decided_by": pa.array([h.decided_by for h in hyps], pa.string()),
        "evidence": pa.array([json.dumps(_finite(h.evidence)) for h in hyps], pa.string()),
    })
    with transaction(store.con) as con:
        con.execute("INSERT INTO verify_runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, now(), ?, ?)",
                    [vid, ckpt_id, described["fingerprint"], json.dumps(described), cfg.split, data.tokens,
                     json.dumps(asdict(cfg)),
                     json.dumps({"skipped_rules": data.skipped, "shuffled_labels": shuffled, "key": key}),
                     seconds, __version__])
        insert_arrow(con, "hypotheses", tbl)


def _finite(ev: dict) -> dict:
    """NaN / inf are not JSON: store them as null."""
    return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in ev.items()}


def query_verdicts(store, model: str, *, verdict: str | None = None, kind: str | None = None,
                   top: int = 50, verify_id: str | None = None) -> dict:
    """A verify run's hypotheses of a model (default: the latest run), confirmed first, strongest
    evidence first."""
    if verdict is not None and verdict not in VERDICTS:
        raise QueryError(f"unknown verdict {verdict!r}; use one of {', '.join(VERDICTS)}")
    if kind is not None and kind not in ("feature", "prediction", "suppression"):
        raise QueryError(f"unknown kind {kind!r}; use feature, prediction or suppression")
    if top < 1:
        raise QueryError("--top must be at least 1")
    ckpt = store.resolve_model(model)
    run = store.con.execute(
        "SELECT verify_id, tokens, created_at, corpus FROM verify_runs WHERE checkpoint_id = ? "
        "AND (? IS NULL OR verify_id = ?) ORDER BY created_at DESC LIMIT 1",
        [ckpt["checkpoint_id"], verify_id, verify_id]).fetchone()
    if run is None:
        raise QueryError(f"model {model} has no verdicts in this store; run `discover verify {model}` first")
    where, params = ["verify_id = ?"], [run[0]]
    if verdict:
        where.append("verdict = ?")
        params.append(verdict)
    if kind:
        where.append("kind = ?")
        params.append(kind)
    rows = store.con.execute(
        f"SELECT layer, neuron, kind, subject, verdict, decided_by, evidence FROM hypotheses WHERE {' AND '.join(where)} "
        "ORDER BY CASE verdict WHEN 'confirmed' THEN 0 WHEN 'inconclusive' THEN 1 ELSE 2 END, "
        "kind, layer, neuron", params).fetchall()
    from discover.names import layout_of

    layout = layout_of(ckpt)
    items = []
    for l, n, k, subj, v, why, ev in rows:
        ev = json.loads(ev)
        strength = ev.get("auroc") if k == "feature" else ev.get("auroc_next")
        strength = float(strength) if strength is not None else float("nan")
        items.append({"neuron": layout.name(l, n), "layer": l, "neuron_index": n, "kind": k, "subject": subj,
                      "verdict": v, "decided_by": why, "evidence": ev, "strength": strength})
    order = {"confirmed": 0, "inconclusive": 1, "rejected": 2}
    items.sort(key=lambda x: (order[x["verdict"]], -(x["strength"] if np.isfinite(x["strength"]) else -1)))
    corpus = json.loads(run[3]) if isinstance(run[3], str) else run[3]
    return {"model": model, "checkpoint_id": ckpt["checkpoint_id"], "verify_id": run[0], "tokens": run[1],
            "corpus": corpus, "hypotheses": items[:top], "total": len(items)}
