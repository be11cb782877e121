"""CPU fast paths on the C kernels (``kernels.c``, built and loaded by ``native.py``).

    gelu             one pass forward, one backward that recomputes Phi(x) (or tanh u) instead of keeping it
    layer_norm       one pass over each row for the statistics, one for y; the backward recomputes xhat
                     from the saved mean and 1/std instead of keeping an (N, C) copy
    cross_entropy    forward: only logsumexp per row (the (N, V) probabilities are not kept);
                     backward: dz = exp(z - logsumexp) * row scale in one pass
    dropout          a 16-bit mask hashed from one seed and each element's index, drawn and applied in one
                     pass, drawn again by the backward (nothing kept)
    adamw_step       the whole update in one pass over p, g, m, v (NumPy needs ten)

    scaled_dot_product_attention
                     a head at a time: scores, softmax, dropout and A V while the head's scores are in
                     the cache; only P is kept, the backward draws the mask again. Q, K, V are read where
                     they lie (the model's are strided views into one projection)

Where that attention does not apply (a mask, broadcast batch dimensions), ops.scaled_dot_product_attention
runs, with the kernels' row softmax, its backward and its dropout (``native.softmax_rows_in_place``,
``native.dropout_hashed``).

Each op cuts its elements or rows into chunks with fixed bounds (``parallel.py``) and calls the kernel once
per chunk, the chunks on the worker threads at once: ctypes releases the GIL. Registered after ``ops.py``'s
paths, so asked first; where the kernels could not be built (no C compiler) they do not apply and those run.
``tests/test_fast_native.py`` holds each equal to its reference.
"""

import math

import numpy as np

from ... import functional as F
from ... import optim
from ...engine import _make, is_grad_enabled, register_fast_path
from . import native, ops, parallel, threads

# The smallest chunk worth a thread: a kernel does ~1 ns an element, a hand-off costs ~50 us
KERNEL_MIN_ELEMENTS = 65536
CHUNKS_PER_WORKER = 2           # few chunks: a kernel call has no per-block overhead to hide
ADAMW_PIECE = 1 << 20           # elements of a parameter one AdamW call updates
ADAMW_MIN_ELEMENTS = 1 << 19    # the fewest elements (of all parameters) worth a thread of their own

at = native.address


def _chunks(size, min_size):
    if size < 2 * min_size:         # too small to split: skip the thread count's lookups (a small model's
        return [(0, size)]          # ops are mostly this, and each lookup costs microseconds)
    return parallel.chunk_bounds(size, parallel.chunk_count(size, min_size, CHUNKS_PER_WORKER))


def _threads():
    """The threads a kernel call may use: npgpt's worker count, 1 on a worker thread of its own (the
    training program's data-parallel shards)."""
    return 1 if threads.on_worker_thread() else threads.workers()


def _rows_min(columns):
    return -(-KERNEL_MIN_ELEMENTS // max(1, columns))


# ========================================================================================================
# gelu

def gelu(input, approximate="none"):
    input = F._t(input)
    if approximate not in ("none", "tanh"):
        return F.gelu.reference(input, approximate)          # its error
    x = np.ascontiguousarray(input.data).reshape(input.data.shape)     # (a 0-d array stays 0-d)
    k = native.kernels(x.dtype)
    tanh_form = int(approximate == "tanh")
    out = np.empty_like(x)
    k.gelu_forward_parallel(at(x), at(out), x.size, tanh_form, _threads(), KERNEL_MIN_ELEMENTS)

    def backward(grad):             # Phi(x) (or tanh u) recomputed from x: nothing kept but x itself
        grad = np.ascontiguousarray(grad, dtype=x.dtype).reshape(x.shape)
        grad_x = np.empty_like(x)
        k.gelu_backward_parallel(at(x), at(grad), at(grad_x), x.size, tanh_form, _threads(), KERNEL_MIN_ELEMENTS)
        return (grad_x,)
    return _make(out, (input,), backward, "gelu")


# ========================================================================================================
# linear: its three products on the kernels' threads

def linear(input, weight, bias=None):
    """y = x W^T + b, dx = dy W, dW = dy^T x (the reference's maths) as products on the kernels' pool: each
    thread a block of the result's rows (or columns) by the BLAS, at one thread meanwhile, the bias added in
    the same pass. db is dy itself, which the engine sums, as the reference's."""
    input, weight = F._t(input), F._t(weight)
    bias = F._t(bias) if bias is not None else None
    x, W = input.data, weight.data
    if x.shape[-1] != W.shape[1] or x.ndim == 0:
        return F.linear.reference(input, weight, bias)              # its error
    dtype = x.dtype
    n_in, n_out = W.shape[1], W.shape[0]
    x2d = _rows_view(x.reshape(-1, n_in))                           # (N, in)
    w2d = _rows_view(W)                                             # (out, in)
    b = np.ascontiguousarray(bias.data, dtype=dtype) if bias is not None else None
    out = np.empty((x2d.shape[0], n_out), dtype=dtype)              # (N, out)
    _product(x2d, w2d, out, trans_b=True, bias=b)

    def backward(grad):
        grad2d = _rows_view(np.asarray(grad, dtype=dtype).reshape(-1, n_out))       # (N, out)
        grad_x = grad_W = None
        if input.requires_grad:
            grad_x = np.empty((x2d.shape[0], n_in), dtype=dtype)
            _product(grad2d, w2d, grad_x)                           # (N, out) @ (out, in)
            grad_x = grad_x.reshape(x.shape)
        if weight.requires_grad:
            grad_W = np.empty((n_out, n_in), dtype=dtype)
            _product(grad2d, x2d, grad_W, trans_a=True)             # (out, N) @ (N, in)
        return (grad_x, grad_W, grad) if bias is not None else (grad_x, grad_W)

    parents = (input, weight, bias) if bias is not None else (input, weight)
    return _make(out.reshape(*x.shape[:-1], n_out), parents, backward, "linear")


GEMM_MIN_ROWS = 64          # the thinnest block of a product worth a thread


def _rows_view(a):
    """a (rows, cols) as BLAS reads it: unit stride along the columns, rows at a positive stride (a copy
    where it is not)."""
    if a.strides[-1] != a.itemsize or a.strides[0] < a.itemsize * max(1, a.shape[1]) or a.strides[0] % a.itemsize:
        return np.ascontiguousarray(a)
    return a


def _product(a, b, out, trans_a=False, trans_b=False, bias=None):
    """out (M, N) = op(a) op(b) [+ bias], op the transpose where asked; out contiguous."""
    M, N = out.shape
    K = a.shape[0] if trans_a else a.shape[1]
    if M == 0 or N == 0:
        return
    if K == 0:
        out[...] = 0 if bias is None else bias
        return
    gemm, int64 = threads.blas_gemm(out.dtype)
    k = native.kernels(out.dtype)
    with threads.blas_threads(1):
        k.gemm_parallel(gemm, int(int64), int(trans_a), int(trans_b), M, N, K, native.address(a),
                        a.strides[0] // a.itemsize, native.address(b), b.strides[0] // b.itemsize, at(out), N,
                        None if bias is None else at(bias), _threads(), GEMM_MIN_ROWS)


def linear_applies(input, weight, bias=None):
    """The kernels and the BLAS's product are found for the dtype, all operands alike in it."""
    arrays = [t.data if isinstance(t, F.Tensor) else t for t in (input, weight, bias) if t is not None]
    if not all(isinstance(a, np.ndarray) for a in arrays) or len({a.dtype for a in arrays}) != 1:
        return False
    dtype = arrays[0].dtype
    return arrays[1].ndim == 2 and native.kernels(dtype) is not None and threads.blas_gemm(dtype) is not None


# ========================================================================================================
# layer_norm

def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    operands = ops.layer_norm_operands(input, normalized_shape, weight, bias)
    if operands is None:
        return F.layer_norm.reference(input, normalized_shape, weight, bias, eps)
    input, weight, bias, parents, C = operands
    x = input.data
    rows = np.ascontiguousarray(x).reshape(-1, C)           # (N, C)
    N = rows.shape[0]
    k = native.kernels(x.dtype)
    w = np.ascontiguousarray(weight.data).reshape(C) if weight is not None else None
    b = np.ascontiguousarray(bias.data).reshape(C) if bias is not None else None
    out = np.empty_like(rows)
    mean, rstd = np.empty(N, dtype=x.dtype), np.empty(N, dtype=x.dtype)     # (N,) each
    min_rows = _rows_min(C)

    def pointer(array):
        return None if array is None else at(array)

    k.layer_norm_forward_parallel(at(rows), pointer(w), pointer(b), at(out), at(mean), at(rstd), N, C, eps,
                                  _threads(), min_rows)

    # dx = rstd (g - mean(g) - xhat mean(g xhat)), g = dy w;  dw = sum dy xhat, db = sum dy, per chunk (a
    # row each of grad_w, grad_b), the chunks' sums added in chunk order (fixed for a fixed thread count)
    def backward(grad):
        grad_rows = np.ascontiguousarray(grad, dtype=x.dtype).reshape(-1, C)
        grad_x = np.empty_like(rows) if input.requires_grad else None
        workers = _threads()
        chunks = k.parallel_chunks(N, min_rows, workers)
        grad_w = np.zeros((chunks, C), dtype=x.dtype) if weight is not None and weight.requires_grad else None
        grad_b = np.zeros((chunks, C), dtype=x.dtype) if bias is not None and bias.requires_grad else None
        k.layer_norm_backward_parallel(at(rows), pointer(w), at(mean), at(rstd), at(grad_rows), pointer(grad_x),
                                       pointer(grad_w), pointer(grad_b), N, C, workers, min_rows)
        grads = (grad_x.reshape(x.shape) if grad_x is not None else None,)
        for param, partial in ((weight, grad_w), (bias, grad_b)):
            if param is not None:
                grads += (None if partial is None else ops._sum_in_order(list(partial)).reshape(param.shape),)
        return grads
    return _make(out.reshape(x.shape), parents, backward, "layer_norm")


# ========================================================================================================
# cross_entropy

def cross_entropy(input, target, ignore_index=-100, reduction="mean"):
    input = F._t(input)
    logits = input.data
    z, labels = F.cross_entropy_rows(logits, target, reduction)
    F.check_class_ids(labels, z.shape[1], ignore_index)
    z = np.ascontiguousarray(z)                             # (N, V)
    N, V = z.shape
    k = native.kernels(z.dtype)
    t = np.asarray(labels).reshape(-1)
    valid = t != ignore_index
    count = valid.sum()
    rows = np.arange(N)
    safe_t = np.where(valid, t, 0)
    logsumexp = np.empty(N, dtype=z.dtype)
    k.logsumexp_rows_parallel(at(z), at(logsumexp), N, V, _threads(), _rows_min(V))
    losses = (logsumexp - z[rows, safe_t]) * valid

    # dz = (softmax(z) - onehot(t)) * row_scale
    def backward(grad):
        row_scale = np.ascontiguousarray(F.cross_entropy_row_scale(grad, valid, count, reduction, z.dtype),
                                         dtype=z.dtype).reshape(N)
        grad_z = np.empty_like(z)
        k.softmax_scaled_rows_parallel(at(z), at(logsumexp), at(row_scale), at(grad_z), N, V, _threads(),
                                       _rows_min(V))
        grad_z[rows, safe_t] -= row_scale
        return (F.grad_logits_shape(grad_z, logits),)

    out = F.cross_entropy_output(losses, count, labels, reduction, z.dtype)
    return _make(out, (input,), backward, "cross_entropy")


# ========================================================================================================
# dropout

def dropout(input, p=0.5, training=True, generator=None):
    """Dropout with the kernel's hashed 16-bit mask: one seed drawn from the generator, the mask a function
    of it and each element's index, so the same for any thread count, and drawn again by the backward."""
    input = F._t(input)
    if not 0.0 <= p <= 1.0 or not training or p in (0.0, 1.0):
        return F.dropout.reference(input, p, training, generator)
    x = np.ascontiguousarray(input.data).reshape(input.data.shape)     # (a 0-d array stays 0-d)
    k = native.kernels(x.dtype)
    threshold, scale = ops.dropout_threshold(p, x.dtype)
    seed = native.dropout_seed(generator)

    def apply(values):
        out = np.empty_like(values)
        k.dropout_hashed_parallel(at(values), at(out), values.size, seed, threshold, scale, _threads(),
                                  KERNEL_MIN_ELEMENTS)
        return out

    # y = x * keep * scale, so dy/dx = keep * scale: the same hashed mask applied to the gradient
    def backward(grad):
        return (apply(np.ascontiguousarray(grad, dtype=x.dtype).reshape(x.shape)),)
    return _make(apply(x), (input,), backward, "dropout")


# ========================================================================================================
# AdamW

def adamw_step(updates):
    """optim.adamw_update's maths, a kernel call per piece of each parameter, the pieces in a few groups of
    about equal size on the worker threads (one hand-off a group: a small model's 50 parameters would be 50
    tiny hand-offs)."""
    pieces = []     # (kernels or None, (p, g, m, v), lo, hi, settings): None runs the NumPy update whole
    for p, state, group in updates:
        lr, beta1, beta2, eps, decay, t = optim.adamw_settings(state, group)
        arrays = (p.data, p.grad, state["exp_avg"], state["exp_avg_sq"])
        k = native.kernels(p.data.dtype)
        if k is None or not all(a.flags.c_contiguous and a.dtype == p.data.dtype for a in arrays):
            pieces.append((None, arrays, 0, p.data.size, (lr, beta1, beta2, eps, decay, t)))
            continue
        # the kernel's scalars: decay factor 1 - lr decay, step size lr / (1 - beta1^t), 1 / sqrt(1 - beta2^t)
        scalars = (beta1, beta2, eps, 1 - lr * decay, lr / (1 - beta1 ** t), 1 / math.sqrt(1 - beta2 ** t))
        for lo in range(0, p.data.size, ADAMW_PIECE):
            pieces.append((k, arrays, lo, min(p.data.size, lo + ADAMW_PIECE), scalars))

    def run(group):
        for k, (param, grad, m, v), lo, hi, settings in group:
            if k is None:
                optim.adamw_update(param, grad, m, v, settings)
            else:
                k.adamw_update(at(param, lo), at(grad, lo), at(m, lo), at(v, lo), hi - lo, *settings)

    total = sum(hi - lo for _, _, lo, hi, _ in pieces)
    parts = min(len(pieces), threads.workers() * CHUNKS_PER_WORKER, max(1, total // ADAMW_MIN_ELEMENTS))
    if len({id(p) for p, _, _ in updates}) < len(updates):
        parts = 1           # a parameter listed twice is updated twice, one update after the other
    # piece i goes to the group of equal shares of the elements that its first element falls in
    groups = [[] for _ in range(parts)]
    start = 0
    for piece in pieces:
        groups[start * parts // max(1, total)].append(piece)
        start += piece[3] - piece[2]
    threads.run_in_parallel(run, [g for g in groups if g])


# ========================================================================================================
# scaled_dot_product_attention: the whole of a head's attention in one kernel call, forward and backward

def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 scale=None, generator=None):
    """Attention by the kernels, head by head: each head's scores are made, softmaxed, dropped out and
    multiplied by V while they are in the cache, and only P (needed by the backward) is written out. The
    dropout mask is the hashed one (drawn again by the backward). The heads are split among the threads.
    Applies (attention_applies) to Q, K, V of shape (B, H, rows, D) or (B, rows, D) alike in B and H,
    read in place where their last axis is contiguous, and no attn_mask."""
    query, key, value = F._t(query), F._t(key), F._t(value)
    q, k, v = query.data, key.data, value.data
    F.check_attention_inputs(q, k, v, attn_mask, is_causal)
    dtype = q.dtype
    scale = dtype.type(1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)
    q4, k4, v4 = (a[:, None] if a.ndim == 3 else a for a in (q, k, v))        # (B, H, rows, D)
    B, H, L, D = q4.shape
    S, Dv = k4.shape[2], v4.shape[3]
    strides = [s // dtype.itemsize for a in (q4, k4, v4) for s in a.strides[:3]]
    layout = np.array([H, L, S, D, Dv] + strides, dtype=np.int64)
    kern = native.kernels(dtype)
    seed, threshold, keep_scale = 0, -1, 1.0            # threshold -1: no dropout
    if dropout_p > 0.0:
        threshold, keep_scale = ops.dropout_threshold(dropout_p, dtype)
        seed = native.dropout_seed(generator)
    keep_scale = dtype.type(keep_scale)
    causal = int(bool(is_causal))
    records = engine_records(query, key, value)
    out = np.empty((B, H, L, Dv), dtype=dtype)
    probs = np.empty((B, H, L, S), dtype=dtype) if records else None       # P, for the backward
    min_heads = max(1, -(-ops.PARALLEL_MIN_SCORES // max(1, L * S)))
    pointers = (native.address(q4), native.address(k4), native.address(v4), at(out))
    settings = (at(layout), B * H, scale, causal, seed, threshold, keep_scale)
    if kern.attention_forward_parallel(*pointers, None if probs is None else at(probs), *settings, _threads(),
                                       min_heads):
        raise MemoryError("scaled_dot_product_attention: no memory for the kernel's scratch")

    def backward(grad):
        grad_out = np.ascontiguousarray(grad, dtype=dtype).reshape(out.shape)
        grad_q, grad_k = np.empty(q4.shape, dtype=dtype), np.empty(k4.shape, dtype=dtype)
        grad_v = np.empty(v4.shape, dtype=dtype)
        if kern.attention_backward_parallel(*pointers, at(probs), at(grad_out), at(grad_q), at(grad_k), at(grad_v),
                                            *settings, _threads(), min_heads):
            raise MemoryError("scaled_dot_product_attention: no memory for the kernel's scratch")
        return grad_q.reshape(q.shape), grad_k.reshape(k.shape), grad_v.reshape(v.shape)
    return _make(out.reshape(q.shape[:-1] + (Dv,)), (query, key, value), backward, "scaled_dot_product_attention")


def engine_records(*tensors):
    """Whether the engine will keep this op's backward: grad mode on and some input needing a gradient."""
    return is_grad_enabled() and any(t.requires_grad for t in tensors)


def attention_applies(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                      generator=None):
    """The kernel takes Q, K, V of 3 or 4 dimensions with the same batch dimensions, the last axis
    contiguous and no negative strides; no attn_mask; the global generator or a NumPy one."""
    arrays = [t.data if isinstance(t, F.Tensor) else t for t in (query, key, value)]
    if attn_mask is not None or not all(isinstance(a, np.ndarray) for a in arrays):
        return False
    q, k, v = arrays
    if not (q.dtype == k.dtype == v.dtype) or native.kernels(q.dtype) is None or q.ndim not in (3, 4) or \
            not (q.ndim == k.ndim == v.ndim) or not (q.shape[:-2] == k.shape[:-2] == v.shape[:-2]):
        return False
    if min(q.shape[-2:]) == 0 or k.shape[-2] == 0 or v.shape[-1] == 0 or \
            q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]:
        return False
    if any(a.strides[-1] != a.itemsize or min(a.strides) < 0 or any(s % a.itemsize for s in a.strides)
           for a in arrays):
        return False
    return ops._uses_numpy_generator(generator)


# ========================================================================================================

def _built(*args, **kwargs):
    """The kernels are built for the dtype of the first array argument."""
    for a in list(args) + list(kwargs.values()):
        data = a.data if isinstance(a, F.Tensor) else a
        if isinstance(data, np.ndarray):
            return native.kernels(data.dtype) is not None
    return False


def _built_with_numpy_generator(*args, **kwargs):
    return _built(*args, **kwargs) and ops._no_custom_generator(*args, **kwargs)


def _built_for_updates(updates):
    return bool(updates) and native.kernels(updates[0][0].data.dtype) is not None


def register():
    register_fast_path("linear", linear, "cpu", applies=linear_applies)
    register_fast_path("gelu", gelu, "cpu", applies=_built)
    register_fast_path("layer_norm", layer_norm, "cpu", applies=_built)
    register_fast_path("cross_entropy", cross_entropy, "cpu", applies=_built)
    register_fast_path("dropout", dropout, "cpu", applies=_built_with_numpy_generator)
    register_fast_path("adamw_step", adamw_step, "cpu", applies=_built_for_updates)
    register_fast_path("scaled_dot_product_attention", scaled_dot_product_attention, "cpu",
                       applies=attention_applies)
