"""CPU fast paths in NumPy: the same maths as ``npgpt/functional.py``, arranged for the CPU's caches and cores.

Where the C kernels are built (``native.py``), ``native_ops.py``'s GELU, LayerNorm, cross-entropy, dropout
and AdamW are asked first and these run only without them; the attention below is the one path either way,
its row softmax by the kernel where there is one.

    gelu                           elementwise, block by cache-sized block, the blocks shared by the threads
    layer_norm                     row blocks; the weight and bias gradients summed per chunk, chunk by chunk
    cross_entropy                  rows worked through in cache-sized blocks; dz written over the probabilities
    dropout                        16-bit random integers for the mask (2 bytes an element instead of 4)
    scaled_dot_product_attention   softmax in place on the scores; long causal sequences block by block,
                                   skipping the keys no query of a block sees; the heads shared by the threads
    adamw_step                     the elementwise update cut into pieces shared by the worker threads
    add_arrays                     large sums (the residual stream, gradients meeting) in chunks on the threads

With ``threads.workers()`` > 1 (the default on a machine of several cores), each op splits its rows (or heads,
or elements) into chunks with fixed boundaries and runs them at once on the persistent pool (``parallel.py``),
so a plain loop of ``model(x)``, ``F.cross_entropy``, ``loss.backward()`` and ``opt.step()`` uses every core.

Each is registered with the dispatcher (``register`` at the end), and ``tests/test_fast_cpu.py`` holds each
equal to its reference in ``functional.py`` / ``optim.py``: values and gradients, at 1, 2 and 3 threads.

Shapes: logits (N, V); attention (B, H, T, D); LayerNorm rows (N, C); GELU and dropout: any shape.
"""

import math
import threading
from collections import OrderedDict

import numpy as np

from ... import backend
from ... import functional as F
from ... import optim
from ...engine import _make, register_fast_path
from . import native, parallel, threads

# The smallest chunk worth a thread: below it the hand-off (~50 us a chunk) costs more than it saves
# (measured on a 2-core machine: GELU of 16K float32 values runs slower on 2 threads, of 32K faster).
PARALLEL_MIN_ELEMENTS = 32768


# ========================================================================================================
# cross_entropy: a block of rows is read from memory once, and every step of the softmax runs on it in cache

CACHE_BLOCK_BYTES = 512 * 1024


def rows_per_block(array, block_bytes=CACHE_BLOCK_BYTES):
    """Rows of a 2-D array that fit in a cache-sized block."""
    return max(1, block_bytes // max(1, array.shape[-1] * array.itemsize))


def softmax_rows_blocked(z, probs=None, logsumexp=None):
    """softmax(z) (N, C) and logsumexp(z) (N,), block by block of rows (the reference's formulas), written
    into `probs` and `logsumexp` if given."""
    probs = np.empty_like(z) if probs is None else probs
    logsumexp = np.empty(z.shape[0], dtype=z.dtype) if logsumexp is None else logsumexp
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


def softmax_rows_parallel(z):
    """softmax_rows_blocked, its rows split into one chunk per worker thread (rows are independent)."""
    probs = np.empty_like(z)
    logsumexp = np.empty(z.shape[0], dtype=z.dtype)

    def rows(lo, hi):
        softmax_rows_blocked(z[lo:hi], probs[lo:hi], logsumexp[lo:hi])
    parallel.parallel_for(z.shape[0], rows, min_rows(z))
    return probs, logsumexp


def min_rows(array, min_elements=PARALLEL_MIN_ELEMENTS):
    """The fewest rows of a 2-D array worth a thread of their own."""
    return -(-min_elements // max(1, array.shape[-1]))


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
    probs, logsumexp = softmax_rows_parallel(z)
    losses = (logsumexp - z[rows, safe_t]) * valid
    saved = {"probs": probs}        # the first backward turns it into dz in place

    def backward(grad):
        row_scale = F.cross_entropy_row_scale(grad, valid, count, reduction, z.dtype)
        # probs is needed by no one else: scaled in place it becomes dz (the 160 MB of a large batch's
        # logits are not allocated twice); a second backward, with retain_graph, recomputes it
        grad_z = saved.pop("probs", None)
        if grad_z is None:
            grad_z = softmax_rows_parallel(z)[0]

        def scale_rows(lo, hi):
            grad_z[lo:hi] *= row_scale[lo:hi, None]
        parallel.parallel_for(z.shape[0], scale_rows, 4 * min_rows(z))     # one pass: 4x the rows pay
        grad_z[rows, safe_t] -= row_scale
        return (F.grad_logits_shape(grad_z, logits),)

    out = F.cross_entropy_output(losses, count, labels, reduction, z.dtype)
    return _make(out, (input,), backward, "cross_entropy")


# ========================================================================================================
# gelu: elementwise, so any cut of the elements is exact. The reference's ~15 passes over the array run
# block by block on cache-sized pieces (a 4 MB activation would go through main memory on every pass), and
# the blocks are shared by the worker threads.

ELEMENTWISE_BLOCK_BYTES = 256 * 1024      # a block and its few temporaries fit in a 1 MB L2 cache


def elementwise_parallel(size, itemsize, block_fn):
    """block_fn(lo, hi) over cache-sized blocks of range(size), the blocks split into chunks, one per
    worker thread."""
    step = max(1, ELEMENTWISE_BLOCK_BYTES // itemsize)

    def chunk(lo, hi):
        for start in range(lo, hi, step):
            block_fn(start, min(hi, start + step))
    parallel.parallel_for(size, chunk, PARALLEL_MIN_ELEMENTS)


def gelu(input, approximate="none"):
    """The reference's GELU (exact or tanh), block by block on the worker threads; the same numbers."""
    input = F._t(input)
    if approximate not in ("none", "tanh"):
        return F.gelu.reference(input, approximate)
    x = input.data
    flat_x = x.reshape(-1)
    out = np.empty(x.shape, dtype=x.dtype)
    saved = np.empty(x.shape, dtype=x.dtype)                # Phi(x), or tanh(u) for the tanh form
    flat_out, flat_saved = out.reshape(-1), saved.reshape(-1)
    k = x.dtype.type(math.sqrt(2 / math.pi))
    c = x.dtype.type(0.044715)

    def forward_block(lo, hi):
        xb = flat_x[lo:hi]
        if approximate == "none":
            cdf = F._normal_cdf(xb)                         # Phi(x)
            np.multiply(xb, cdf, out=flat_out[lo:hi])
            flat_saved[lo:hi] = cdf
        else:
            th = np.tanh(k * (xb + c * xb * xb * xb))        # tanh(u), u = k (x + 0.044715 x^3)
            flat_out[lo:hi] = 0.5 * xb * (1 + th)
            flat_saved[lo:hi] = th
    elementwise_parallel(flat_x.size, x.itemsize, forward_block)

    # exact:  d/dx [x Phi(x)] = Phi(x) + x phi(x),  phi(x) = exp(-x^2/2) / sqrt(2 pi)
    # tanh:   dy/dx = (1 + tanh u) / 2 + x (1 - tanh^2 u) / 2 * k (1 + 3 * 0.044715 x^2)
    def backward(grad):
        flat_grad = grad.reshape(-1)
        grad_x = np.empty(x.shape, dtype=grad.dtype)
        flat_grad_x = grad_x.reshape(-1)

        def backward_block(lo, hi):
            xb, gb = flat_x[lo:hi], flat_grad[lo:hi]
            if approximate == "none":
                pdf = np.exp(xb * xb * x.dtype.type(-0.5)) * x.dtype.type(1 / math.sqrt(2 * math.pi))
                np.multiply(gb, flat_saved[lo:hi] + xb * pdf, out=flat_grad_x[lo:hi])
            else:
                th = flat_saved[lo:hi]
                du = k * (1 + 3 * c * xb * xb)
                np.multiply(gb, 0.5 * (1 + th) + 0.5 * xb * (1 - th * th) * du, out=flat_grad_x[lo:hi])
        elementwise_parallel(flat_x.size, x.itemsize, backward_block)
        return (grad_x,)
    return _make(out, (input,), backward, "gelu")


# ========================================================================================================
# layer_norm: rows are independent, so the rows are cut into cache-sized blocks and the blocks into one
# chunk per worker thread. The weight and bias gradients (sums over every row) are summed per chunk and
# the chunks' sums added in chunk order, so they are fixed for a fixed thread count.

LAYER_NORM_BLOCK_BYTES = 256 * 1024
# LayerNorm's passes are few and short: on 2 cores its (1024, 256) rows ran slower split than whole
LAYER_NORM_MIN_ELEMENTS = 16 * PARALLEL_MIN_ELEMENTS


def layer_norm_operands(input, normalized_shape, weight, bias):
    """(input, weight, bias, parents, C) as Tensors, C the product of `normalized_shape`; or None where the
    reference must run instead (its errors, and parameters that broadcast)."""
    input = F._t(input)
    x = input.data
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if x.shape[x.ndim - len(shape):] != shape or any(
            p is not None and tuple(p.shape) != shape for p in (weight, bias)):
        return None
    weight = F._t(weight) if weight is not None else None
    bias = F._t(bias) if bias is not None else None
    parents = (input,) + ((weight,) if weight is not None else ()) + ((bias,) if bias is not None else ())
    return input, weight, bias, parents, math.prod(shape)


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """The reference's LayerNorm on rows (N, C) of the input, C the product of `normalized_shape`; its
    weight and bias gradients come back already summed to the parameters' shapes."""
    operands = layer_norm_operands(input, normalized_shape, weight, bias)
    if operands is None:
        return F.layer_norm.reference(input, normalized_shape, weight, bias, eps)
    input, weight, bias, parents, C = operands
    x = input.data
    rows = x.reshape(-1, C)                                 # (N, C)
    w = weight.data.reshape(C) if weight is not None else None
    b = bias.data.reshape(C) if bias is not None else None
    xhat = np.empty(rows.shape, dtype=x.dtype)              # (N, C) normalized rows
    rstd = np.empty((rows.shape[0], 1), dtype=x.dtype)      # (N, 1) reciprocal standard deviations
    out = np.empty(rows.shape, dtype=x.dtype)
    eps = x.dtype.type(eps)
    step = rows_per_block(rows, LAYER_NORM_BLOCK_BYTES)

    def forward_rows(lo, hi):
        for i0 in range(lo, hi, step):
            i1 = min(hi, i0 + step)
            block, xh = rows[i0:i1], xhat[i0:i1]
            mean = block.mean(axis=1, keepdims=True)        # (n, 1)
            np.subtract(block, mean, out=xh)                # centred now, normalized below
            var = (xh * xh).mean(axis=1, keepdims=True)     # (n, 1) biased variance, as PyTorch
            rstd[i0:i1] = 1.0 / np.sqrt(var + eps)
            xh *= rstd[i0:i1]
            if w is not None:
                np.multiply(xh, w, out=out[i0:i1])
            else:
                out[i0:i1] = xh
            if b is not None:
                out[i0:i1] += b
    bounds = parallel.chunk_bounds(rows.shape[0], parallel.chunk_count(
        rows.shape[0], min_rows(rows, LAYER_NORM_MIN_ELEMENTS), per_worker=1))
    parallel.run_chunks(forward_rows, bounds)

    # the reference's backward, row block by row block (see functional.layer_norm for the derivation):
    #   dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),  g = dy * w;   dw = sum(dy * xhat), db = sum(dy)
    def backward(grad):
        grad_rows = grad.reshape(-1, C)                     # (N, C)
        grad_x = np.empty(rows.shape, dtype=x.dtype) if input.requires_grad else None

        def backward_rows(lo, hi):
            grad_w = np.zeros(C, dtype=x.dtype) if w is not None and weight.requires_grad else None
            grad_b = np.zeros(C, dtype=x.dtype) if b is not None and bias.requires_grad else None
            for i0 in range(lo, hi, step):
                i1 = min(hi, i0 + step)
                g, xh = grad_rows[i0:i1], xhat[i0:i1]
                if grad_x is not None:
                    grad_xhat = g * w if w is not None else g.copy()
                    term3 = xh * (grad_xhat * xh).mean(axis=1, keepdims=True)
                    grad_xhat -= grad_xhat.mean(axis=1, keepdims=True)     # term 1 minus term 2
                    grad_xhat -= term3                                      # ... minus term 3
                    np.multiply(grad_xhat, rstd[i0:i1], out=grad_x[i0:i1])
                if grad_w is not None:
                    grad_w += (g * xh).sum(axis=0)
                if grad_b is not None:
                    grad_b += g.sum(axis=0)
            return grad_w, grad_b
        partials = parallel.run_chunks(backward_rows, bounds)
        grads = (grad_x.reshape(x.shape) if grad_x is not None else None,)
        if weight is not None:
            grads += (_sum_in_order([p[0] for p in partials]).reshape(weight.shape)
                      if weight.requires_grad else None,)
        if bias is not None:
            grads += (_sum_in_order([p[1] for p in partials]).reshape(bias.shape)
                      if bias.requires_grad else None,)
        return grads
    return _make(out.reshape(x.shape), parents, backward, "layer_norm")


def _sum_in_order(arrays):
    total = arrays[0]
    for a in arrays[1:]:
        total += a
    return total


# ========================================================================================================
# dropout: masks from 16-bit integers

def dropout_threshold(p, dtype):
    """(threshold, scale): an element is kept where its 16-bit random integer is >= threshold, so p is
    rounded to a multiple of 1/65536, and scale = 65536 / (65536 - threshold) matches that rounding (0 where
    nothing is kept)."""
    threshold = int(round(p * 65536))
    if threshold >= 65536:          # p within 2^-17 of 1: nothing is kept, as for p = 1
        return 65536, np.dtype(dtype).type(0.0)
    return threshold, np.dtype(dtype).type(65536.0 / (65536 - threshold))


def keep_mask_16bit(shape, p, dtype, generator=None):
    """(bool mask keeping each element with probability ~1-p, the scale that makes its mean exactly 1), from
    16-bit random integers: half the random bytes of float32 draws."""
    rng = generator if generator is not None else backend.global_rng()
    threshold, scale = dropout_threshold(p, dtype)
    return rng.integers(0, 65536, size=shape, dtype=np.uint16) >= threshold, scale


# Dropout's mask is one pass of random draws and its product one more: (8, 128, 256) ran slower split
DROPOUT_MIN_ELEMENTS = 16 * PARALLEL_MIN_ELEMENTS


def keep_mask_16bit_parallel(shape, p, dtype, generator=None):
    """keep_mask_16bit, drawn in chunks of the flattened mask on the worker threads. One chunk draws from
    `generator` itself; several draw from generators seeded once from it (parallel.chunk_generators), so
    the mask is fixed for a fixed thread count."""
    size = math.prod(shape)
    bounds = parallel.chunk_bounds(size, parallel.chunk_count(size, DROPOUT_MIN_ELEMENTS))
    if len(bounds) == 1:
        return keep_mask_16bit(shape, p, dtype, generator)
    keep = np.empty(size, dtype=bool)
    generators = dict(zip((lo for lo, _ in bounds), parallel.chunk_generators(generator, len(bounds))))

    def draw(lo, hi):
        keep[lo:hi] = keep_mask_16bit(hi - lo, p, dtype, generators[lo])[0]
    parallel.run_chunks(draw, bounds)
    return keep.reshape(shape), dropout_threshold(p, dtype)[1]


def _uses_numpy_generator(generator):
    return generator is None or isinstance(generator, np.random.Generator)


def dropout(input, p=0.5, training=True, generator=None):
    input = F._t(input)
    if not 0.0 <= p <= 1.0 or not training or p in (0.0, 1.0):
        return F.dropout.reference(input, p, training, generator)
    x = input.data
    keep, scale = keep_mask_16bit_parallel(x.shape, p, x.dtype, generator)

    def backward(grad):
        return (masked_scaled(grad, keep, scale),)
    return _make(masked_scaled(x, keep, scale), (input,), backward, "dropout")


def masked_scaled(x, keep, scale):
    """x * keep * scale, a new array, chunks of its elements on the worker threads."""
    out = np.empty(x.shape, dtype=x.dtype)
    flat_x, flat_keep, flat_out = x.reshape(-1), keep.reshape(-1), out.reshape(-1)

    def chunk(lo, hi):
        np.multiply(flat_x[lo:hi], flat_keep[lo:hi], out=flat_out[lo:hi])
        flat_out[lo:hi] *= scale
    parallel.parallel_for(flat_out.size, chunk, DROPOUT_MIN_ELEMENTS)
    return out


# ========================================================================================================
# scaled_dot_product_attention

class MaskCache:
    """Additive causal masks (0 where a query may look, -inf where it may not), the most recently used kept
    up to `max_bytes` in all: a training run uses one or two shapes, generation with a growing context many."""

    def __init__(self, max_bytes=16 * 2**20):
        self.max_bytes, self.bytes, self.masks = max_bytes, 0, OrderedDict()
        self.lock = threading.Lock()        # the attention's chunks ask for masks from several threads

    def get(self, num_queries, num_keys, offset, dtype):
        with self.lock:
            return self._get(num_queries, num_keys, offset, dtype)

    def _get(self, num_queries, num_keys, offset, dtype):
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
    """The scores array becomes softmax(scores) along the keys (the reference's formulas, no new array): by
    the C kernel where it is built, else with NumPy."""
    if native.softmax_rows_in_place(scores) is not None:
        return scores
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    return scores


def _dropout_attention(probs, dropout_p, dtype, generator):
    """(A, mask): A = dropout(P) and mask(dA), which turns dA into dP = dA * keep * scale in place (None
    without dropout). The kernel's hashed mask where it is built (drawn again by mask), else 16-bit draws."""
    if dropout_p == 0.0:
        return probs, None
    if native.kernels(probs.dtype) is not None and probs.flags.c_contiguous:
        threshold, keep_scale = dropout_threshold(dropout_p, dtype)
        seed = native.dropout_seed(generator)
        attn = native.dropout_hashed(probs, np.empty_like(probs), seed, threshold, keep_scale)

        def hashed_mask(grad):                  # the same hash of (seed, index): the forward's mask
            dense = np.ascontiguousarray(grad)
            native.dropout_hashed(dense, dense, seed, threshold, dense.dtype.type(keep_scale))
            if dense is not grad:
                grad[...] = dense
        return attn, hashed_mask
    keep, keep_scale = keep_mask_16bit(probs.shape, dropout_p, dtype, generator)
    attn = probs * keep
    attn *= keep_scale

    def mask(grad):
        grad *= keep
        grad *= keep_scale
    return attn, mask


def _softmax_backward_in_place(grad_attn, probs, mask):
    """dA -> dS in place: dP = mask(dA), then dS = P * (dP - sum_j(dP * P))."""
    if mask is not None:
        mask(grad_attn)
    if native.softmax_backward_rows_in_place(grad_attn, probs) is not None:
        return grad_attn
    grad_attn -= (grad_attn * probs).sum(axis=-1, keepdims=True)
    grad_attn *= probs
    return grad_attn


def _causal_softmax_in_place(scores, offset):
    """scores (..., b, S) of queries at positions offset .. offset + b - 1 become their causal softmax in
    place: the C kernel skips the keys each query may not see; without it the additive mask and NumPy."""
    if native.softmax_rows_in_place(scores, causal=True, offset=offset) is not None:
        return scores
    scores += causal_masks.get(scores.shape[-2], scores.shape[-1], offset, scores.dtype)
    return _softmax_in_place(scores)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 scale=None, generator=None):
    """The reference's attention with the softmax worked in place on the scores; long causal sequences go
    block by block. With several worker threads the batch of heads is split among them, each chunk running
    the whole attention (forward, and later backward) for its heads, OpenBLAS at one thread meanwhile."""
    query, key, value = F._t(query), F._t(key), F._t(value)
    q, k, v = query.data, key.data, value.data
    F.check_attention_inputs(q, k, v, attn_mask, is_causal)
    scale = q.dtype.type(1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if attn_mask is not None:
        attn_mask = np.asarray(attn_mask.data if isinstance(attn_mask, F.Tensor) else attn_mask)
    axis, bounds = head_chunks(q, k, v, attn_mask)
    if len(bounds) == 1:                            # all the heads on this thread (BLAS at one thread too)
        out, whole_backward = parallel.run_chunks(lambda lo, hi: attention_arrays(
            q, k, v, attn_mask, dropout_p, is_causal, scale, generator), bounds, blas_each=1)[0]

        def backward(grad):
            return parallel.run_chunks(lambda lo, hi: whole_backward(grad), bounds, blas_each=1)[0]
        return _make(out, (query, key, value), backward, "scaled_dot_product_attention")

    def part(array, lo, hi):                        # the chunk's heads: a slice along `axis`
        return array[(slice(None),) * axis + (slice(lo, hi),)]

    generators = parallel.chunk_generators(generator, len(bounds)) if dropout_p > 0 else [None] * len(bounds)
    generators = dict(zip((lo for lo, _ in bounds), generators))
    out = np.empty(q.shape[:-1] + v.shape[-1:], dtype=q.dtype)         # (..., L, Dv)
    backwards = {}

    def forward_chunk(lo, hi):
        part(out, lo, hi)[...], backwards[lo] = attention_arrays(
            part(q, lo, hi), part(k, lo, hi), part(v, lo, hi), attn_mask, dropout_p, is_causal, scale,
            generators[lo])
    parallel.run_chunks(forward_chunk, bounds, blas_each=1)

    def backward(grad):
        grad_q, grad_k, grad_v = np.empty_like(q), np.empty_like(k), np.empty_like(v)

        def backward_chunk(lo, hi):
            part(grad_q, lo, hi)[...], part(grad_k, lo, hi)[...], part(grad_v, lo, hi)[...] = \
                backwards[lo](part(grad, lo, hi))
        parallel.run_chunks(backward_chunk, bounds, blas_each=1)
        return grad_q, grad_k, grad_v
    return _make(out, (query, key, value), backward, "scaled_dot_product_attention")


# A chunk of heads must hold at least this many scores (L x S each) to be worth a thread of its own
PARALLEL_MIN_SCORES = 65536


def head_chunks(q, k, v, attn_mask):
    """(axis, [(lo, hi), ...]): the batch axis the heads are split along and the chunks' bounds on it. One
    chunk where the heads cannot be split: Q, K and V broadcast against each other, or the mask has batch
    dimensions of its own, or the work is too small."""
    batch_shape = q.shape[:-2]
    whole = (0, [(0, 1)])
    if not batch_shape or k.shape[:-2] != batch_shape or v.shape[:-2] != batch_shape or \
            (attn_mask is not None and attn_mask.ndim > 2):
        return whole
    scores_per_head = q.shape[-2] * k.shape[-2]
    heads = math.prod(batch_shape)
    if heads * scores_per_head == 0:
        return whole
    # the first batch axis long enough to give every thread a chunk (B, or H when B is small)
    axis = next((a for a, n in enumerate(batch_shape) if n >= threads.workers()), 0)
    per_index = heads // batch_shape[axis] * scores_per_head               # scores per index along axis
    parts = parallel.chunk_count(batch_shape[axis], -(-PARALLEL_MIN_SCORES // per_index))
    return axis, parallel.chunk_bounds(batch_shape[axis], parts)


def attention_arrays(q, k, v, attn_mask, dropout_p, is_causal, scale, generator):
    """(out, backward) for attention on arrays: out (..., L, Dv), backward(dO) -> (dQ, dK, dV).

    The reference's attention with the softmax in place on the scores; causal sequences from
    BLOCKED_ATTENTION_MIN_LENGTH on go block by block (causal_attention_blocked). Q is scaled once into a
    contiguous array, which every product then reads fast.
    """
    L, S = q.shape[-2], k.shape[-2]
    if is_causal and L == S and L >= BLOCKED_ATTENTION_MIN_LENGTH:
        return causal_attention_blocked(q, k, v, scale, dropout_p, generator)

    q_scaled = np.multiply(q, scale, out=np.empty(q.shape, dtype=q.dtype))
    scores = np.matmul(q_scaled, k.swapaxes(-1, -2))                    # (..., L, S), scaled
    if is_causal:
        probs = _causal_softmax_in_place(scores, 0)
    else:
        if attn_mask is not None and attn_mask.dtype == bool:
            scores = np.where(attn_mask, scores, q.dtype.type(-np.inf))
        elif attn_mask is not None:
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
    return out, backward


def causal_attention_blocked(q, k, v, scale, dropout_p, generator):
    """Causal attention block by block of queries, skipping the keys no query of the block sees: (out,
    backward) as attention_arrays.

    Queries i0..i1-1 are only scored against keys 0..i1-1. With 4 blocks that is 10 of the 16 score tiles,
    so ~37% of the attention's multiplies, exponentials and dropout draws are never done.
    """
    L = q.shape[-2]
    block = max(64, -(-L // CAUSAL_ATTENTION_BLOCKS))
    q_scaled = np.multiply(q, scale, out=np.empty(q.shape, dtype=q.dtype))
    out = np.empty(q.shape[:-1] + v.shape[-1:], dtype=q.dtype)          # (..., L, Dv)
    saved = []                                              # per block: (i0, i1, P, A, dropout mask)
    for i0 in range(0, L, block):
        i1 = min(L, i0 + block)
        scores = np.matmul(q_scaled[..., i0:i1, :], k[..., :i1, :].swapaxes(-1, -2))   # (..., b, i1)
        probs = _causal_softmax_in_place(scores, i0)
        attn, mask = _dropout_attention(probs, dropout_p, q.dtype, generator)
        np.matmul(attn, v[..., :i1, :], out=out[..., i0:i1, :])    # the block's rows of O, written in place
        saved.append((i0, i1, probs, attn, mask))

    # Per block, with P, A of shape (..., b, i1): the reference's backward restricted to the visible keys.
    # Keys and values collect their gradients from every block that sees them; the last block sees every
    # key, so going backwards it writes dK and dV whole and the others add.
    def backward(grad):
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
    return out, backward


def _product_into(target, a, b, accumulate):
    """target = a @ b, or target += a @ b."""
    if accumulate:
        target += np.matmul(a, b)
    else:
        np.matmul(a, b, out=target)


# ========================================================================================================
# add_arrays: the residual stream's sums, and gradients meeting where a tensor is used twice

ADD_MIN_ELEMENTS = 4 * PARALLEL_MIN_ELEMENTS      # one pass, three arrays: only large ones are worth a split


def add_arrays(a, b):
    """a + b for two C-contiguous arrays of one shape and dtype, chunks of the elements on the worker threads."""
    out = np.empty_like(a)
    flat_a, flat_b, flat_out = a.reshape(-1), b.reshape(-1), out.reshape(-1)

    def chunk(lo, hi):
        np.add(flat_a[lo:hi], flat_b[lo:hi], out=flat_out[lo:hi])
    parallel.parallel_for(out.size, chunk, ADD_MIN_ELEMENTS)
    return out


def _large_alike_arrays(a, b):
    return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.shape == b.shape
            and a.dtype == b.dtype and a.dtype.kind == "f" and a.flags.c_contiguous and b.flags.c_contiguous
            and a.size >= 2 * ADD_MIN_ELEMENTS and threads.workers() > 1 and not threads.on_worker_thread())


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
    return threads.workers() > 1 and not threads.on_worker_thread()


def _no_custom_generator(*args, **kwargs):
    return _uses_numpy_generator(kwargs.get("generator", args[3] if len(args) > 3 else None))


def _attention_generator_is_numpy(*args, **kwargs):
    return _uses_numpy_generator(kwargs.get("generator", args[7] if len(args) > 7 else None))


def register():
    register_fast_path("gelu", gelu, "cpu")
    register_fast_path("layer_norm", layer_norm, "cpu")
    register_fast_path("cross_entropy", cross_entropy, "cpu")
    register_fast_path("dropout", dropout, "cpu", applies=_no_custom_generator)
    register_fast_path("scaled_dot_product_attention", scaled_dot_product_attention, "cpu",
                       applies=_attention_generator_is_numpy)
    register_fast_path("adamw_step", adamw_step, "cpu", applies=_many_workers)
    register_fast_path("add_arrays", add_arrays, "cpu", applies=_large_alike_arrays)
