"""Feature tests (METHODS.md, "Feature tests"): every neuron scored as a detector of every rule.

`collect` runs the model over held-out documents (BOS + pieces of `context - 1` tokens, as the
corpus pass) and keeps, for every counted token, every neuron's activation (a float32 file, neuron-major, in a
temporary directory, written and read with explicit I/O (`DiskMatrix`): tokens x neurons x 4
bytes of disk, e.g. 50,000 x 36,864 x 4 = 7.4 GB for GPT-2 small; the process holds one block of
neurons, the page cache the rest) and the rule labels of the token (`rules.label_tokens`
through the tokenizer's character offsets). Documents are split in two halves by a hash of
their id: part A chooses thresholds, part B scores them.

`score`, vectorised over neurons (in blocks) and rules:
- AUROC of the activation as a detector of the rule, exact, from average ranks over all tokens
  (Mann-Whitney U / (n_pos * n_neg));
- p-value under the permutation null of the labels: the exact mean and variance of U over all
  relabellings (tie-corrected), normal approximation, one-sided (activation higher on the
  feature); Benjamini-Hochberg q-values across every (neuron, rule) pair tested;
- precision, recall and F1 on part B at the threshold that maximises F1 on part A (candidate
  thresholds: `n_thresholds` quantiles of the neuron's activations on A, from the median up).

Tokens inside a document are not independent, so the permutation p-values are optimistic; the
verifier therefore asks for an effect size too (AUROC and held-out F1), and `shuffle_check`
measures how many pairs pass when the labels are shuffled (it should be about alpha or less).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from discover.errors import CorpusError


class DiskMatrix:
    """A (G, R) float32 matrix, neuron-major (one neuron's values contiguous), in a file written
    and read with explicit I/O (pwrite / preadv), not a memory map: the operating system's page
    cache holds the file, the process holds only the rows it reads (a block of neurons), so its
    resident memory stays bounded whatever the number of tokens. Indexing: `m[g]` (R,),
    `m[g0:g1]` (g1 - g0, R), `m[:, :n]` the first n columns (a view of the same file)."""

    dtype = np.dtype(np.float32)

    def __init__(self, path, G: int, R: int, *, _file=None, _cols: int | None = None):
        self.path, self.G, self.stride = Path(path), G, R
        self.cols = R if _cols is None else _cols
        self._file = _file or _File(self.path, G * R * 4)  # shared by views; closed when the last goes
        self.fd = self._file.fd

    @property
    def shape(self) -> tuple[int, int]:
        return (self.G, self.cols)

    def write_columns(self, col: int, block: np.ndarray) -> None:
        """Store `block` (G, m) as columns col .. col + m."""
        b = np.ascontiguousarray(block, dtype=np.float32)
        assert b.shape[0] == self.G and col + b.shape[1] <= self.stride
        for g in range(self.G):
            os.pwrite(self.fd, b[g], (g * self.stride + col) * 4)

    def rows(self, g0: int, g1: int) -> np.ndarray:
        out = np.empty((max(0, g1 - g0), self.stride), np.float32)
        view, offset = memoryview(out).cast("B"), g0 * self.stride * 4
        done = 0
        while done < len(view):
            n = os.preadv(self.fd, [view[done:]], offset + done)
            if n <= 0:
                raise OSError(f"short read of {self.path}")
            done += n
        return out[:, :self.cols] if self.cols < self.stride else out

    def __getitem__(self, key):
        if isinstance(key, tuple):  # m[:, :n]
            rows, cols = key
            if rows != slice(None) or not isinstance(cols, slice) or cols.start not in (None, 0) or cols.step:
                raise IndexError("DiskMatrix supports m[g], m[g0:g1] and m[:, :n]")
            return DiskMatrix(self.path, self.G, self.stride, _file=self._file,
                              _cols=min(self.cols, self.cols if cols.stop is None else cols.stop))
        if isinstance(key, slice):
            g0, g1, step = key.indices(self.G)
            if step != 1:
                raise IndexError("DiskMatrix rows are read in contiguous slices")
            return self.rows(g0, g1)
        g = int(key) + (self.G if int(key) < 0 else 0)
        if not 0 <= g < self.G:
            raise IndexError(f"row {key} out of range for {self.G} rows")
        return self.rows(g, g + 1)[0]

    def __array__(self, dtype=None, copy=None):
        a = self.rows(0, self.G)
        return a if dtype is None else a.astype(dtype)



class _File:
    def __init__(self, path, size: int):
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(self.fd, size)

    def __del__(self, close=os.close):
        try:
            close(self.fd)
        except OSError:
            pass


BATCH_BYTES = 256e6  # one batch's activations (all layers), when collect's batch_size is not given


@dataclass
class FeatureData:
    rules: list  # Rule objects, in label-column order
    skipped: list  # names of rules that could not run (spaCy missing)
    labels: np.ndarray  # (R, n_rules) bool
    part: np.ndarray  # (R,) 0 = part A (thresholds), 1 = part B (scores)
    acts: DiskMatrix  # (L * N, R) float32 on disk, neuron-major: one neuron's values are contiguous
    n_layers: int
    d_mlp: int
    documents: int
    next_token: np.ndarray = None  # (R,) the true next token (-1: none in the text taken)
    top_pred: np.ndarray = None  # (R,) the model's top prediction
    seqs: list = field(default_factory=list, repr=False)  # (ids with BOS, first row, n rows) per sequence
    tmpdir: object = field(default=None, repr=False)  # keeps the activation file's directory alive
    # mixtures of experts: (L, groups, R) bool, the tokens routed to each expert (the shared
    # expert's group: every token); with `group` (N,) each neuron's group. None: dense
    routed: np.ndarray | None = None
    group: np.ndarray | None = None

    @property
    def tokens(self) -> int:
        return len(self.part)

    def counted(self, layer: int, neuron: int) -> np.ndarray | None:
        """(R,) bool: the rows neuron (layer, neuron) counts (routed to its expert); None: all."""
        if self.routed is None:
            return None
        return self.routed[layer, self.group[neuron]]

    def segments(self, block: int) -> list:
        """[(g0, g1, rows or None)]: blocks of at most `block` neurons (flat index layer * N + n)
        that count the same rows."""
        G, N = self.acts.shape[0], self.d_mlp
        if self.routed is None:
            return [(g0, min(G, g0 + block), None) for g0 in range(0, G, block)]
        out = []
        for layer in range(self.n_layers):
            bounds = np.flatnonzero(np.diff(np.r_[-1, self.group, -2]))  # where the group changes
            for a, b in zip(bounds[:-1], bounds[1:]):
                rows = self.routed[layer, self.group[a]]
                for g0 in range(a, b, block):
                    out.append((layer * N + g0, layer * N + min(b, g0 + block), rows))
        return out


def _part(doc_id: str) -> int:
    return hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest()[0] & 1


def collect(view, corpus, rules, *, tokens: int = 50_000, context: int | None = None, split: str = "heldout",
            batch_size: int | None = None, max_doc_tokens: int = 2048, progress: bool = False,
            forward=None) -> FeatureData:
    """Activations and rule labels of up to `tokens` document tokens of `split`, at most
    `max_doc_tokens` from each document (the first ones), so that many documents count.
    `batch_size` None: as many sequences (at most 16) as keep one batch's activations within
    BATCH_BYTES (they are held twice: as captured, and as the buffer written to disk).
    `forward(view, batches, start)`: yields each batch's `forward_batch` result in order (default
    `forward_batches`, this process; `discover.cluster.ClusterVerify.forward`: a Ray cluster's workers)."""
    from tqdm import tqdm

    from discover.rules import label_tokens, rule_spans
    from discover.tokens import bos_id, model_context

    tok = view.tokenizer
    if not getattr(tok, "is_fast", False):
        from discover.errors import ModelLoadError

        raise ModelLoadError("feature tests align rule spans through character offsets, which need a fast "
                             "(Rust) tokenizer; this model's tokenizer is a slow one: save a tokenizer.json beside it")
    ctx = context or min(model_context(view), 256)
    bos = bos_id(tok)
    body = ctx - (1 if bos is not None else 0)
    G = view.n_layers * view.d_mlp
    batch_size = batch_size or max(1, min(16, int(BATCH_BYTES // (G * 4 * ctx))))
    tmp = tempfile.TemporaryDirectory(prefix="discover_features_")
    acts = DiskMatrix(Path(tmp.name) / "acts.f32", G, tokens)
    labels = np.zeros((tokens, len(rules)), bool)
    part = np.zeros(tokens, np.int8)
    nxt = np.full(tokens, -1, np.int64)
    pred = np.zeros(tokens, np.int64)
    seqs: list = []
    moe = view.layout.moe
    if moe:
        from discover.activations import neuron_groups

        group, first = neuron_groups(view.layout, view.d_mlp)
        routed = np.zeros((view.n_layers, len(first), tokens), bool)
    probe = rule_spans(rules, "x")  # which rules can run (spaCy present?)
    skipped = [r.name for r in rules if probe[r.name] is None]
    n = docs = 0
    pending: list = []  # (ids with BOS, row offset, n tokens)
    batches: list = []  # the forward passes to run, planned first (token ids only)
    reading = tqdm(total=tokens, unit="tok", desc="features: text and rule labels", disable=not progress, leave=False)
    for doc in corpus.iter_documents(split):
        if n >= tokens:
            break
        enc = tok(doc.text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        ids, offs = enc["input_ids"], enc["offset_mapping"]
        if not ids:
            continue
        take = min(len(ids), tokens - n, max_doc_tokens)
        lab = label_tokens(rules, doc.text[:offs[take - 1][1]], offs[:take])  # only the text that is used
        labels[n:n + take] = lab
        part[n:n + take] = _part(doc.doc_id)
        nxt[n:n + take - 1] = ids[1:take]
        nxt[n + take - 1] = ids[take] if take < len(ids) else -1
        for c in range(0, take, body):
            m = min(body, take - c)
            pending.append((([bos] if bos is not None else []) + ids[c:c + m], n + c, m))
            if len(pending) == batch_size:
                batches.append(pending)
                pending = []
        n += take
        docs += 1
        reading.update(take)
    reading.close()
    if pending:
        batches.append(pending)
    start = 1 if bos is not None else 0
    bar = tqdm(total=n, unit="tok", desc="features: activations", disable=not progress, leave=False)
    for batch, (runs, top, scale) in zip(batches, (forward or forward_batches)(view, batches, start)):
        for row, buf in runs:  # one buffer and one write per run of consecutive rows
            acts.write_columns(row, buf)
        for b, (_, row, m) in enumerate(batch):
            pred[row:row + m] = top[b]
            if moe:
                routed[:, :, row:row + m] = scale[b]
        seqs.extend(batch)
        bar.update(sum(m for _, _, m in batch))
        del runs
    bar.close()
    if n == 0:
        raise CorpusError(f"the {split} split of the corpus has no tokens; point --corpus at text")
    return FeatureData(rules=rules, skipped=skipped, labels=labels[:n], part=part[:n], acts=acts[:, :n],
                       n_layers=view.n_layers, d_mlp=view.d_mlp, documents=docs, next_token=nxt[:n],
                       top_pred=pred[:n], seqs=seqs, tmpdir=tmp,
                       routed=routed[:, :, :n] if moe else None, group=group if moe else None)


def forward_batch(view, batch: list, start: int) -> tuple:
    """One forward pass over a batch [(ids with BOS, first row, n rows), ...]: (runs, top, scale):
    runs [(first row, (G, rows) float32)] of the batch's consecutive rows, neuron-major; top per
    entry its top predictions (n,); scale (mixtures of experts) per entry (L, groups, n) bool,
    the tokens routed to each expert, else None."""
    import torch

    from discover.activations import capture

    head = view.model.get_output_embeddings()
    T = max(len(p[0]) for p in batch)
    ids = torch.full((len(batch), T), batch[0][0][0], dtype=torch.long)
    for b, (seq, _, _) in enumerate(batch):
        ids[b, :len(seq)] = torch.tensor(seq)
    with torch.inference_mode(), capture(view) as got:
        h = view.model.base_model(input_ids=ids).last_hidden_state
        top = torch.stack([head(h[b]).argmax(-1) for b in range(h.shape[0])])  # (B, T), one row of logits at a time
    G, N = view.n_layers * view.d_mlp, view.d_mlp
    groups: list = []
    for b, (_, row, m) in enumerate(batch):
        if groups and groups[-1][-1][1] + groups[-1][-1][2] == row:
            groups[-1].append((b, row, m))
        else:
            groups.append([(b, row, m)])
    runs = []
    for group in groups:
        buf = np.empty((G, sum(m for _, _, m in group)), np.float32)  # filled layer by layer: no (T, G) copies
        dst = torch.from_numpy(buf)  # torch's transposing copy is blocked (numpy's: 2x slower)
        off = 0
        for b, row, m in group:
            for l in range(view.n_layers):
                dst[l * N:(l + 1) * N, off:off + m].copy_(got["acts"][l][b, start:start + m].T)
            off += m
        runs.append((group[0][1], buf))
    preds = [top[b, start:start + m].numpy() for b, (_, _, m) in enumerate(batch)]
    scale = None
    if view.layout.moe:
        from discover.activations import neuron_groups

        _, first = neuron_groups(view.layout, N)
        scale = [np.stack([(got["scale"][l][b, start:start + m][:, first] != 0).numpy().T
                           for l in range(view.n_layers)]) for b, (_, _, m) in enumerate(batch)]
    return runs, preds, scale


def forward_batches(view, batches: list, start: int):
    """`forward_batch` of every batch, in order, in this process."""
    for batch in batches:
        yield forward_batch(view, batch, start)


@dataclass
class FeatureScores:
    rules: list  # rule names
    n_pos: np.ndarray  # (G, n_rules) positives among the tokens each neuron counts (all tokens, dense)
    tested: np.ndarray  # (G, n_rules) bool: enough positives and negatives in both parts
    auroc: np.ndarray  # (G, n_rules)
    p: np.ndarray  # (G, n_rules) one-sided, NaN where not tested
    q: np.ndarray  # (G, n_rules) Benjamini-Hochberg over all tested pairs
    threshold: np.ndarray  # (G, n_rules) chosen on part A
    precision: np.ndarray  # (G, n_rules) on part B
    recall: np.ndarray
    f1: np.ndarray
    f1_a: np.ndarray  # the F1 on part A at the chosen threshold
    counted: np.ndarray | None = None  # (G,) tokens each neuron counts (experts: routed); None: all


def benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    """q-values (BH step-up) of the finite entries of p; NaN stays NaN."""
    flat = p.ravel()
    ok = np.flatnonzero(np.isfinite(flat))
    q = np.full(flat.shape, np.nan)
    if len(ok) == 0:
        return q.reshape(p.shape)
    order = ok[np.argsort(flat[ok], kind="stable")]
    m = len(order)
    ranked = flat[order] * m / np.arange(1, m + 1)
    q[order] = np.minimum(1.0, np.minimum.accumulate(ranked[::-1])[::-1])
    return q.reshape(p.shape)


def score(data: FeatureData, *, labels: np.ndarray | None = None, min_positives: int = 20,
          n_thresholds: int = 64, block: int = 512, progress: bool = False) -> FeatureScores:
    """Score every (neuron, rule) pair; `labels` overrides data.labels (shuffle checks). Each
    neuron is scored over the tokens it counts: every token, or for an expert the tokens routed
    to it (`FeatureData.segments`: blocks of neurons that count the same tokens)."""
    return score_sets(data, [data.labels if labels is None else labels], min_positives=min_positives,
                      n_thresholds=n_thresholds, block=block, progress=progress)[0]


def score_sets(data: FeatureData, label_sets: list, *, min_positives: int = 20, n_thresholds: int = 64,
               block: int = 512, progress: bool = False) -> list:
    """`score` for several label matrices at once (the rules' labels and their shuffle): what
    depends on the activations alone (ranks, ties, thresholds, bins) is computed once per block
    of neurons and shared. One FeatureScores per label set."""
    from tqdm import tqdm

    G = data.acts.shape[0]
    sets = []
    for lab in label_sets:
        nr = lab.shape[1]
        sets.append((lab, {k: np.full((G, nr), np.nan) for k in
                           ("auroc", "p", "threshold", "precision", "recall", "f1", "f1_a")},
                     np.zeros((G, nr), np.int64), np.zeros((G, nr), bool)))
    counted = np.zeros(G, np.int64)
    bar = tqdm(total=G, unit="neuron", desc="scoring rules", disable=not progress, leave=False)
    for g0, g1, rows in data.segments(block):
        A = np.asarray(data.acts[g0:g1])  # (B, R) float32, one neuron per row
        part = data.part
        if rows is not None:
            A, part = A[:, rows], part[rows]
        counted[g0:g1] = len(part)
        xs = _activation_stats(A, part, n_thresholds)
        for lab, out, n_pos, tested in sets:
            y = lab if rows is None else lab[rows]
            n1, ok = _score_labels(xs, y, part, min_positives, {k: v[g0:g1] for k, v in out.items()})
            n_pos[g0:g1] = n1
            tested[g0:g1] = ok
        bar.update(g1 - g0)
    bar.close()
    res = []
    for lab, out, n_pos, tested in sets:
        for k in ("threshold", "precision", "recall", "f1", "f1_a"):
            out[k][~tested] = np.nan
        res.append(FeatureScores(rules=[r.name for r in data.rules], n_pos=n_pos, tested=tested,
                                 q=benjamini_hochberg(out["p"]), counted=None if data.routed is None else counted,
                                 **out))
    return res


@dataclass
class _XStats:
    """What a block's scores need of its activations, whatever the labels."""
    ranks: np.ndarray  # (R, B) average ranks over all tokens
    tie: np.ndarray  # (B,) sum(t^3 - t) over tie groups
    thr: np.ndarray | None  # (K, B) candidate thresholds: quantiles of part A
    bins_a: tuple | None  # (bin of each value (RA, B), predicted positives (K, B)) on part A
    bins_b: tuple | None  # the same on part B, at A's thresholds


def _activation_stats(A: np.ndarray, part: np.ndarray, n_thresholds: int) -> _XStats:
    """Ranks, ties, part A's quantile thresholds and both parts' bins, from one radix sort per
    neuron (`_kernels.activation_stats`; equal, bit for bit, to scipy's rankdata, numpy's
    quantile and searchsorted: tests/test_verify.py)."""
    from discover._kernels import activation_stats

    R = A.shape[1]
    if R < 2:
        return _XStats(None, None, None, None, None)
    if not 1 <= n_thresholds < 2**15:  # the bins are int16
        raise ValueError(f"n_thresholds must be in [1, 32767], got {n_thresholds}")
    qs = np.linspace(0.5, 0.999, n_thresholds)
    ranks, tie, thr, ia, pa, ib, pb = activation_stats(np.ascontiguousarray(A, dtype=np.float32),
                                                       np.ascontiguousarray(part, dtype=np.int8), qs)
    if not (part == 0).any():
        return _XStats(ranks, tie, None, None, None)
    return _XStats(ranks, tie, thr, (ia, pa), (ib, pb))


def _score_labels(xs: _XStats, lab, part, min_positives, out) -> tuple[np.ndarray, np.ndarray]:
    """Fill `out` (views (B, n_rules)) for one block's neurons over its R tokens; return the
    positives per rule and which rules could be tested."""
    from scipy.stats import norm

    R, nr = lab.shape
    Y = lab.astype(np.float64)
    n1 = Y.sum(0)
    n0 = R - n1
    inA, inB = part == 0, part == 1
    tested = ((n1 >= min_positives) & (n0 >= min_positives) & (lab[inA].sum(0) >= min_positives // 2)
              & (lab[inB].sum(0) >= min_positives // 2))
    if R < 2:
        return n1.astype(np.int64), tested
    B = xs.ranks.shape[1]
    # --- AUROC and its permutation null (exact moments of U, tie-corrected)
    rank_sum = Y.T @ xs.ranks  # (nr, B)
    U = rank_sum - (n1 * (n1 + 1) / 2)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        auc = U / (n1 * n0)[:, None]
        var = (n1 * n0)[:, None] / 12.0 * ((R + 1) - xs.tie[None, :] / (R * (R - 1)))
        z = (U - (n1 * n0 / 2)[:, None]) / np.sqrt(var)
    p = norm.sf(z)
    out["auroc"][:] = auc.T
    out["p"][:] = np.where(tested[:, None] & np.isfinite(z), p, np.nan).T
    # --- threshold on A (max F1 over quantile thresholds), precision / recall / F1 on B
    if not tested.any() or xs.thr is None:  # (e.g. every document fell in one half): nothing to threshold
        return n1.astype(np.int64), tested
    tpA, ppA = _counts(*xs.bins_a, Y[inA])  # tp (K, nr, B), pp (K, B)
    posA = Y[inA].sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        f1A = 2 * tpA / (ppA[:, None, :] + posA[None, :, None])
    f1A = np.nan_to_num(f1A, nan=-1.0)
    best = f1A.argmax(0)  # (nr, B)
    tpB, ppB = _counts(*xs.bins_b, Y[inB])
    posB = Y[inB].sum(0)
    cols = np.arange(B)[None, :]
    tp = tpB[best, np.arange(nr)[:, None], cols]
    pp = ppB[best, cols]
    with np.errstate(divide="ignore", invalid="ignore"):
        prec = np.where(pp > 0, tp / pp, 0.0)
        rec = tp / posB[:, None]
        f1 = np.where(prec + rec > 0, 2 * prec * rec / (prec + rec), 0.0)
    out["threshold"][:] = xs.thr[best, cols].T
    out["precision"][:] = prec.T
    out["recall"][:] = rec.T
    out["f1"][:] = f1.T
    out["f1_a"][:] = f1A[best, np.arange(nr)[:, None], cols].T
    return n1.astype(np.int64), tested


def _counts(bins: np.ndarray, pp: np.ndarray, Y: np.ndarray):
    """True positives (K, n_rules, B) and predicted positives (K, B) of the detectors `X > thr[k]`,
    from each value's bin (`_kernels.activation_stats`; counted by `_kernels.true_positives`,
    a rule that labels most tokens by its unlabelled ones)."""
    from discover._kernels import true_positives

    lab = np.ascontiguousarray(Y.T > 0)  # (n_rules, R)
    flip = lab.sum(1) * 2 > lab.shape[1]
    return true_positives(bins, lab, flip, pp), pp


def shuffled_labels(data: FeatureData, seed: int = 0) -> np.ndarray:
    """The rules' labels shuffled across tokens, independently per rule."""
    rng = np.random.default_rng(seed)
    lab = data.labels.copy()
    for j in range(lab.shape[1]):
        lab[:, j] = lab[rng.permutation(len(lab)), j]
    return lab


def shuffle_summary(s: FeatureScores, alpha: float = 0.05) -> dict:
    """How many pairs pass BH at alpha under shuffled labels (it should be about alpha or less)."""
    tested = np.isfinite(s.q)
    return {"pairs": int(tested.sum()), "passing": int((s.q[tested] <= alpha).sum()),
            "fraction": float((s.q[tested] <= alpha).mean()) if tested.any() else 0.0}


def shuffle_check(data: FeatureData, *, alpha: float = 0.05, seed: int = 0, **kw) -> dict:
    """Labels shuffled across tokens (independently per rule): how many pairs pass BH at alpha."""
    return shuffle_summary(score(data, labels=shuffled_labels(data, seed), **kw), alpha)
