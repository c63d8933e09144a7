"""One block of decomposed-relative-position attention with an O(rows) backward pass.

Legend: B batch, m heads in the block, r query rows of the block, w grid width, h grid
height, L = h * w keys, Q = r * w queries of the block, K head dim.

`attend_block` is the inner kernel of `segjax.models.vit.rel_pos_attention` (which
splits the logits into cache-sized blocks of heads and query rows): softmax(q k^T / sqrt(K)
+ q . R_h + q . R_w) v for the block's queries against all keys, normalised after the
value product. Its custom VJP keeps only the block's output and the row log-sum-exp and
recomputes the probabilities in the backward pass (as flash attention does), so a
training step does not store the (B, N, L, L) probabilities: SAM / ViTDet's global
blocks at 1024 (L = 4096, 12 heads) would otherwise keep 805 MB per block for the
backward pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_F32 = jnp.float32


# NOTE: the layouts here are chosen for XLA:CPU (benchmarks/README.md, `vitdet.py`), with
# the same math on every backend:
# - the keys arrive transposed (kt, (B, m, K, L)) and the backward pass works on the
#   transposed logits (L, Q), so every large product is a plain row-major matmul; the
#   query-major backward needed two (L, Q) transposes per block before its dk / dv dots;
# - the position terms are dots (einsums). NOTE: written as broadcast products summed
#   over K they were faster, but XLA:CPU's YNNPACK fusion (jaxlib 0.10.2, default
#   flags) miscompiles that product-and-reduce under jit for some shapes (e.g. B = 1,
#   2 heads, 4 x 4 rows, K = 32: relative error > 1), which broke the tiny SAM's
#   parity; tests/ops/test_rel_pos_attention.py checks the jitted kernel over a shape
#   sweep;
# - the rel-pos gradient over the key rows is a tree of halving adds (`_sum_leading`):
#   XLA:CPU's reduce over a leading axis with a long contiguous inner extent ran ~20x
#   slower than the same adds.


def _sum_leading(x: jax.Array) -> jax.Array:
    """x.sum(0) as a tree of halving adds (same sum, another order of additions)."""
    while x.shape[0] > 1:
        half = x.shape[0] // 2
        y = x[:half] + x[half:2 * half]
        x = jnp.concatenate([y, x[2 * half:]]) if x.shape[0] % 2 else y
    return x[0]


def _logits(qc: jax.Array, rhq: jax.Array, rw: jax.Array, kt: jax.Array) -> jax.Array:
    """float32 logits (B, m, Q, L) of the block, query-major."""
    b, m, r, w, kd = qc.shape
    h = rhq.shape[1]
    scale = jnp.asarray(kd ** -0.5, qc.dtype)
    s = jnp.einsum("bnqk,bnks->bnqs", (qc * scale).reshape(b, m, r * w, kd), kt).astype(_F32)
    q32 = qc.astype(_F32)
    rel_h = jnp.einsum("bnrwk,ryk->bnrwy", q32, rhq.astype(_F32))  # (B, m, r, w, h)
    rel_w = jnp.einsum("bnrwk,wxk->bnrwx", q32, rw.astype(_F32))  # (B, m, r, w, w)
    s = (s.reshape(b, m, r * w, h, w) + rel_h.reshape(b, m, r * w, h, 1)
         + rel_w.reshape(b, m, r * w, 1, w))
    return s.reshape(b, m, r * w, h * w)


def _logits_t(qc: jax.Array, rhq: jax.Array, rw: jax.Array, kt: jax.Array) -> jax.Array:
    """float32 logits of the block transposed, key-major (B, m, L, Q); same values."""
    b, m, r, w, kd = qc.shape
    h = rhq.shape[1]
    scale = jnp.asarray(kd ** -0.5, qc.dtype)
    k = jnp.swapaxes(kt, -1, -2)  # (B, m, L, K)
    st = jnp.einsum("bnsk,bnqk->bnsq", k, (qc * scale).reshape(b, m, r * w, kd)).astype(_F32)
    q32 = qc.astype(_F32)
    rel_h = jnp.einsum("bnrwk,ryk->bnyrw", q32, rhq.astype(_F32))  # (B, m, h, r, w)
    rel_w = jnp.einsum("bnrwk,wxk->bnxrw", q32, rw.astype(_F32))  # (B, m, w, r, w)
    st = (st.reshape(b, m, h, w, r * w) + rel_h.reshape(b, m, h, 1, r * w)
          + rel_w.reshape(b, m, 1, w, r * w))
    return st.reshape(b, m, h * w, r * w)


def _forward(qc, rhq, rw, kt, v):
    b, m, r, w, kd = qc.shape
    logits = _logits(qc, rhq, rw, kt)
    # NOTE: softmax in fp32 under bf16 compute (SAM in fp16 without it is garbage).
    mx = logits.max(-1, keepdims=True)
    e = jnp.exp(logits - mx)
    total = e.sum(-1, keepdims=True)
    out = jnp.einsum("bnqs,bnsk->bnqk", e.astype(v.dtype), v).astype(_F32) / total
    lse = (mx + jnp.log(total))[..., 0]  # (B, m, Q)
    return out.reshape(b, m, r, w, kd), lse


@jax.custom_vjp
def attend_block(qc: jax.Array, rhq: jax.Array, rw: jax.Array, kt: jax.Array, v: jax.Array) -> jax.Array:
    """Attention of one block of query rows over the whole grid.

    qc: (B, m, r, w, K) queries of image rows [r0, r0 + r); rhq: (r, h, K) the row
    table R_h for those rows; rw: (w, w, K) the column table; kt: (B, m, K, L) the keys
    transposed, v: (B, m, L, K), L = h * w in raster order. logits = (qc / sqrt(K)) k^T +
    qc . R_h[row(q), row(k)] + qc . R_w[col(q), col(k)] in float32. Returns
    (B, m, r, w, K) in v's dtype.
    """
    return _forward(qc, rhq, rw, kt, v)[0].astype(v.dtype)


def _attend_fwd(qc, rhq, rw, kt, v):
    out, lse = _forward(qc, rhq, rw, kt, v)
    return out.astype(v.dtype), (qc, rhq, rw, kt, v, out, lse)


def _attend_bwd(res, dout):
    qc, rhq, rw, kt, v, out, lse = res
    b, m, r, w, kd = qc.shape
    h, nq = rhq.shape[1], r * w
    scale = jnp.asarray(kd ** -0.5, qc.dtype)
    qs = (qc * scale).reshape(b, m, nq, kd)
    # probabilities transposed, P^T = exp(S^T - lse): (B, m, L, Q) float32
    pt = jnp.exp(_logits_t(qc, rhq, rw, kt) - lse[:, :, None, :])
    dout = dout.astype(v.dtype)
    do2 = dout.reshape(b, m, nq, kd)
    dv = jnp.einsum("bnsq,bnqk->bnsk", pt.astype(v.dtype), do2)
    dpt = jnp.einsum("bnsk,bnqk->bnsq", v, do2).astype(_F32)
    # softmax backward: dlogits = P * (dP - sum_s P dP), and sum_s P dP = dout . out
    delta = jnp.sum(dout.astype(_F32) * out, -1).reshape(b, m, 1, nq)
    dst = pt * (dpt - delta)  # dlogits^T (B, m, L, Q)
    grid = dst.reshape(b, m, h, w, r, w)
    drel_h = grid.sum(3).astype(qc.dtype)  # (B, m, h, r, w): sum over key columns
    drel_w = _sum_leading(jnp.moveaxis(grid, 2, 0)).astype(qc.dtype)  # (B, m, w, r, w): over key rows
    dst = dst.astype(qc.dtype)
    dqt = jnp.einsum("bnks,bnsq->bnkq", kt, dst)  # (B, m, K, Q)
    dq = (jnp.swapaxes(dqt, -1, -2).reshape(b, m, r, w, kd) * scale
          + jnp.einsum("bnyrw,ryk->bnrwk", drel_h, rhq) + jnp.einsum("bnxrw,wxk->bnrwk", drel_w, rw))
    dk = jnp.einsum("bnsq,bnqk->bnks", dst, qs)  # (B, m, K, L), the cotangent of kt
    drhq = jnp.einsum("bnyrw,bnrwk->ryk", drel_h, qc)
    drw = jnp.einsum("bnxrw,bnrwk->wxk", drel_w, qc)
    return (dq.astype(qc.dtype), drhq.astype(rhq.dtype), drw.astype(rw.dtype), dk.astype(kt.dtype),
            dv.astype(v.dtype))


attend_block.defvjp(_attend_fwd, _attend_bwd)
