"""CPU fast paths: the same maths as ``npgpt/functional.py``, arranged for the CPU's caches and cores.

    cross_entropy                  rows worked through in cache-sized blocks; dz written over the probabilities
    dropout                        16-bit random integers for the mask (2 bytes an element instead of 4)
    scaled_dot_product_attention   softmax in place on the scores; long causal sequences block by block,
                                   skipping the keys no query of a block sees
    adamw_step                     the elementwise update cut into pieces shared by the worker threads

Each is registered with the dispatcher (``register`` at the end), and ``tests/test_fast_cpu.py`` holds each
equal to its reference in ``functional.py`` / ``optim.py``: values and gradients.

Shapes: logits (N, V); attention (B, H, T, D); a dropout mask the shape of its input.
"""

import math
from collections import OrderedDict

import numpy as np

from ... import backend
from ... import functional as F
from ... import optim
from ...engine import _make, register_fast_path
from . import threads


# ========================================================================================================
# cross_entropy: a block of rows is read from memory once, and every step of the softmax runs on it in cache

CACHE_BLOCK_BYTES = 512 * 1024


def rows_per_block(array, block_bytes=CACHE_BLOCK_BYTES):
    """Rows of a 2-D array that fit in a cache-sized block."""
    return max(1, block_bytes // max(1, array.shape[-1] * array.itemsize))


def softmax_rows_blocked(z):
    """softmax(z) (N, C) and logsumexp(z) (N,), block by block of rows (the reference's formulas)."""
    probs = np.empty_like(z)
    logsumexp = np.empty(z.shape[0], dtype=z.dtype)
    step = rows_per_block(z)
    for lo in range(0, z.shape[0], step):
        block, out = z[lo:lo + step], probs[lo:lo + step]
        peak = block.max(axis=1, keepdims=True)             # (n, 1)
        np.subtract(block, peak, out=out)
        np.exp(out, out=out)
        sum_exp = out.sum(axis=1, keepdims=True)            # (n, 1)
        out /= sum_exp
        logsumexp[lo:lo + step] = (np.log(sum_exp) + peak)[:, 0]
    return probs, logsumexp


def cross_entropy(input, target, ignore_index=-100, reduction="mean"):
    input = F._t(input)
    logits = input.data
    z, labels = F.cross_entropy_rows(logits, target, reduction)
    F.check_class_ids(labels, z.shape[1], ignore_index)
    t = np.asarray(labels).reshape(-1)
    valid = t != ignore_index
    count = valid.sum()
    rows = np.arange(z.shape[0])
    safe_t = np.where(valid, t, 0)
    probs, logsumexp = softmax_rows_blocked(z)
    losses = (logsumexp - z[rows, safe_t]) * valid
    saved = {"probs": probs}        # the first backward turns it into dz in place

    def backward(grad):
        row_scale = F.cross_entropy_row_scale(grad, valid, count, reduction, z.dtype)
        # probs is needed by no one else: scaled in place it becomes dz (the 160 MB of a large batch's
        # logits are not allocated twice); a second backward, with retain_graph, recomputes it
        grad_z = saved.pop("probs", None)
        if grad_z is None:
            grad_z = softmax_rows_blocked(z)[0]
        grad_z *= row_scale[:, None]
        grad_z[rows, safe_t] -= row_scale
        return (F.grad_logits_shape(grad_z, logits),)

    out = F.cross_entropy_output(losses, count, labels, reduction, z.dtype)
    return _make(out, (input,), backward, "cross_entropy")


# ========================================================================================================
# dropout: masks from 16-bit integers

def keep_mask_16bit(shape, p, dtype, generator=None):
    """(bool mask keeping each element with probability ~1-p, the scale that makes its mean exactly 1).

    The mask comes from 16-bit random integers (half the random bytes of float32 draws), so p is rounded to a
    multiple of 1/65536, and the scale 65536 / (65536 - threshold) matches that rounding.
    """
    rng = generator if generator is not None else backend.global_rng()
    threshold = int(round(p * 65536))
    keep = rng.integers(0, 65536, size=shape, dtype=np.uint16) >= threshold
    return keep, np.dtype(dtype).type(65536.0 / (65536 - threshold))


def _uses_numpy_generator(generator):
    return generator is None or isinstance(generator, np.random.Generator)


def dropout(input, p=0.5, training=True, generator=None):
    input = F._t(input)
    if not 0.0 <= p <= 1.0 or not training or p in (0.0, 1.0):
        return F.dropout.reference(input, p, training, generator)
    x = input.data
    keep, scale = keep_mask_16bit(x.shape, p, x.dtype, generator)

    def backward(grad):
        grad_x = grad * keep
        grad_x *= scale
        return (grad_x,)
    out = x * keep
    out *= scale
    return _make(out, (input,), backward, "dropout")


# ========================================================================================================
# scaled_dot_product_attention

class MaskCache:
    """Additive causal masks (0 where a query may look, -inf where it may not), the most recently used kept
    up to `max_bytes` in all: a training run uses one or two shapes, generation with a growing context many."""

    def __init__(self, max_bytes=16 * 2**20):
        self.max_bytes, self.bytes, self.masks = max_bytes, 0, OrderedDict()

    def get(self, num_queries, num_keys, offset, dtype):
        key = (num_queries, num_keys, offset, np.dtype(dtype).str)
        mask = self.masks.get(key)
        if mask is not None:
            self.masks.move_to_end(key)
            return mask
        allowed = F.causal_mask(np, num_queries, num_keys, offset)
        mask = np.where(allowed, dtype.type(0), dtype.type(-np.inf)).astype(dtype)
        if mask.nbytes <= self.max_bytes:
            self.masks[key] = mask
            self.bytes += mask.nbytes
            while self.bytes > self.max_bytes:
                _, dropped = self.masks.popitem(last=False)
                self.bytes -= dropped.nbytes
        return mask


causal_masks = MaskCache()

# Causal sequences from this length on are scored block by block (see causal_attention_blocked)
BLOCKED_ATTENTION_MIN_LENGTH = 128
CAUSAL_ATTENTION_BLOCKS = 4     # query blocks: n blocks score (n + 1) / 2n of the (L, L) tiles


def _softmax_in_place(scores):
    """The scores array becomes softmax(scores) along the keys (the reference's formulas, no new array)."""
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    return scores


def _dropout_attention(probs, dropout_p, dtype, generator):
    """(A, mask): A = dropout(P) and the (keep, scale) pair its backward needs (None without dropout)."""
    if dropout_p == 0.0:
        return probs, None
    keep, keep_scale = keep_mask_16bit(probs.shape, dropout_p, dtype, generator)
    attn = probs * keep
    attn *= keep_scale
    return attn, (keep, keep_scale)


def _softmax_backward_in_place(grad_attn, probs, mask):
    """dA -> dS in place: dP = dA * mask, then dS = P * (dP - sum_j(dP * P))."""
    if mask is not None:
        grad_attn *= mask[0]
        grad_attn *= mask[1]
    grad_attn -= (grad_attn * probs).sum(axis=-1, keepdims=True)
    grad_attn *= probs
    return grad_attn


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 scale=None, generator=None):
    """The reference's attention with the softmax worked in place on the scores; long causal sequences go
    block by block. Q is scaled once into a contiguous array, which every product then reads fast."""
    query, key, value = F._t(query), F._t(key), F._t(value)
    q, k, v = query.data, key.data, value.data
    F.check_attention_inputs(q, k, v, attn_mask, is_causal)
    L, S = q.shape[-2], k.shape[-2]
    scale = q.dtype.type(1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if is_causal and L == S and L >= BLOCKED_ATTENTION_MIN_LENGTH:
        return causal_attention_blocked(query, key, value, scale, dropout_p, generator)

    q_scaled = np.multiply(q, scale, out=np.empty(q.shape, dtype=q.dtype))
    scores = np.matmul(q_scaled, k.swapaxes(-1, -2))                    # (..., L, S), scaled
    if is_causal:
        scores += causal_masks.get(L, S, 0, q.dtype)
    elif attn_mask is not None:
        attn_mask = np.asarray(attn_mask.data if isinstance(attn_mask, F.Tensor) else attn_mask)
        if attn_mask.dtype == bool:
            scores = np.where(attn_mask, scores, q.dtype.type(-np.inf))
        else:
            scores += attn_mask
    probs = _softmax_in_place(scores)
    attn, mask = _dropout_attention(probs, dropout_p, q.dtype, generator)
    out = np.matmul(attn, v)                                            # (..., L, Dv)

    def backward(grad):
        grad_v = np.matmul(attn.swapaxes(-1, -2), grad)                 # (..., S, Dv)
        grad_scores = _softmax_backward_in_place(np.matmul(grad, v.swapaxes(-1, -2)), probs, mask)
        grad_q = np.matmul(grad_scores, k)                              # (..., L, D)
        grad_q *= scale
        grad_k = np.matmul(grad_scores.swapaxes(-1, -2), q_scaled)      # (..., S, D)
        return grad_q, grad_k, grad_v
    return _make(out, (query, key, value), backward, "scaled_dot_product_attention")


def causal_attention_blocked(query, key, value, scale, dropout_p, generator):
    """Causal attention block by block of queries, skipping the keys no query of the block sees.

    Queries i0..i1-1 are only scored against keys 0..i1-1. With 4 blocks that is 10 of the 16 score tiles,
    so ~37% of the attention's multiplies, exponentials and dropout draws are never done.
    """
    q, k, v = query.data, key.data, value.data
    k, v = np.ascontiguousarray(k), np.ascontiguousarray(v)     # read by every block: laid out once
    L = q.shape[-2]
    block = max(64, -(-L // CAUSAL_ATTENTION_BLOCKS))
    q_scaled = np.multiply(q, scale, out=np.empty(q.shape, dtype=q.dtype))
    out = np.empty(q.shape[:-1] + v.shape[-1:], dtype=q.dtype)          # (..., L, Dv)
    saved = []                                              # per block: (i0, i1, P, A, dropout mask)
    for i0 in range(0, L, block):
        i1 = min(L, i0 + block)
        scores = np.matmul(q_scaled[..., i0:i1, :], k[..., :i1, :].swapaxes(-1, -2))   # (..., b, i1)
        scores += causal_masks.get(i1 - i0, i1, i0, q.dtype)
        probs = _softmax_in_place(scores)
        attn, mask = _dropout_attention(probs, dropout_p, q.dtype, generator)
        np.matmul(attn, v[..., :i1, :], out=out[..., i0:i1, :])    # the block's rows of O, written in place
        saved.append((i0, i1, probs, attn, mask))

    # Per block, with P, A of shape (..., b, i1): the reference's backward restricted to the visible keys.
    # Keys and values collect their gradients from every block that sees them; the last block sees every
    # key, so going backwards it writes dK and dV whole and the others add.
    def backward(grad):
        grad = np.ascontiguousarray(grad)                   # (..., L, Dv), sliced by every block
        grad_q = np.empty(q.shape, dtype=q.dtype)
        grad_k, grad_v = np.empty_like(k), np.empty_like(v)
        for i0, i1, probs, attn, mask in reversed(saved):
            first = i1 == L
            grad_block = grad[..., i0:i1, :]                # (..., b, Dv)
            _product_into(grad_v[..., :i1, :], attn.swapaxes(-1, -2), grad_block, accumulate=not first)
            grad_scores = _softmax_backward_in_place(np.matmul(grad_block, v[..., :i1, :].swapaxes(-1, -2)),
                                                     probs, mask)
            np.matmul(grad_scores, k[..., :i1, :], out=grad_q[..., i0:i1, :])
            grad_q[..., i0:i1, :] *= scale
            _product_into(grad_k[..., :i1, :], grad_scores.swapaxes(-1, -2), q_scaled[..., i0:i1, :],
                          accumulate=not first)
        return grad_q, grad_k, grad_v
    return _make(out, (query, key, value), backward, "scaled_dot_product_attention")


def _product_into(target, a, b, accumulate):
    """target = a @ b, or target += a @ b."""
    if accumulate:
        target += np.matmul(a, b)
    else:
        np.matmul(a, b, out=target)


# ========================================================================================================
# AdamW: the elementwise update in pieces, shared by the worker threads

ADAMW_PIECE = 262144        # elements: pieces let threads share even the largest parameter


def adamw_step(updates):
    pieces = []     # (param, grad, m, v, settings): whole small parameters, pieces of big ones
    for p, state, group in updates:
        settings = optim.adamw_settings(state, group)
        arrays = (p.data, p.grad, state["exp_avg"], state["exp_avg_sq"])
        if not all(a.flags.c_contiguous for a in arrays):
            pieces.append(arrays + (settings,))
            continue
        # the update is elementwise, so any cut is exact (it is bound by memory bandwidth, ~28 bytes an element)
        flat = [a.reshape(-1) for a in arrays]
        for lo in range(0, p.size, ADAMW_PIECE):
            pieces.append(tuple(a[lo:lo + ADAMW_PIECE] for a in flat) + (settings,))
    threads.run_in_parallel(lambda piece: optim.adamw_update(*piece), pieces)


def _many_workers(*args, **kwargs):
    return threads.workers() > 1


def _no_custom_generator(*args, **kwargs):
    return _uses_numpy_generator(kwargs.get("generator", args[3] if len(args) > 3 else None))


def _attention_generator_is_numpy(*args, **kwargs):
    return _uses_numpy_generator(kwargs.get("generator", args[7] if len(args) > 7 else None))


def register():
    register_fast_path("cross_entropy", cross_entropy, "cpu")
    register_fast_path("dropout", dropout, "cpu", applies=_no_custom_generator)
    register_fast_path("scaled_dot_product_attention", scaled_dot_product_attention, "cpu",
                       applies=_attention_generator_is_numpy)
    register_fast_path("adamw_step", adamw_step, "cpu", applies=_many_workers)
