"""Fused CPU kernel (numba) of the corpus pass: every statistic of every neuron, one read.

`activation_update` reads a batch's activations (batch, pos, neuron) once and updates, per
neuron, over the positions it counts: the number of them, exact moments (float64 power sums about a shift, merged into the running central
moments with Chan/Pebay's pairwise formulas), the count of positive activations, min and max,
an exact histogram on fixed geometric bins, and two top-k tables of documents (by maximum
activation, and by maximum direct logit attribution to the true next token), with at most one
entry per document. Threads split the neurons, so no two threads write one neuron's state, and
each neuron's sums run in position order: the result does not depend on the thread count.

A neuron counts a position where its group's write scale there is not 0. Dense MLPs have one
group whose scale is 1 everywhere (every position counts); a mixture-of-experts layer has one group
per expert (its routing weight: 0 where the token is not routed to it) and one for a shared expert
(its sigmoid gate, never 0). The direct logit attribution includes the scale: what the neuron
actually wrote.

Histogram bins come from the float32 bit pattern (exponent and the top two mantissa bits), so
binning costs integer operations only: four bins per octave for |x| in [2**EXP_LO, 2**EXP_HI),
one bin for |x| < 2**EXP_LO ("zero"), one overflow bin per sign. `bin_edges()` gives the edges.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

#: an empty top-k slot: the most negative finite float32
EMPTY = np.float32(-np.finfo(np.float32).max)

EXP_LO, EXP_HI, SUB_BITS = -12, 12, 2
SUB = 1 << SUB_BITS
NPOS = (EXP_HI - EXP_LO) * SUB  # bins per sign inside the range
ZERO = NPOS + 1  # index of the |x| < 2**EXP_LO bin
N_BINS = 2 * NPOS + 3
_SHIFT = 23 - SUB_BITS
_CODE0 = (127 + EXP_LO) << SUB_BITS
BLOCK = 64  # neurons per thread task


def bin_edges() -> np.ndarray:
    """(N_BINS + 1,) float64 edges. Bins go by magnitude: a positive bin i holds [edges[i],
    edges[i+1]), a negative one (edges[i], edges[i+1]] (the end nearer zero is closed), the zero
    bin (-2**EXP_LO, 2**EXP_LO). NaN and +-inf count in the overflow bins."""
    mags = np.array([2.0 ** (EXP_LO + c // SUB) * (1 + (c % SUB) / SUB) for c in range(NPOS + 1)])
    return np.concatenate([[-np.inf], -mags[::-1], mags, [np.inf]])


def bin_index(x: np.ndarray) -> np.ndarray:
    """The histogram bin of each float32 value (numpy twin of the kernel's binning)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.int32)
    mag = bits & 0x7FFFFFFF
    code = (mag >> _SHIFT) - _CODE0
    neg = bits < 0
    inside = np.where(neg, ZERO - 1 - code, ZERO + 1 + code)
    out = np.where(code >= NPOS, np.where(neg, 0, N_BINS - 1), inside)
    return np.where(code < 0, ZERO, out).astype(np.int64)


@njit(inline="always")
def _bin(bits):
    mag = bits & 0x7FFFFFFF
    code = (mag >> _SHIFT) - _CODE0
    if code < 0:
        return ZERO
    if code >= NPOS:
        return 0 if bits < 0 else N_BINS - 1
    return ZERO - 1 - code if bits < 0 else ZERO + 1 + code


@njit(inline="always")
def _add_powers(s1, s2, s3, s4, i, d):
    """Power sums of neuron i's deviations d from its shift (float64)."""
    d2 = d * d
    s1[i] += d
    s2[i] += d2
    s3[i] += d2 * d
    s4[i] += d2 * d2


@njit(inline="always")
def _offer(vals, docs, src, pos, n, v, doc, b, t):
    """Offer (v, doc) to neuron n's top-k table, keeping one entry per document.
    A kept entry records the batch row `b` and position `t` it came from. Documents arrive in
    order, so the table ends as the k best per-document maxima in the total order (value desc,
    document asc; within a document the earliest chunk and position): the order in which
    `discover.shards.merge_topk` merges tables, so that shards merge to the same table."""
    k = vals.shape[1]
    lo = 0
    for j in range(k):
        if docs[n, j] == doc:
            if v > vals[n, j]:
                vals[n, j] = v
                src[n, j] = b
                pos[n, j] = t
            return
        if vals[n, j] < vals[n, lo] or (vals[n, j] == vals[n, lo] and docs[n, j] > docs[n, lo]):
            lo = j  # the entry to evict: the lowest value, of the latest document among equals
    if v > vals[n, lo]:
        vals[n, lo] = v
        docs[n, lo] = doc
        src[n, lo] = b
        pos[n, lo] = t


@njit(parallel=True, nogil=True, cache=True)
def activation_update(acts, bits, lens, start, docs, nxt, inv_scale, ct, wscale, group, count,
                      mean, m2, m3, m4, amin, amax, n_pos, hist,
                      av, ad, asrc, apos, dv, dd, dsrc, dpos, dense=False):
    """Fold one batch into the running state.

    acts (B, T, N) float32 and `bits` (the same buffer viewed as int32); lens (B,) valid length
    of each row (positions [start, lens[b]) are valid); docs (B,) document ordinal of each row;
    nxt (B, T) row of `ct` holding the congruences with the true next token (-1: unknown);
    inv_scale (B, T) 1 / final-norm scale; ct (u, N) w_out . U[:, next] per neuron;
    wscale (B, T, G) float32 write scale of each group, group (N,) each neuron's group: a valid
    position counts for neuron n where wscale[b, t, group[n]] != 0.
    Running state per neuron over count[n] counted positions (updated here): mean, m2, m3, m4
    (central sums, float64), amin, amax, n_pos (count > 0), hist (N, N_BINS). Top-k tables
    (N, k): values, document, and (set by this call for entries it changed) batch row and
    position. `dense`: every position counts for every neuron with scale 1 (a dense MLP): the
    per-position loop over a block's neurons is then branch-free (vectorised by the compiler),
    with the same operations in the same order per neuron, so the same results bit for bit."""
    B, T, N = acts.shape
    nblocks = (N + BLOCK - 1) // BLOCK
    for blk in prange(nblocks):
        n0 = blk * BLOCK
        n1 = min(N, n0 + BLOCK)
        w = n1 - n0
        shift = np.empty(w, np.float64)
        s1 = np.zeros(w, np.float64)
        s2 = np.zeros(w, np.float64)
        s3 = np.zeros(w, np.float64)
        s4 = np.zeros(w, np.float64)
        best_a = np.empty(w, np.float32)
        at_a = np.zeros(w, np.int32)
        best_d = np.empty(w, np.float32)
        at_d = np.zeros(w, np.int32)
        cnt = np.zeros(w, np.int64)
        grp = np.empty(w, np.int64)
        lo = np.empty(w, np.float32)
        hi = np.empty(w, np.float32)
        npos = np.zeros(w, np.int64)
        for i in range(w):
            grp[i] = group[n0 + i]
            shift[i] = mean[n0 + i] if count[n0 + i] > 0 else np.float64(acts[0, start, n0 + i])
            lo[i] = amin[n0 + i]
            hi[i] = amax[n0 + i]
        for b in range(B):
            for i in range(w):
                best_a[i] = EMPTY
                best_d[i] = EMPTY
            for t in range(start, lens[b]):
                j = nxt[b, t]
                isc = inv_scale[b, t]
                if dense:
                    for i in range(w):  # no branch: one vector lane per neuron
                        x = acts[b, t, n0 + i]
                        _add_powers(s1, s2, s3, s4, i, np.float64(x) - shift[i])
                        npos[i] += 1 if x > 0 else 0
                        lo[i] = x if x < lo[i] else lo[i]
                        hi[i] = x if x > hi[i] else hi[i]
                        up = x > best_a[i]
                        best_a[i] = x if up else best_a[i]
                        at_a[i] = t if up else at_a[i]
                    for i in range(w):
                        hist[n0 + i, _bin(bits[b, t, n0 + i])] += 1
                    if j >= 0:
                        for i in range(w):
                            y = acts[b, t, n0 + i] * np.float32(1.0) * ct[j, n0 + i] * isc
                            up = y > best_d[i]
                            best_d[i] = y if up else best_d[i]
                            at_d[i] = t if up else at_d[i]
                    continue
                for i in range(w):
                    s = wscale[b, t, grp[i]]
                    if s == 0:
                        continue
                    cnt[i] += 1
                    n = n0 + i
                    x = acts[b, t, n]
                    _add_powers(s1, s2, s3, s4, i, np.float64(x) - shift[i])
                    if x > 0:
                        npos[i] += 1
                    if x < lo[i]:
                        lo[i] = x
                    if x > hi[i]:
                        hi[i] = x
                    hist[n, _bin(bits[b, t, n])] += 1
                    if x > best_a[i]:
                        best_a[i] = x
                        at_a[i] = t
                    if j >= 0:
                        y = x * s * ct[j, n] * isc
                        if y > best_d[i]:
                            best_d[i] = y
                            at_d[i] = t
            if dense:
                for i in range(w):
                    cnt[i] += max(0, lens[b] - start)
            for i in range(w):
                n = n0 + i
                if best_a[i] > EMPTY:
                    _offer(av, ad, asrc, apos, n, best_a[i], docs[b], b, at_a[i])
                if best_d[i] > EMPTY:
                    _offer(dv, dd, dsrc, dpos, n, best_d[i], docs[b], b, at_d[i])
        for i in range(w):
            n = n0 + i
            n_pos[n] += npos[i]
            amin[n] = lo[i]
            amax[n] = hi[i]
            if cnt[i] == 0:
                continue
            na = np.float64(count[n])
            nb = np.float64(cnt[i])
            nn = na + nb
            first = count[n] == 0
            count[n] += cnt[i]
            # central sums of this batch from its power sums about `shift`
            dm = s1[i] / nb
            bm2 = s2[i] - nb * dm * dm
            bm3 = s3[i] - 3.0 * dm * s2[i] + 2.0 * nb * dm ** 3
            bm4 = s4[i] - 4.0 * dm * s3[i] + 6.0 * dm * dm * s2[i] - 3.0 * nb * dm ** 4
            bmean = shift[i] + dm
            if first:
                mean[n] = bmean
                m2[n] = bm2
                m3[n] = bm3
                m4[n] = bm4
                continue
            a2, a3, a4 = m2[n], m3[n], m4[n]
            delta = bmean - mean[n]
            mean[n] = mean[n] + delta * nb / nn
            m4[n] = (a4 + bm4 + delta ** 4 * na * nb * (na * na - na * nb + nb * nb) / nn ** 3
                     + 6.0 * delta * delta * (na * na * bm2 + nb * nb * a2) / (nn * nn)
                     + 4.0 * delta * (na * bm3 - nb * a3) / nn)
            m3[n] = (a3 + bm3 + delta ** 3 * na * nb * (na - nb) / (nn * nn)
                     + 3.0 * delta * (na * bm2 - nb * a2) / nn)
            m2[n] = a2 + bm2 + delta * delta * na * nb / nn
