"""Pseudo-random permutations evaluated per index, in O(1) memory, vectorised.

Pack uses one to store records in a shuffled order, and the loader to shuffle each window of an
epoch, without ever materialising a permutation of the whole dataset: 50 million records need no
400 MB index in every worker, and any position's value can be computed on its own.

A 4-round Feistel network on the smallest even bit width covering ``n`` is a bijection of
``[0, 2**bits)``; cycle-walking (re-applying it until the value falls below ``n``) restricts it to
a bijection of ``[0, n)``. Keys may differ per element (one permutation per window).
"""

from __future__ import annotations

import numpy as np

try:
    from signscale import kernels
except ImportError:  # no numba (a Python it has no wheels for yet): the numpy code below does the work
    kernels = None  # type: ignore[assignment]

_M1, _M2 = np.uint64(0x85EBCA6B), np.uint64(0xC2B2AE35)


def _round_keys(seed: np.ndarray | int, rounds: int) -> list[np.ndarray]:
    s = np.asarray(seed, dtype=np.uint64)
    with np.errstate(over="ignore"):
        return [((s * np.uint64(0x9E3779B97F4A7C15)) ^ np.uint64((r + 1) * 0xBF58476D1CE4E5B9 & (2**64 - 1)))
                >> np.uint64(32) for r in range(rounds)]


def permute(x: np.ndarray, n: int, seed: np.ndarray | int, rounds: int = 4, *, compiled: bool | None = None
            ) -> np.ndarray:
    """Image of ``x`` (values in [0, n)) under the permutation of [0, n) chosen by ``seed``.

    ``seed`` is an int or an array broadcast against ``x`` (one permutation per element's key).
    ``compiled``: use :func:`signscale.kernels.permute` (None: where numba imports), which gives
    the same values; the numpy code here is the reference it is tested against.
    """
    bits = max(2, int(n - 1).bit_length())
    bits += bits % 2
    if compiled is None:
        compiled = kernels is not None
    if compiled:
        return kernels.permute(np.asarray(x), n, np.asarray(seed), bits, rounds)
    half = np.uint64(bits // 2)
    mask = np.uint64((1 << (bits // 2)) - 1)
    keys = _round_keys(seed, rounds)

    def once(v: np.ndarray, ks: list[np.ndarray]) -> np.ndarray:
        left, right = v >> half, v & mask
        with np.errstate(over="ignore"):
            for k in ks:
                f = ((right * _M1 + k) ^ (right >> np.uint64(3))) * _M2
                left, right = right, (left ^ (f >> np.uint64(7))) & mask
        return (left << half) | right

    x = np.asarray(x, dtype=np.uint64)
    keys = [np.broadcast_to(k, x.shape) for k in keys]
    out = once(x, keys)
    bad = np.nonzero(out >= np.uint64(n))[0] if out.ndim else np.nonzero(np.atleast_1d(out >= n))[0]
    while len(bad):  # cycle-walk the values that left [0, n)
        out[bad] = once(out[bad], [k[bad] for k in keys])
        bad = bad[out[bad] >= np.uint64(n)]
    return out
