"""One block of decomposed-relative-position attention with an O(rows) backward pass.

Legend: B batch, m heads in the block, r query rows of the block, w grid width, h grid
height, L = h * w keys, K head dim.

`attend_block` is the inner kernel of `segjax.models.vit.rel_pos_attention` (which
splits the logits into cache-sized blocks of heads and query rows): softmax(q k^T / sqrt(K)
+ q . R_h + q . R_w) v for the block's queries against all keys, normalised after the
value product. Its custom VJP keeps only the block's output and row log-sum-exp and
recomputes the logits in the backward pass (as flash attention does), so a training step
does not store the (B, N, L, L) probabilities: SAM / ViTDet's global blocks at 1024
(L = 4096, 12 heads) would otherwise keep 805 MB per block for the backward pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _logits(qc, rhq, rw, k, scale):
    """float32 logits (B, m, r, w, h, w) of the block, as the reference adds them."""
    b, m, r, w, _ = qc.shape
    h = rhq.shape[1]
    logits = jnp.einsum("bnrwk,bnsk->bnrws", qc * scale, k).astype(jnp.float32)
    rel_h = jnp.einsum("bnrwk,ryk->bnrwy", qc, rhq).astype(jnp.float32)  # (B, m, r, w, h)
    rel_w = jnp.einsum("bnrwk,wxk->bnrwx", qc, rw).astype(jnp.float32)  # (B, m, r, w, w)
    return logits.reshape(b, m, r, w, h, w) + rel_h[..., :, None] + rel_w[..., None, :]


# NOTE: the softmax passes work on the logits as (.., key row, key column), the shape in
# which the position terms broadcast, and the keys are flattened only for the matmuls.
# Flattened first, XLA:CPU fuses that reshape into the exp pass and re-derives both key
# indices per element, which made the pass several times slower than the matmuls.


def _forward(qc, rhq, rw, k, v):
    b, m, r, w, _ = qc.shape
    scale = jnp.asarray(qc.shape[-1] ** -0.5, qc.dtype)
    logits = _logits(qc, rhq, rw, k, scale)
    # NOTE: softmax in fp32 under bf16 compute (SAM in fp16 without it is garbage).
    mx = logits.max((-2, -1), keepdims=True)
    e = jnp.exp(logits - mx)
    total = e.sum((-2, -1), keepdims=True)[..., 0]  # (B, m, r, w, 1)
    e = e.reshape(b, m, r, w, -1)
    out = jnp.einsum("bnrws,bnsk->bnrwk", e.astype(v.dtype), v).astype(jnp.float32) / total
    return out, mx[..., 0], total


@jax.custom_vjp
def attend_block(qc: jax.Array, rhq: jax.Array, rw: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Attention of one block of query rows over the whole grid.

    qc: (B, m, r, w, K) queries of image rows [r0, r0 + r); rhq: (r, h, K) the row
    table R_h for those rows; rw: (w, w, K) the column table; k, v: (B, m, L, K),
    L = h * w in raster order. logits = (qc / sqrt(K)) k^T + qc . R_h[row(q), row(k)] +
    qc . R_w[col(q), col(k)] in float32. Returns (B, m, r, w, K) in v's dtype.
    """
    return _forward(qc, rhq, rw, k, v)[0].astype(v.dtype)


def _attend_fwd(qc, rhq, rw, k, v):
    out, mx, total = _forward(qc, rhq, rw, k, v)
    return out.astype(v.dtype), (qc, rhq, rw, k, v, out, mx + jnp.log(total))


def _attend_bwd(res, dout):
    qc, rhq, rw, k, v, out, lse = res
    b, m, r, w, kd = qc.shape
    h = rhq.shape[1]
    scale = jnp.asarray(kd ** -0.5, qc.dtype)
    # one pass over the block: the probabilities from the row log-sum-exp
    probs = jnp.exp(_logits(qc, rhq, rw, k, scale) - lse[..., None])  # (B, m, r, w, h, w) float32
    dout = dout.astype(v.dtype)
    # NOTE: dv and dk are computed transposed, (K, L) = (rows, K)^T x (rows, L), so that the
    # (rows, L) probabilities / logit gradients are a matmul's right operand in their own
    # row-major layout; the (rows, L)^T x (rows, K) form made XLA:CPU copy each of them
    # transposed (a strided pass over the block, slower than the exp pass).
    flat = (b, m, r, w, h * w)
    dv = jnp.swapaxes(jnp.einsum("bnrwk,bnrws->bnks", dout, probs.reshape(flat).astype(v.dtype)), -1, -2)
    dprobs = jnp.einsum("bnrwk,bnsk->bnrws", dout, v).astype(jnp.float32).reshape(probs.shape)
    # softmax backward: dlogits = P * (dP - sum_s P dP), and sum_s P dP = dout . out
    delta = jnp.sum(dout.astype(jnp.float32) * out, -1, keepdims=True)[..., None]
    grid = probs * (dprobs - delta)  # (B, m, r, w, h, w)
    drel_h = grid.sum(-1).astype(qc.dtype)  # (B, m, r, w, h)
    drel_w = grid.sum(-2).astype(qc.dtype)  # (B, m, r, w, w)
    dlogits = grid.reshape(flat).astype(qc.dtype)
    dq = (jnp.einsum("bnrws,bnsk->bnrwk", dlogits, k) * scale
          + jnp.einsum("bnrwy,ryk->bnrwk", drel_h, rhq) + jnp.einsum("bnrwx,wxk->bnrwk", drel_w, rw))
    dk = jnp.swapaxes(jnp.einsum("bnrwk,bnrws->bnks", qc * scale, dlogits), -1, -2)
    drhq = jnp.einsum("bnrwy,bnrwk->ryk", drel_h, qc)
    drw = jnp.einsum("bnrwx,bnrwk->wxk", drel_w, qc)
    return (dq.astype(qc.dtype), drhq.astype(rhq.dtype), drw.astype(rw.dtype), dk.astype(k.dtype),
            dv.astype(v.dtype))


attend_block.defvjp(_attend_fwd, _attend_bwd)
