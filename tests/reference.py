"""Independent, deliberately slow references of the seed's svd pack (docs/algorithms.md) and its forward.

Written from the spec with plain loops and full SVDs, sharing no code with the
pipeline or runtime, so a bug there cannot hide in here.
"""

from __future__ import annotations

import numpy as np

ALPHAS = (0.5, 0.75, 1.0, 1.25, 1.5)


def sign_fixed(u: np.ndarray) -> np.ndarray:
    """Documented convention: each column's largest-|.| entry is positive."""
    u = u.copy()
    for j in range(u.shape[1]):
        i = int(np.argmax(np.abs(u[:, j])))
        if u[i, j] < 0:
            u[:, j] = -u[:, j]
    return u


def left_singular_vectors(m: np.ndarray) -> np.ndarray:
    u, _, _ = np.linalg.svd(m, full_matrices=True)
    return sign_fixed(u)


def reference_pack(
    w: np.ndarray,
    *,
    block: int = 16,
    block_out: int = 16,
    permute: bool = True,
    row_rot: str = "restore",
    lam: float = 0.15,
    bits: int = 4,
) -> dict:
    w = np.asarray(w, dtype=np.float64)
    out_f, in_f = w.shape
    # 1-2: smoothed channel energy, sort descending, zigzag
    energy = np.array([np.mean(w[:, j] ** 2) for j in range(in_f)])
    energy = (1 - lam) * energy + lam * energy.mean()
    if permute:
        order = list(np.argsort(-energy, kind="stable"))
        perm, lo, hi, front = [], 0, in_f - 1, True
        while lo <= hi:
            if front:
                perm.append(order[lo])
                lo += 1
            else:
                perm.append(order[hi])
                hi -= 1
            front = not front
        perm = np.array(perm)
    else:
        perm = np.arange(in_f)
    # 3-4: input blocks over the permuted order
    r_in, w_t = [], np.zeros_like(w)
    for start in range(0, in_f, block):
        cols = perm[start : start + block]
        u = left_singular_vectors(w[:, cols].T)
        r_in.append(u)
        w_t[:, start : start + len(cols)] = w[:, cols] @ u
    # 5: output blocks from the original rows
    r_out = []
    if row_rot == "restore":
        for start in range(0, out_f, block_out):
            u = left_singular_vectors(w[start : start + block_out, :])
            r_out.append(u)
            w_t[start : start + u.shape[0], :] = u @ w_t[start : start + u.shape[0], :]
    # 6: per-row scale with alpha search; the float32-rounded scale is the one used
    q = 2 ** (bits - 1) - 1
    codes = np.zeros(w_t.shape, dtype=np.int64)
    scales = np.zeros(out_f)
    for r in range(out_f):
        row = w_t[r]
        best = None
        for alpha in ALPHAS:
            s = float(np.float32(max(np.abs(row).max() / q / alpha, 1e-10)))
            c = np.clip(np.rint(row / s), -q - 1, q)
            err = float(np.sum((c * s - row) ** 2))
            if best is None or err < best[0]:
                best = (err, s, c)
        scales[r], codes[r] = best[1], best[2]
    return {"perm": perm, "r_in": r_in, "r_out": r_out, "w_t": w_t, "codes": codes, "scales": scales}


def reference_forward(
    x: np.ndarray,
    *,
    perm,
    r_in,
    r_out,
    w_t,
    bias=None,
    act_bits: int = 0,
    act_scale: np.ndarray | None = None,
    in_scale: np.ndarray | None = None,
) -> np.ndarray:
    """§5 forward, block by block with explicit copies (the seed's loop), float64.

    ``in_scale`` (format 2's equalization) multiplies each input channel first.
    ``r_in``/``r_out`` are lists of (possibly short) square blocks; ``r_in`` empty or None:
    no rotation. With act_bits > 0, activations are fake-quantized per token (dynamic) or
    with ``act_scale`` (static).
    """
    x = np.asarray(x, dtype=np.float64).reshape(-1, w_t.shape[1])
    if in_scale is not None:
        x = x * np.asarray(in_scale, dtype=np.float64)[None, :]
    xp = x[:, perm].copy() if perm is not None else x.copy()
    if not r_in:
        xt = xp
    else:
        xt = np.zeros_like(xp)
    start = 0
    for u in r_in or []:
        b = u.shape[0]
        xt[:, start : start + b] = xp[:, start : start + b] @ u
        start += b
    if act_bits:
        q = 2 ** (act_bits - 1) - 1
        if act_scale is None:
            s = np.maximum(np.abs(xt).max(axis=1, keepdims=True) / q, 1e-8)
        else:
            s = act_scale[None, :]
        xt = np.clip(np.rint(xt / s), -q - 1, q) * s
    y = xt @ w_t.T
    if r_out:
        y_out = np.zeros_like(y)
        start = 0
        for u in r_out:
            b = u.shape[0]
            y_out[:, start : start + b] = y[:, start : start + b] @ u
            start += b
        y = y_out
    if bias is not None:
        y = y + bias
    return y


def unpack_int4(packed: np.ndarray, in_features: int) -> np.ndarray:
    """Low nibble = even column, high nibble = odd column, code = nibble - 8."""
    out = np.zeros((packed.shape[0], packed.shape[1] * 2), dtype=np.int64)
    for k in range(packed.shape[1]):
        out[:, 2 * k] = (packed[:, k] & 0x0F).astype(np.int64) - 8
        out[:, 2 * k + 1] = (packed[:, k] >> 4).astype(np.int64) - 8
    return out[:, :in_features]


def blocks_from_stacked(stacked: np.ndarray, n: int) -> list[np.ndarray]:
    """Stacked identity-padded [nb, B, B] -> list of square blocks covering n channels."""
    b = stacked.shape[1]
    return [stacked[i, : min(b, n - i * b), : min(b, n - i * b)].astype(np.float64) for i in range(stacked.shape[0])]


def reference_stages(x: np.ndarray, stages: list[tuple[str, object]]) -> np.ndarray:
    """x·T for a transform given as (kind, value) stages, applied in order with plain loops:
    "scale" multiplies channel j by value[j]; "perm" takes channel value[j] into position j;
    "rotate" multiplies consecutive channel blocks by the square matrices in ``value`` (a list)."""
    x = np.asarray(x, dtype=np.float64).copy()
    for kind, value in stages:
        if kind == "scale":
            for j in range(x.shape[1]):
                x[:, j] = x[:, j] * float(value[j])
        elif kind == "perm":
            x = np.stack([x[:, int(value[j])] for j in range(x.shape[1])], axis=1)
        else:
            out, start = np.zeros_like(x), 0
            for u in value:
                b = u.shape[0]
                out[:, start : start + b] = x[:, start : start + b] @ u
                start += b
            x = out
    return x


def reference_hadamard(b: int) -> np.ndarray:
    """The normalized b x b Sylvester-Hadamard matrix, entry by entry: (-1)^popcount(i & j) / sqrt(b)."""
    h = np.zeros((b, b))
    for i in range(b):
        for j in range(b):
            h[i, j] = (-1) ** bin(i & j).count("1") / np.sqrt(b)
    return h


def reference_equalization(w: np.ndarray, beta: float) -> np.ndarray:
    """Data-free equalization factors s_j = rms(W[:, j])^-beta, scaled to geometric mean 1
    (the equalized weight is W·diag(s); the stored input scale is 1/s)."""
    w = np.asarray(w, dtype=np.float64)
    s = np.array([np.sqrt(np.mean(w[:, j] ** 2)) ** -beta for j in range(w.shape[1])])
    return s / np.exp(np.mean(np.log(s)))
