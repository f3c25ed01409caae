"""Prediction and suppression candidates from every source, strongest first.

A candidate is (neuron, token, role): the neuron's weights raise (prediction) or lower
(suppression) the token's logit. Its strength is the standardised cosine of its token,
`z = (cos(w_out, U[:, t]) - mean) / sd` over the neuron's whole vocabulary distribution (the
scan's `c_t`), in absolute value. Sources:

- `kurtosis`: the scan's prediction / suppression roles (vocabulary kurtosis and skew beyond the
  role thresholds), with their top (bottom) token;
- `tail`: every neuron whose strongest token stands out of its own vocabulary distribution:
  |z| beyond `Phi^-1(1 - tail_alpha / d_vocab)`, a Bonferroni cut over the vocabulary (a neuron
  whose cosines were Gaussian would pass with probability below `tail_alpha`). This finds
  neurons aimed at a small family of tokens (" an", "An", " An", "an", "AN"), whose kurtosis
  stays near 3;
- `study`: the neurons the latest study of each token ranked first (those it examined and did
  not reject; without an examination, its 3 strongest), with the studied token;
- `corpus`: the tokens the text being tested makes interesting: the words the model predicts far
  less often than they occur (the seed's " an": "the model only predicted ' an' 1,500 times,
  though it occurred 12,000 times"), by the z of the difference of two Poisson counts,
  `(occurs - predicted) / sqrt(occurs + predicted)` (`underpredicted`), over tokens with a letter
  (`word_tokens`: under-predicted whitespace, rules and ASCII art are layout, not a choice of
  word); for each, its most congruent (prediction) and most negative (suppression) neuron.

The budget is shared by the sources, each strongest first (|z|; a study by recovery; the corpus
by the under-prediction z of its token): round robin over the sources, so that a source with thousands of
candidates (the tail, on a real vocabulary) never crowds out the few a study singled out. A
(neuron, role) several sources propose is listed once, with every source. The scan stores the cosines of each neuron's top and bottom
tokens and its vocabulary moments, so the first two sources are SQL; the others compute the z of
their token from the weights (`Tails`)."""

from __future__ import annotations

import json

import numpy as np

SOURCES = ("kurtosis", "tail", "study", "corpus")


def bonferroni_cut(tail_alpha: float, d_vocab: int) -> float:
    """Phi^-1(1 - tail_alpha / d_vocab): the |z| a token needs to stand out of a vocabulary."""
    from scipy.stats import norm

    return float(norm.isf(tail_alpha / d_vocab))


def underpredicted(next_token: np.ndarray, top_pred: np.ndarray, k: int = 10, min_occurs: int = 5,
                   eligible: np.ndarray | None = None) -> list[dict]:
    """The `k` tokens the model predicts (top-1) least often against how often they are next, at
    positions with a next token: {token_id, occurs, predicted, z}, z = (occurs - predicted) /
    sqrt(occurs + predicted) > 0 descending (ties by token id), tokens next at least `min_occurs`
    times (fewer leave nothing to test) and, given `eligible` (bool per token id), eligible."""
    has = np.asarray(next_token) >= 0
    nxt, top = np.asarray(next_token)[has], np.asarray(top_pred)[has]
    size = int(max(nxt.max(initial=-1), top.max(initial=-1))) + 1
    if eligible is not None:
        size = max(size, len(eligible))
    occurs, predicted = np.bincount(nxt, minlength=size), np.bincount(top, minlength=size)
    keep = (occurs >= min_occurs) & (occurs > predicted)
    if eligible is not None:
        keep[:len(eligible)] &= np.asarray(eligible, bool)
        keep[len(eligible):] = False
    ok = np.flatnonzero(keep)
    z = (occurs[ok] - predicted[ok]) / np.sqrt(occurs[ok] + predicted[ok])
    order = np.lexsort((ok, -z))[:k]
    return [{"token_id": int(ok[i]), "occurs": int(occurs[ok[i]]), "predicted": int(predicted[ok[i]]),
             "z": float(z[i])} for i in order]


def word_tokens(strings: list) -> np.ndarray:
    """(d_vocab,) bool: the tokens with a letter in them."""
    return np.array([any(ch.isalpha() for ch in t) for t in strings], bool)


class Tails:
    """Standardised cosines of a neuron's w_out with every token (the processed weights), and its
    tail X: the tokens beyond the Bonferroni cut on the candidate's side."""

    def __init__(self, view, tail_alpha: float):
        import torch

        U = view.processed_unembed().float()
        n = U.norm(dim=0)
        self.U = U / torch.where(n > 0, n, torch.ones_like(n))
        self.cut = bonferroni_cut(tail_alpha, U.shape[1])
        self.view, self.W = view, {}

    def z(self, layer: int, neuron: int) -> np.ndarray:
        """(d_vocab,) float64: z of every token for this neuron."""
        if layer not in self.W:
            self.W[layer] = self.view.processed_W_out(layer)
        w = self.W[layer][neuron].float()
        c = ((w / w.norm().clamp_min(1e-30)) @ self.U).double()
        sd = float(c.std(unbiased=False))
        return ((c - c.mean()) / sd).numpy() if sd > 0 else np.zeros(c.shape[0])

    def __call__(self, layer: int, neuron: int, role: str, strongest: int, limit: int = 256) -> tuple[list, list, int]:
        """(token ids, their z, the size of X before truncation to `limit`); `strongest` comes first,
        then the others by |z|."""
        z = self.z(layer, neuron)
        signed = z if role == "prediction" else -z
        passed = np.flatnonzero(signed > self.cut)
        order = passed[np.argsort(-signed[passed], kind="stable")]
        tail = [int(strongest)] + [int(t) for t in order if t != strongest]
        ids = tail[:limit]
        return ids, [float(z[t]) for t in ids], len(tail)


def candidates(store, checkpoint_id: str, limit: int, *, tail_alpha: float = 0.05, tails: Tails | None = None,
               interesting: list | None = None) -> list[dict]:
    """Up to `limit` candidates {layer, neuron, token_id, role, z, sources}, strongest |z| first.
    `tails` (weights) enables the `study` and `corpus` sources; `interesting` (`underpredicted`
    over the text being tested, most interesting first) the `corpus` source, whose candidates
    carry their token's counts as `underpredicted`."""
    if limit <= 0:
        return []
    con = store.con
    ck = store.checkpoint(checkpoint_id)
    cut = bonferroni_cut(tail_alpha, int(ck["d_vocab"]))
    lists: dict = {src: [] for src in SOURCES}

    def add(l, n, tok, role, z, source, **extra):
        lists[source].append({"layer": int(l), "neuron": int(n), "token_id": int(tok), "role": role, "z": float(z),
                              "sources": [source], **extra})

    # the scan's roles, with their strongest token (by congruence) and its z
    for l, n, role, tok, z in con.execute(
            "SELECT r.layer, r.neuron, r.role, t.token_id, (t.cosine - v.vocab_mean) / sqrt(v.vocab_var) "
            "FROM roles r JOIN neuron_tokens t USING (checkpoint_id, layer, neuron) JOIN neurons v USING "
            "(checkpoint_id, layer, neuron) WHERE r.checkpoint_id = ? AND t.rank = 0 AND v.vocab_var > 0 AND ("
            "(r.role = 'prediction' AND t.side = 'top') OR (r.role = 'suppression' AND t.side = 'bottom'))",
            [checkpoint_id]).fetchall():
        add(l, n, tok, role, z, "kurtosis")
    # every neuron whose strongest token stands out of its own vocabulary distribution
    for l, n, side, tok, z in con.execute(
            "SELECT layer, neuron, side, token_id, z FROM (SELECT t.layer, t.neuron, t.side, t.token_id, "
            "(t.cosine - v.vocab_mean) / sqrt(v.vocab_var) AS z, row_number() OVER (PARTITION BY t.layer, t.neuron, "
            "t.side ORDER BY CASE WHEN t.side = 'top' THEN -t.cosine ELSE t.cosine END, t.rank) AS k "
            "FROM neuron_tokens t JOIN neurons v USING (checkpoint_id, layer, neuron) "
            "WHERE t.checkpoint_id = ? AND v.vocab_var > 0) WHERE k = 1 AND abs(z) > ? AND "
            "((side = 'top' AND z > 0) OR (side = 'bottom' AND z < 0))", [checkpoint_id, cut]).fetchall():
        add(l, n, tok, "prediction" if side == "top" else "suppression", z, "tail")
    if tails is not None:
        # the neurons token studies singled out
        seen = set()
        for target, tid, neurons in [] if not store.has_table("study_runs") else con.execute(
                "SELECT target, target_id, neurons FROM study_runs WHERE checkpoint_id = ? ORDER BY created_at DESC",
                [checkpoint_id]).fetchall():
            if target in seen:
                continue
            seen.add(target)
            top = json.loads(neurons) if isinstance(neurons, str) else neurons
            examined = [t for t in top if "verdict" in t]
            for t in [t for t in examined if t["verdict"] != "rejected"] if examined else top[:3]:
                z = float(tails.z(t["layer"], t["neuron_index"])[tid])
                add(t["layer"], t["neuron_index"], tid, "prediction" if z >= 0 else "suppression", z, "study")
        # the most congruent neurons of the tokens the model predicts far less often than they occur
        for u in interesting or []:
            tok = u["token_id"]
            for sign, role in ((1, "prediction"), (-1, "suppression")):
                hit = con.execute("SELECT layer, neuron FROM token_neurons WHERE checkpoint_id = ? AND token_id = ? "
                                  "AND sign = ? AND rank = 0", [checkpoint_id, tok, sign]).fetchone()
                if hit is not None:
                    add(hit[0], hit[1], tok, role, tails.z(hit[0], hit[1])[tok], "corpus", underpredicted=dict(u))
    for src in ("kurtosis", "tail"):
        lists[src].sort(key=lambda c: (-abs(c["z"]), c["layer"], c["neuron"]))
    found: dict = {}
    for k in range(max(len(v) for v in lists.values())):  # round robin, each source strongest first
        for src in SOURCES:
            if k < len(lists[src]):
                c = lists[src][k]
                key = (c["layer"], c["neuron"], c["role"])
                if key in found:
                    if src not in found[key]["sources"]:
                        found[key]["sources"].append(src)
                elif len(found) < limit:
                    found[key] = c
    return list(found.values())
