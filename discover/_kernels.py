"""Fused CPU kernels (numba) for the scanner's reductions over a (neuron, vocab) block.

`token_heaps_update` keeps, for every token, a min-heap of the K largest scores seen so far
(and one of the K most negative), reading each score of a block once: after warm-up almost
every comparison fails, so the exact per-token top-K costs about one pass over memory.
Heaps are stored token-major, (vocab, K), so one token's heap is contiguous; threads split the
vocabulary, so no two threads touch one heap.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

#: an empty heap slot: the most negative finite float32. Finite (not -inf) so that the
#: vectorised checks may be compiled with full fast-math (no-NaN, no-inf) semantics.
EMPTY = np.float32(-np.finfo(np.float32).max)


@njit(inline="always")
def _sift_down(vals, ids, t, k, v, i):
    """Replace the root of token t's min-heap with (v, i) and restore the heap."""
    pos = 0
    while True:
        child = 2 * pos + 1
        if child >= k:
            break
        right = child + 1
        if right < k and (vals[t, right] < vals[t, child] or (vals[t, right] == vals[t, child]
                                                              and ids[t, right] > ids[t, child])):
            child = right
        if vals[t, child] < v or (vals[t, child] == v and ids[t, child] > i):
            vals[t, pos] = vals[t, child]
            ids[t, pos] = ids[t, child]
            pos = child
        else:
            break
    vals[t, pos] = v
    ids[t, pos] = i


@njit(fastmath=True, nogil=True, inline="never")  # inlined, it loses its fast-math and stops vectorising
def _beats(g, r, pos_thr, neg_thr, t0, t1):
    """(any g[r, t] > pos_thr[t], any -g[r, t] > neg_thr[t]) over t in [t0, t1).
    Branch-free and all float32, so it vectorises; the rare hits go to the scalar loops."""
    mp = np.float32(EMPTY)
    mn = np.float32(EMPTY)
    for t in range(t0, t1):
        x = g[r, t]
        mp = max(mp, x - pos_thr[t])
        mn = max(mn, -x - neg_thr[t])
    return mp > 0, mn > 0


@njit(parallel=True, nogil=True, cache=True)
def token_heaps_update(g, gid0, pos_v, pos_i, pos_thr, neg_v, neg_i, neg_thr):
    """Push every score of g (rows, vocab), neuron ids gid0 + row, into both sets of heaps.

    pos_*: (vocab, K) min-heaps of the K largest scores; neg_*: of the K largest -scores.
    `*_thr[t]` mirrors heap t's root (its smallest kept value, the bar a new score must beat),
    kept in a contiguous (vocab,) array so that the common case is one streaming comparison.
    """
    rows, vocab = g.shape
    k = pos_v.shape[1]
    seg = 512
    n_parts = (vocab + seg - 1) // seg
    for part in prange(n_parts):
        t0 = part * seg
        t1 = min(vocab, t0 + seg)
        for r in range(rows):
            gid = gid0 + r
            hit_pos, hit_neg = _beats(g, r, pos_thr, neg_thr, t0, t1)
            if hit_pos:
                for t in range(t0, t1):
                    x = g[r, t]
                    if x > pos_thr[t]:
                        _sift_down(pos_v, pos_i, t, k, x, gid)
                        pos_thr[t] = pos_v[t, 0]
            if hit_neg:
                for t in range(t0, t1):
                    y = -g[r, t]
                    if y > neg_thr[t]:
                        _sift_down(neg_v, neg_i, t, k, y, gid)
                        neg_thr[t] = neg_v[t, 0]


def new_heaps(vocab: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Empty heaps (values, ids, roots): every slot EMPTY (any real score beats it), id -1."""
    return (np.full((vocab, k), EMPTY, dtype=np.float32), np.full((vocab, k), -1, dtype=np.int64),
            np.full(vocab, EMPTY, dtype=np.float32))


def sorted_heaps(vals: np.ndarray, ids: np.ndarray, roots=None) -> tuple[np.ndarray, np.ndarray]:
    """Heaps (rows, K) -> (ids, values), each (K, rows), best first (ties: lower id first).

    Used for the per-token neuron heaps and the per-neuron token heaps alike. Slots nothing
    filled (fewer candidates than K) are dropped; every row sees the same candidates, so the
    filled count is the same for all rows. `roots` (the threshold mirror from `new_heaps`) is
    accepted so that the triple can be passed whole."""
    by_id = np.argsort(ids, axis=1, kind="stable")
    v = np.take_along_axis(vals, by_id, 1)
    order = np.take_along_axis(by_id, np.argsort(-v, axis=1, kind="stable"), 1)
    v = np.take_along_axis(vals, order, 1)
    i = np.take_along_axis(ids, order, 1)
    keep = int((i >= 0).all(axis=0).sum())
    return np.ascontiguousarray(i[:, :keep].T), np.ascontiguousarray(v[:, :keep].T)


@njit(fastmath={"reassoc", "contract"}, nogil=True, inline="never")
def _power_sums(row, inv_u, a):
    """Sums of c, c^2, c^3, c^4 over the vocabulary, c_t = row[t] * inv_u[t] * a, in float64."""
    s1 = 0.0
    s2 = 0.0
    s3 = 0.0
    s4 = 0.0
    for t in range(row.shape[0]):
        c = np.float64(row[t]) * np.float64(inv_u[t]) * a
        c2 = c * c
        s1 += c
        s2 += c2
        s3 += c2 * c
        s4 += c2 * c2
    return s1, s2, s3, s4


@njit(fastmath=True, nogil=True, inline="never")
def _block_minmax(row, t0, t1):
    lo = np.float32(-EMPTY)
    hi = np.float32(EMPTY)
    for t in range(t0, t1):
        x = row[t]
        lo = min(lo, x)
        hi = max(hi, x)
    return lo, hi


@njit(parallel=True, nogil=True, cache=True)
def row_stats(g, inv_u, inv_w, top_v, top_i, bot_v, bot_i, moments):
    """Per row (neuron) of g (rows, vocab): the k largest and k smallest scores with their token
    ids (unsorted min-heaps, filled in place; bottom values negated) and the central moments of
    the cosine c_t = g[r, t] * inv_u[t] * inv_w[r]: moments[r] = (mean, m2, m3, m4),
    m_j = E[(c - mean)^j], from float64 power sums."""
    rows, vocab = g.shape
    k = top_v.shape[1]
    blk = 256
    for r in prange(rows):
        for j in range(k):
            top_v[r, j] = EMPTY
            bot_v[r, j] = EMPTY
            top_i[r, j] = -1
            bot_i[r, j] = -1
        row = g[r]
        for t0 in range(0, vocab, blk):
            t1 = min(vocab, t0 + blk)
            lo, hi = _block_minmax(row, t0, t1)  # skip blocks that cannot enter either heap
            if hi > top_v[r, 0]:
                for t in range(t0, t1):
                    x = row[t]
                    if x > top_v[r, 0]:
                        _sift_down(top_v, top_i, r, k, x, t)
            if -lo > bot_v[r, 0]:
                for t in range(t0, t1):
                    y = -row[t]
                    if y > bot_v[r, 0]:
                        _sift_down(bot_v, bot_i, r, k, y, t)
        s1, s2, s3, s4 = _power_sums(row, inv_u, np.float64(inv_w[r]))
        mu = s1 / vocab
        e2 = s2 / vocab
        e3 = s3 / vocab
        e4 = s4 / vocab
        moments[r, 0] = mu
        moments[r, 1] = e2 - mu * mu
        moments[r, 2] = e3 - 3.0 * mu * e2 + 2.0 * mu ** 3
        moments[r, 3] = e4 - 4.0 * mu * e3 + 6.0 * mu * mu * e2 - 3.0 * mu ** 4


@njit(inline="always")
def _radix_order(u, keys, spare_k, order, spare_o, cnt):
    """`order` := the indices of float32 bit patterns `u` in ascending value order: an LSD radix
    sort (four 8-bit digits, stable) of order-preserving keys (-0.0 sorts just below +0.0)."""
    n = u.shape[0]
    for i in range(n):
        b = u[i]
        keys[i] = (b ^ np.uint32(0xFFFFFFFF)) if b & np.uint32(0x80000000) else (b | np.uint32(0x80000000))
        order[i] = i
    k1, k2, o1, o2 = keys, spare_k, order, spare_o
    for p in range(4):
        sh = np.uint32(8 * p)
        cnt[:] = 0
        for i in range(n):
            cnt[(k1[i] >> sh) & np.uint32(255)] += 1
        s = 0
        for d in range(256):
            c = cnt[d]
            cnt[d] = s
            s += c
        for i in range(n):
            d = (k1[i] >> sh) & np.uint32(255)
            pos = cnt[d]
            cnt[d] = pos + 1
            k2[pos] = k1[i]
            o2[pos] = o1[i]
        k1, k2, o1, o2 = k2, k1, o2, o1
    # four passes: the sorted indices are back in `order`


TILE = 8  # neurons per task of `activation_stats`: one cache line of each (R, B) output row


@njit(parallel=True, nogil=True, cache=True)
def activation_stats(A, part, qs):
    """What verify's rule scores need of a block of neurons' activations, from one sort per
    neuron. A (B, R) float32, one neuron per row; part (R,) int8: 0 = part A (chooses
    thresholds), 1 = part B (scores them); qs (K,) ascending quantile levels.

    Returns (ranks, tie, thr, idx_a, pp_a, idx_b, pp_b):
    - ranks (R, B) float64: average ranks, 1-based, ties averaged (scipy's rankdata "average");
      tie (B,): sum(t^3 - t) over each row's groups of equal values;
    - thr (K, B): the part-A quantiles at qs, numpy's "linear" method, bit for bit;
    - idx_a (RA, B) int16: each part-A value's bin, the number of thresholds strictly below it
      (searchsorted "left"; K < 32768); pp_a (K, B) float64: how many part-A values
      exceed each threshold; idx_b, pp_b: the same for part B at A's thresholds.
    With no part-A token, thr and the bins are empty. Threads take TILE neurons at a time and
    write their (R, B) outputs a cache line per row."""
    B, R = A.shape
    K = qs.shape[0]
    RA = 0
    RB = 0
    pos = np.empty(R, np.int64)  # a token's row within its part
    for r in range(R):
        if part[r] == 0:
            pos[r] = RA
            RA += 1
        elif part[r] == 1:
            pos[r] = RB
            RB += 1
    if RA == 0:
        K = 0
    ranks = np.empty((R, B))
    tie = np.zeros(B)
    thr = np.empty((K, B))
    idx_a = np.empty((RA, B), np.int16)
    idx_b = np.empty((RB, B), np.int16)
    pp_a = np.zeros((K, B))
    pp_b = np.zeros((K, B))
    U = A.view(np.uint32)
    for tile in prange((B + TILE - 1) // TILE):
        j0 = tile * TILE
        j1 = min(B, j0 + TILE)
        keys = np.empty(R, np.uint32)
        spare_k = np.empty(R, np.uint32)
        o = np.empty(R, np.int64)
        spare_o = np.empty(R, np.int64)
        cnt = np.empty(256, np.int64)
        sa = np.empty(RA)
        lr = np.empty((TILE, R))
        la = np.empty((TILE, RA), np.int16)
        lb = np.empty((TILE, RB), np.int16)
        for j in range(j0, j1):
            q0 = j - j0
            _radix_order(U[j], keys, spare_k, o, spare_o, cnt)
            a = A[j]
            i = 0
            s = 0.0
            while i < R:
                k = i + 1
                while k < R and a[o[k]] == a[o[i]]:
                    k += 1
                r = (i + 1 + k) / 2.0
                for m in range(i, k):
                    lr[q0, o[m]] = r
                t = float(k - i)
                s += t * t * t - t
                i = k
            tie[j] = s
            if K == 0:
                continue
            n = 0  # part A's values, ascending
            for m in range(R):
                if part[o[m]] == 0:
                    sa[n] = a[o[m]]
                    n += 1
            for q in range(K):  # numpy.quantile(method="linear"): its index, weight and lerp
                v = (RA - 1) * qs[q]
                if v >= RA - 1:
                    thr[q, j] = sa[RA - 1]
                    continue
                lo = np.floor(v)
                g = v - lo
                x0 = sa[int(lo)]
                x1 = sa[int(lo) + 1]
                d = x1 - x0
                thr[q, j] = x1 - d * (1.0 - g) if g >= 0.5 else x0 + d * g
            ca = np.zeros(K + 1, np.int64)
            cb = np.zeros(K + 1, np.int64)
            b = 0  # thresholds strictly below the current value (values ascend)
            for m in range(R):
                r = o[m]
                x = np.float64(a[r])
                while b < K and thr[b, j] < x:
                    b += 1
                if part[r] == 0:
                    la[q0, pos[r]] = b
                    ca[b] += 1
                elif part[r] == 1:
                    lb[q0, pos[r]] = b
                    cb[b] += 1
            na = 0
            nb = 0
            for q in range(K, 0, -1):  # X > thr[q - 1]  <=>  bin >= q
                na += ca[q]
                nb += cb[q]
                pp_a[q - 1, j] = na
                pp_b[q - 1, j] = nb
        w = j1 - j0
        for r in range(R):
            for q in range(w):
                ranks[r, j0 + q] = lr[q, r]
        if K > 0:
            for r in range(RA):
                for q in range(w):
                    idx_a[r, j0 + q] = la[q, r]
            for r in range(RB):
                for q in range(w):
                    idx_b[r, j0 + q] = lb[q, r]
    return ranks, tie, thr, idx_a, pp_a, idx_b, pp_b


@njit(parallel=True, nogil=True, cache=True)
def true_positives(bins, labels, flip, pp):
    """The true positives of the detectors `X > thr[k]` of `activation_stats`, per rule: bins
    (R, B) small ints (a token's bin in column b: how many thresholds lie strictly below its
    value), labels (n_rules, R) bool, one rule per row, pp (K, B) predicted positives; returns
    tp (K, n_rules, B) float64, tp[k] = labelled tokens whose bin is > k. A rule with `flip`
    set counts its unlabelled tokens instead (fewer, for a rule that labels most tokens) and
    takes them from pp. Threads take one rule at a time; `bins` stays in cache between rules."""
    R, B = bins.shape
    K = pp.shape[0]
    nb = K + 1  # bins 0..K
    nr = labels.shape[0]
    tp = np.empty((K, nr, B))
    for q in prange(nr):
        o = np.zeros(B * nb, np.int64)
        lab = labels[q]
        f = flip[q]
        for i in range(R):
            if lab[i] != f:
                row = bins[i]
                for b in range(B):
                    o[b * nb + row[b]] += 1
        for b in range(B):
            c = 0
            for k in range(K, 0, -1):  # bin >= k  <=>  X > thr[k - 1]
                c += o[b * nb + k]
                tp[k - 1, q, b] = pp[k - 1, b] - c if f else c
    return tp
