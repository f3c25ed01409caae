"""Shards of a corpus pass and the exact merge of their states (numpy only).

A pass is cut into shards by the corpus alone: shard s is the batches [s * S, (s + 1) * S) of
the pass's sequence stream (S = `ActivationConfig.shard_batches`; batches are consecutive
`batch_size` sequences in corpus order), never by the number of workers. What a pass keeps
merges exactly, with one exception:

- counts, positives, histograms and curve counts add; minima and maxima take the min / max;
- the top-k example tables merge in a total order (`merge_topk`): per document its best entry
  (value desc, then the earliest chunk and position), then the k best documents (value desc,
  document asc). The corpus pass's kernel keeps exactly this table when it folds batches in
  order, so tables merge to what one process folding everything would hold;
- the float64 central moments depend on the order of their updates. Each shard's moments are
  therefore accumulated from empty ("open" moments, `OPEN`) and merged into the moments of the
  shards before it with Chan/Pebay's pairwise formulas when the shard ends (`close_shard`),
  shard after shard: a fixed left-deep tree over shard ids. One process and a cluster of any
  size perform the same float operations in the same order, so their moments are identical,
  and a pass extended later continues the open shard where it stopped.
"""

from __future__ import annotations

import numpy as np

#: the running moments (shards closed so far) and the open shard's
RUNNING = ("count", "mean", "m2", "m3", "m4")
OPEN = ("s_count", "s_mean", "s_m2", "s_m3", "s_m4")
#: per-entry fields of a top-k table, after its value ("av" / "dv") and document ("adoc" / "ddoc")
ENTRY_FIELDS = ("pos", "chunk", "next", "tok", "val")


def merge_moments(a: dict, b: dict, a_names=RUNNING, b_names=RUNNING) -> None:
    """Fold moments b into moments a, in place (arrays of any shape): count, mean and the central
    sums m2, m3, m4 of two disjoint sets of positions -> those of their union (Chan et al.;
    Pebay 2008), the formulas of the corpus pass's kernel."""
    na_i, ma, a2, a3, a4 = (a[k] for k in a_names)
    nb_i, mb, b2, b3, b4 = (b[k] for k in b_names)
    na, nb = na_i.astype(np.float64), nb_i.astype(np.float64)
    nn = na + nb
    first = (na_i == 0) & (nb_i > 0)
    both = (na_i > 0) & (nb_i > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        delta = mb - ma
        mean = ma + delta * nb / nn
        m4 = (a4 + b4 + delta ** 4 * na * nb * (na * na - na * nb + nb * nb) / nn ** 3
              + 6.0 * delta * delta * (na * na * b2 + nb * nb * a2) / (nn * nn)
              + 4.0 * delta * (na * b3 - nb * a3) / nn)
        m3 = a3 + b3 + delta ** 3 * na * nb * (na - nb) / (nn * nn) + 3.0 * delta * (na * b2 - nb * a2) / nn
        m2 = a2 + b2 + delta * delta * na * nb / nn
    for dst, merged, src in ((ma, mean, mb), (a2, m2, b2), (a3, m3, b3), (a4, m4, b4)):
        dst[both] = merged[both]
        dst[first] = src[first]
    na_i += nb_i


def close_shard(a: dict) -> None:
    """The open shard has ended: merge its moments into the running ones and empty it."""
    merge_moments(a, a, RUNNING, OPEN)
    for k in OPEN:
        a[k][...] = 0


def merged_moments(a: dict) -> dict:
    """The running moments with the open shard's merged in (the pass's current result), without
    changing the state."""
    out = {k: a[k].copy() for k in RUNNING}
    merge_moments(out, a, RUNNING, OPEN)
    return out


def merge_topk(dst: dict, src: dict, p: str) -> None:
    """Merge src's top-k table `p` ("a": by activation, "d": by direct logit attribution) into
    dst's, in place: per neuron the best entry of each document, then the k best documents (see
    the module docstring). Empty slots (document -1) go last."""
    v = np.concatenate([dst[f"{p}v"], src[f"{p}v"]], axis=-1)
    doc = np.concatenate([dst[f"{p}doc"], src[f"{p}doc"]], axis=-1)
    shape, k = v.shape, dst[f"{p}v"].shape[-1]
    v, doc = v.reshape(-1, shape[-1]), doc.reshape(-1, shape[-1])
    fields = {f: np.concatenate([dst[f"{p}{f}"], src[f"{p}{f}"]], axis=len(shape) - 1) for f in ENTRY_FIELDS}
    fields = {f: x.reshape(v.shape + x.shape[len(shape):]) for f, x in fields.items()}
    empty = doc < 0
    big = np.iinfo(np.int64).max
    # per document its best entry: sort by (document, value desc, chunk, position)
    order = np.lexsort((fields["pos"], fields["chunk"], -v.astype(np.float64), np.where(empty, big, doc)), axis=-1)
    d_sorted = np.take_along_axis(doc, order, -1)
    dup = np.zeros_like(empty)
    dup[:, 1:] = (d_sorted[:, 1:] == d_sorted[:, :-1]) & (d_sorted[:, 1:] >= 0)
    drop = np.empty_like(dup)
    np.put_along_axis(drop, order, dup, -1)
    drop |= empty
    # the k best: (kept first, value desc, document asc)
    order = np.lexsort((doc, -v.astype(np.float64), drop), axis=-1)[:, :k]
    keep = ~np.take_along_axis(drop, order, -1)

    def take(x, fill):
        got = np.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), 1)
        mask = keep.reshape(keep.shape + (1,) * (x.ndim - 2))
        return np.where(mask, got, fill)

    from discover._act_kernels import EMPTY

    dst[f"{p}v"][...] = take(v, EMPTY).reshape(shape[:-1] + (k,))
    dst[f"{p}doc"][...] = take(doc, -1).reshape(shape[:-1] + (k,))
    fills = {"pos": 0, "chunk": 0, "next": -1, "tok": -1, "val": 0}
    for f, x in fields.items():
        dst[f"{p}{f}"][...] = take(x, fills[f]).reshape(dst[f"{p}{f}"].shape)


def merge_piece(dst, src, *, closes: bool) -> None:
    """Fold a piece of the pass (`src`, a PassState computed by a worker over consecutive
    batches that continue dst's stream) into `dst`, in place. The piece's open moments carry on
    dst's open shard (the worker started from them), and `closes` says that the piece ends its
    shard. src's arrays may be read-only (from `ray.get`)."""
    a, b = dst.a, src.a
    for k in ("n_pos", "hist", "curves"):
        a[k] += b[k]
    np.minimum(a["amin"], b["amin"], out=a["amin"])
    np.maximum(a["amax"], b["amax"], out=a["amax"])
    for p in ("a", "d"):
        merge_topk(a, b, p)
    for k in OPEN:
        a[k][...] = b[k]
    if closes:
        close_shard(a)
    m, n = dst.meta, src.meta
    for k in ("tokens", "sequences", "batches"):
        m[k] += n[k]
    m["documents"], m["next"] = n["documents"], list(n["next"])  # (the driver knows when the corpus ends)
    m["doc_names"].update(n["doc_names"])
