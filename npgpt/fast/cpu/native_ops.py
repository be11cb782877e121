"""CPU fast paths on the C kernels (``kernels.c``, built and loaded by ``native.py``).

    linear           y = x W^T + b, dx = dy W, dW = dy^T x: the BLAS's products, one block of the result's
                     rows (or columns) per thread, the bias added in the same pass; dx and dW made at once
                     (with two threads, one whole product each); db summed by the kernels. At most FEW_ROWS
                     rows (generation's new positions), y is the kernels' few_rows_product: W read once,
                     its rows split among the threads
    gelu             one pass forward, one backward that recomputes Phi(x) (or tanh u) instead of keeping it
    layer_norm       one pass over each row for the statistics, one for y; the backward recomputes xhat
                     from the saved mean and 1/std instead of keeping an (N, C) copy
    cross_entropy    forward: only logsumexp per row (the (N, V) probabilities are not kept);
                     backward: dz = exp(z - logsumexp) * row scale in one pass
    dropout          a 16-bit mask hashed from one seed and each element's index, drawn and applied in one
                     pass, drawn again by the backward (nothing kept)
    scaled_dot_product_attention
                     a head at a time: scores, softmax, dropout and A V while the head's scores are in
                     the cache; only P is kept, the backward draws the mask again. Q, K, V are read where
                     they lie (the model's are strided views into one projection). attention_cached: a few
                     new queries against a KV cache (generation), for layers.py
    adamw_step       the whole update in one pass over p, g, m, v (NumPy needs 13, 14 with weight decay),
                     all parameters in one call
    clip_grad_norm   every gradient's squares summed in one call, and scaled in one more where they are clipped
    add_arrays       a + b, the residual stream's sums and the engine's sums of gradients

Where that attention does not apply (a mask, broadcast batch dimensions), ops.scaled_dot_product_attention
runs, with the kernels' row softmax, its backward and its dropout (``native.softmax_rows_in_place``,
``native.dropout_hashed``).

Threads: each op is one call into the library, which cuts the elements (rows, heads) into chunks with fixed
bounds and runs them on its own small thread pool (kernels.c's run_parallel), the interpreter's lock
released. The bounds depend only on the size and the thread count (threads.workers(), 1 on the training
program's data-parallel threads), so sums added chunk by chunk are the same on every run. The products run the
kernels' own product (kernels.c's own_product, float32 on Intel CPUs with AVX-512) or else the BLAS at one
thread on each pool thread, inside a threads.blas_threads(1) block: all of a step's work is then
done by one set of threads, and none of BLAS's own is left spinning on a core while the next op runs.

Registered after ``ops.py``'s paths, so asked first; where the kernels could not be built (no C compiler)
they do not apply and those run. ``tests/test_fast_native.py`` holds each equal to its reference.
"""

import contextlib
import math

import numpy as np

from ... import functional as F
from ... import optim
from ...engine import _make, records_graph, register_fast_path
from . import buffers, native, ops, threads

# The smallest chunk worth a thread: a kernel does ~1 ns an element, so 32K elements are ~30 us of work, far
# more than the pool's hand-off of a few microseconds, and the small model's (12 x 64, 128) activations
# (98K elements: LayerNorm, the residual sums) still split in two
KERNEL_MIN_ELEMENTS = 32768
ADAMW_MIN_ELEMENTS = 1 << 17    # the fewest elements (of all parameters) worth a chunk of their own

at = native.address


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
    out = buffers.empty_like(x)
    k.gelu_forward_parallel(at(x), at(out), x.size, tanh_form, _threads(), KERNEL_MIN_ELEMENTS)

    def backward(grad):             # Phi(x) (or tanh u) recomputed from x: nothing kept but x itself
        grad = np.ascontiguousarray(grad, dtype=x.dtype).reshape(x.shape)
        grad_x = buffers.empty_like(x)
        k.gelu_backward_parallel(at(x), at(grad), at(grad_x), x.size, tanh_form, _threads(), KERNEL_MIN_ELEMENTS)
        return (grad_x,)
    return _make(out, (input,), backward, "gelu")


# ========================================================================================================
# linear: its three products on the kernels' threads

def linear(input, weight, bias=None):
    """y = x W^T + b, dx = dy W, dW = dy^T x (the reference's maths) as products on the kernels' pool: each
    thread a block of the result's rows (or columns) by the BLAS, at one thread meanwhile, the bias added in
    the same pass; dx and dW, the same work, in one call (_product_pair). db = the sum of dy over the rows,
    by chunks of rows added up in order."""
    input, weight = F._t(input), F._t(weight)
    bias = F._t(bias) if bias is not None else None
    x, W = input.data, weight.data
    if x.ndim == 0 or x.shape[-1] != W.shape[1]:
        return F.linear.reference(input, weight, bias)              # its error
    dtype = x.dtype
    n_in, n_out = W.shape[1], W.shape[0]
    x2d = _rows_view(x.reshape(-1, n_in))                           # (N, in)
    w2d = _rows_view(W)                                             # (out, in)
    b = np.ascontiguousarray(bias.data, dtype=dtype) if bias is not None else None
    out = buffers.empty((x2d.shape[0], n_out), dtype)                 # (N, out)
    _product(x2d, w2d, out, trans_b=True, bias=b)

    def backward(grad):
        grad2d = _rows_view(np.asarray(grad, dtype=dtype).reshape(-1, n_out))       # (N, out)
        grad_x, grad_W = _linear_grads(grad2d, x2d, w2d, input.requires_grad, weight.requires_grad)
        grad_x = grad_x.reshape(x.shape) if grad_x is not None else None
        if bias is None:
            return grad_x, grad_W
        return grad_x, grad_W, (_column_sums(grad2d) if bias.requires_grad else None)

    parents = (input, weight, bias) if bias is not None else (input, weight)
    return _make(out.reshape(*x.shape[:-1], n_out), parents, backward, "linear")


GEMM_MIN_ROWS = 64          # the thinnest block of a product worth a thread
PRODUCT_KERNELS = ("gemm_parallel", "gemm_pair_parallel", "few_rows_product_parallel")  # the weights' products
SMALL_PRODUCT = 1 << 22     # multiply-adds below which linear is the reference's one NumPy call: the pool's
                            # hand-offs and the BLAS scope would cost more
FEW_ROWS = 4                # at most this many rows (generation's one new position a sequence), a product
                            # x W^T is the kernels' few_rows_product, whatever its size: it only reads W once


def _rows_view(a):
    """a (rows, cols) as BLAS reads it: unit stride along the columns, rows at a positive stride (a copy
    where it is not)."""
    if a.strides[-1] != a.itemsize or a.strides[0] < a.itemsize * max(1, a.shape[1]) or a.strides[0] % a.itemsize:
        return np.ascontiguousarray(a)
    return a


PACKING_SPACE_ERROR = "a matrix product: no memory for a thread's packing space (kernels.c's own_product)"


def _gemm(k, dtype):
    """The product each pool thread runs on its block: the kernels' own (None: kernels.c's own_product) where
    they were built with it, else the BLAS's cblas_?gemm; (its address or None, whether it takes 64-bit
    integers)."""
    return (None, False) if k.own_product else threads.blas_gemm(dtype)


def _product(a, b, out, trans_a=False, trans_b=False, bias=None):
    """out (M, N) = op(a) op(b) [+ bias], op the transpose where asked; out contiguous."""
    M, N = out.shape
    K = a.shape[0] if trans_a else a.shape[1]
    if M == 0 or N == 0:
        return
    if K == 0:
        out[...] = 0 if bias is None else bias
        return
    k = native.kernels(out.dtype)
    if M <= FEW_ROWS and trans_b and not trans_a:
        k.few_rows_product_parallel(native.address(a), a.strides[0] // a.itemsize, native.address(b),
                                    b.strides[0] // b.itemsize, None if bias is None else at(bias), at(out), N, M,
                                    N, K, _threads(), _rows_min(K))
        return
    gemm, int64 = _gemm(k, out.dtype)
    with threads.blas_threads(1) if gemm else contextlib.nullcontext():
        failed = k.gemm_parallel(gemm, int(int64), int(trans_a), int(trans_b), M, N, K, native.address(a),
                                 a.strides[0] // a.itemsize, native.address(b), b.strides[0] // b.itemsize, at(out),
                                 N, None if bias is None else at(bias), _threads(), GEMM_MIN_ROWS)
    if failed:
        raise MemoryError(PACKING_SPACE_ERROR)


def _product_pair(first, second):
    """Two products (a, b, out, trans_a) at once, each out = op(a) b as _product makes it: with an even
    number of threads each is cut into threads / 2 blocks, so that two threads make one whole product each
    (a larger call to the BLAS than half of each, and one hand-off for both); otherwise one after the other."""
    workers = _threads()
    if workers % 2 or any(0 in out.shape or 0 in a.shape for a, _, out, _ in (first, second)):
        for a, b, out, trans_a in (first, second):
            _product(a, b, out, trans_a=trans_a)
        return
    desc = []
    for a, b, out, trans_a in (first, second):
        M, N = out.shape
        desc += [int(trans_a), 0, M, N, a.shape[0] if trans_a else a.shape[1], native.address(a),
                 a.strides[0] // a.itemsize, native.address(b), b.strides[0] // b.itemsize, at(out), N]
    desc = np.array(desc, dtype=np.int64)
    k = native.kernels(first[2].dtype)
    gemm, int64 = _gemm(k, first[2].dtype)
    with threads.blas_threads(1) if gemm else contextlib.nullcontext():
        failed = k.gemm_pair_parallel(gemm, int(int64), at(desc), workers, GEMM_MIN_ROWS)
    if failed:
        raise MemoryError(PACKING_SPACE_ERROR)


def _linear_grads(grad2d, x2d, w2d, need_x=True, need_W=True):
    """(dx, dW) of y = x W^T: dx = dy W (N, in) and dW = dy^T x (out, in), each only where asked (else None);
    both asked, they are made in one call (_product_pair), the same work each."""
    dtype = grad2d.dtype
    grad_x = buffers.empty((x2d.shape[0], w2d.shape[1]), dtype) if need_x else None
    grad_W = buffers.empty(w2d.shape, dtype, own_memory=True) if need_W else None
    if grad_x is not None and grad_W is not None:
        _product_pair((grad2d, w2d, grad_x, False), (grad2d, x2d, grad_W, True))
    elif grad_x is not None:
        _product(grad2d, w2d, grad_x)                           # (N, out) @ (out, in)
    elif grad_W is not None:
        _product(grad2d, x2d, grad_W, trans_a=True)             # (out, N) @ (N, in)
    return grad_x, grad_W


def _column_sums(a):
    """a (rows, C) summed over its rows: each chunk of rows into its own row of partial sums, the chunks'
    sums then added in chunk order (the same for a fixed thread count)."""
    a = np.ascontiguousarray(a)
    rows, C = a.shape
    k, workers, min_rows = native.kernels(a.dtype), _threads(), _rows_min(C)
    partial = np.zeros((k.parallel_chunks(rows, min_rows, workers), C), dtype=a.dtype)
    k.column_sums_parallel(at(a), at(partial), rows, C, workers, min_rows)
    return ops._sum_in_order(list(partial))


def linear_applies(input, weight, bias=None):
    """The kernels and a product (their own, or the BLAS's) are found for the dtype, all operands alike in it, and the
    products are large enough to share, or have at most FEW_ROWS rows (few_rows_product's)."""
    arrays = [t.data if isinstance(t, F.Tensor) else t for t in (input, weight, bias) if t is not None]
    if not all(isinstance(a, np.ndarray) for a in arrays) or len({a.dtype for a in arrays}) != 1:
        return False
    x, W, dtype = arrays[0], arrays[1], arrays[0].dtype
    if W.ndim != 2 or x.ndim == 0:
        return False
    rows = x.size // max(1, x.shape[-1])
    if rows * W.size < SMALL_PRODUCT and not 0 < rows <= FEW_ROWS:
        return False
    k = native.kernels(dtype)
    return k is not None and (k.own_product or threads.blas_gemm(dtype) is not None)


# ========================================================================================================
# embedding: the backward's zeros and sums on the kernels' pool

def embedding(input, weight):
    """out = W[ids] (NumPy's gather); dW = 0, then dW[ids[n]] += dy[n] by the kernels (each thread its own
    columns), into a cached array: no (V, C) of fresh zeros a step."""
    weight = F._t(weight)
    W = weight.data
    ids = F.embedding_ids(input)
    F.check_ids(ids, W.shape[0])
    out = W[ids]                                            # (..., C)
    flat_ids = np.ascontiguousarray(ids.reshape(-1), dtype=np.int64)
    V, C = W.shape

    def backward(grad):
        grad_rows = np.ascontiguousarray(grad, dtype=W.dtype).reshape(-1, C)    # (N, C)
        grad_W = buffers.empty((V, C), W.dtype, own_memory=True)
        native.kernels(W.dtype).embedding_backward_parallel(at(flat_ids), at(grad_rows), at(grad_W),
                                                            flat_ids.size, V, C, _threads(), _rows_min(C),
                                                            EMBEDDING_MIN_COLUMNS)
        return (grad_W,)
    return _make(out, (weight,), backward, "embedding")


EMBEDDING_MIN_COLUMNS = 32      # the narrowest block of columns worth a thread of its own


def embedding_applies(input, weight):
    W = weight.data if isinstance(weight, F.Tensor) else weight
    return isinstance(W, np.ndarray) and W.ndim == 2 and W.flags.c_contiguous and \
        native.kernels(W.dtype) is not None


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
    out = buffers.empty_like(rows)
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
        grad_x = buffers.empty_like(rows) if input.requires_grad else None
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
        grad_z = buffers.empty_like(z)
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
    apply = hashed_dropout(p, x.dtype, generator)

    # y = x * keep * scale, so dy/dx = keep * scale: the same hashed mask applied to the gradient
    def backward(grad):
        return (apply(np.ascontiguousarray(grad, dtype=x.dtype).reshape(x.shape)),)
    return _make(apply(x), (input,), backward, "dropout")


def hashed_dropout(p, dtype, generator=None):
    """apply(values, out=None): values * keep / (1 - p) into a new array (or `out`, which may be values), keep
    the hashed mask of one seed, drawn from the generator now; values C-contiguous. Applied to the gradient,
    the same mask again (the backward)."""
    k = native.kernels(dtype)
    threshold, scale = ops.dropout_threshold(p, dtype)
    seed = native.dropout_seed(generator)

    def apply(values, out=None):
        out = buffers.empty_like(values) if out is None else out
        k.dropout_hashed_parallel(at(values), at(out), values.size, seed, threshold, scale, _threads(),
                                  KERNEL_MIN_ELEMENTS)
        return out
    return apply


# ========================================================================================================
# AdamW

def adamw_step(updates):
    """optim.adamw_update's maths in one kernel call per dtype for all the parameters: their elements, end to
    end, cut into chunks on the kernels' threads (a small model's 52 parameters are one hand-off, not 52).
    A parameter whose arrays are not contiguous in its dtype gets the NumPy update."""
    batches = {}    # dtype -> [(p, g, m, v), ...] and their scalars
    for p, state, group in updates:
        lr, beta1, beta2, eps, decay, t = optim.adamw_settings(state, group)
        arrays = (p.data, p.grad, state["exp_avg"], state["exp_avg_sq"])
        k = native.kernels(p.data.dtype)
        if k is None or not all(a.flags.c_contiguous and a.dtype == p.data.dtype for a in arrays):
            optim.adamw_update(*arrays, (lr, beta1, beta2, eps, decay, t))
            continue
        # the kernel's scalars: decay factor 1 - lr decay, step size lr / (1 - beta1^t), 1 / sqrt(1 - beta2^t)
        scalars = (beta1, beta2, eps, 1 - lr * decay, lr / (1 - beta1 ** t), 1 / math.sqrt(1 - beta2 ** t))
        batch = batches.setdefault(p.data.dtype, ([], []))
        batch[0].append(arrays)
        batch[1].append(scalars)
    # a parameter listed twice is updated twice, one update after the other: then one chunk, in order
    workers = _threads() if len({id(p) for p, _, _ in updates}) == len(updates) else 1
    for dtype, (arrays, scalars) in batches.items():
        pointers = np.array([[at(a) for a in group] for group in arrays], dtype=np.uint64)      # (n, 4)
        starts = np.concatenate([[0], np.cumsum([group[0].size for group in arrays])]).astype(np.int64)
        scalars = np.array(scalars, dtype=dtype)                                              # (n, 6)
        native.kernels(dtype).adamw_update_many(at(pointers), at(starts), at(scalars), len(arrays), workers,
                                                ADAMW_MIN_ELEMENTS)


# ========================================================================================================
# clip_grad_norm: every gradient's squares in one kernel call, their scaling in another

def clip_grad_norm(params, max_norm):
    """optim.clip_grad_norm_'s maths in two kernel calls for all the gradients, end to end and cut into
    chunks as adamw_step's: one sums the squares (each chunk in double, the chunks added in order), and,
    where the norm is above max_norm, one scales them. (A small model's 52 gradients would otherwise be 52
    dot products, 52 scalar sums and 52 multiplies.) Applies (clip_applies) where the gradients are
    writable C-contiguous arrays of one dtype."""
    grads = [p.grad for p in params if p.grad is not None]
    dtype = grads[0].dtype
    k = native.kernels(dtype)
    pointers = np.array([at(g) for g in grads], dtype=np.uint64)
    sizes = np.array([g.size for g in grads], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    # gradients that share memory (one listed twice) are scaled twice, one after the other, as the reference
    # does: then one chunk, in order, so that no two threads scale the same element
    workers = 1 if _overlapping(pointers, sizes * dtype.itemsize) else _threads()
    partial = np.zeros(k.parallel_chunks(int(starts[-1]), ADAMW_MIN_ELEMENTS, workers), dtype=np.float64)
    k.sum_of_squares_many(at(pointers), at(starts), len(grads), at(partial), workers, ADAMW_MIN_ELEMENTS)
    with np.errstate(over="ignore"):        # a float32 sum beyond its range is inf, as the reference's dot
        total = np.sqrt(dtype.type(sum(partial.tolist())))
    if max_norm > 0:
        factor = np.minimum(1.0, max_norm / (total + 1e-6)).astype(dtype)
        if factor != 1:         # times 1 changes no gradient: the reference's multiplies are skipped
            k.scale_many(at(pointers), at(starts), len(grads), factor, workers, ADAMW_MIN_ELEMENTS)
    return total


def _overlapping(addresses, nbytes):
    """Whether any two of the byte ranges [address, address + nbytes) share a byte."""
    order = np.argsort(addresses, kind="stable")
    begins, ends = addresses[order], addresses[order] + nbytes[order].astype(np.uint64)
    return bool(np.any(begins[1:] < ends[:-1]))


def clip_applies(params, max_norm):
    """A list of parameters with some gradients, all writable C-contiguous NumPy arrays of one float dtype the
    kernels are built for."""
    if not isinstance(params, (list, tuple)):       # one Parameter: the reference takes it
        return False
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or not isinstance(grads[0], np.ndarray):
        return False
    dtype = grads[0].dtype
    return (native.kernels(dtype) is not None
            and all(isinstance(g, np.ndarray) and g.dtype == dtype and g.flags.c_contiguous and g.flags.writeable
                    for g in grads))


# ========================================================================================================
# add_arrays: the residual stream's sums, and gradients meeting where a tensor is used twice

def add_arrays(a, b):
    out = buffers.empty_like(a)
    native.kernels(a.dtype).add_parallel(at(a), at(b), at(out), a.size, _threads(), KERNEL_MIN_ELEMENTS)
    return out


def add_applies(a, b):
    """Two C-contiguous float arrays of one shape and dtype, large enough to share, the kernels built."""
    return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.shape == b.shape
            and a.dtype == b.dtype and a.dtype.kind == "f" and a.flags.c_contiguous and b.flags.c_contiguous
            and a.size >= 2 * KERNEL_MIN_ELEMENTS and native.kernels(a.dtype) is not None)


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
    attention = Attention(q4, k4, v4, scale, is_causal, dropout_p, generator)
    # O, and later dQ, dK, dV, laid out (B, rows, H, D) and seen as (B, H, rows, D): the model's next step,
    # heads side by side (B, T, H D), is then a free reshape, as is the step before its Q, K, V
    out = _heads_side_by_side(B, H, L, Dv, dtype)
    attention.forward(out, keep_probs=records_graph((query, key, value)))

    def backward(grad):
        grad_out = np.asarray(grad, dtype=dtype).reshape(out.shape)
        if grad_out.strides[-1] != dtype.itemsize or min(grad_out.strides) < 0:
            grad_out = np.ascontiguousarray(grad_out)
        grads = (_heads_side_by_side(B, H, L, D, dtype), _heads_side_by_side(B, H, S, D, dtype),
                 _heads_side_by_side(B, H, S, Dv, dtype))
        attention.backward(grad_out, grads)
        return tuple(g.reshape(a.shape) for g, a in zip(grads, (q, k, v)))
    return _make(out.reshape(q.shape[:-1] + (Dv,)), (query, key, value), backward,
                 "scaled_dot_product_attention")


class Attention:
    """One call of the attention kernels on Q, K, V (B, H, rows, D), views read where they lie (the last axis
    contiguous): forward(out) writes O into `out` (B, H, L, Dv), keeping P (B, H, L, S) for the backward
    where asked; backward(grad_out, (dQ, dK, dV)) writes the three gradients into the views given. The
    dropout seed is drawn here, once, and used by both."""

    def __init__(self, q4, k4, v4, scale, causal, dropout_p, generator=None):
        self.q4, self.k4, self.v4, self.scale, self.causal = q4, k4, v4, scale, int(bool(causal))
        dtype = q4.dtype
        self.seed, self.threshold, keep_scale = 0, -1, 1.0          # threshold -1: no dropout
        if dropout_p > 0.0:
            self.threshold, keep_scale = ops.dropout_threshold(dropout_p, dtype)
            self.seed = native.dropout_seed(generator)
        self.keep_scale = dtype.type(keep_scale)
        B, H, L, _ = q4.shape
        S = k4.shape[2]
        self.min_heads = max(1, -(-ops.PARALLEL_MIN_SCORES // max(1, L * S)))
        self.kernels = native.kernels(dtype)
        self.out = self.probs = self.pointers = None            # set by forward

    def _layout(self, arrays):
        """The kernels' `layout` for Q, K, V, O, dO, dQ, dK, dV."""
        return _attention_layout(self.q4, self.k4, self.v4, arrays)

    def forward(self, out, keep_probs):
        q4, k4, v4 = self.q4, self.k4, self.v4
        B, H, L, _ = q4.shape
        self.out = out
        self.probs = buffers.empty((B, H, L, k4.shape[2]), q4.dtype) if keep_probs else None
        self.pointers = tuple(native.address(a) for a in (q4, k4, v4, out))
        layout = self._layout((q4, k4, v4, out, out, q4, k4, v4))
        if self.kernels.attention_forward_parallel(*self.pointers, None if self.probs is None else at(self.probs),
                                                   at(layout), B * H, self.scale, self.causal, self.seed,
                                                   self.threshold, self.keep_scale, _threads(), self.min_heads):
            raise MemoryError("scaled_dot_product_attention: no memory for the kernel's scratch")

    def backward(self, grad_out, grads):
        B, H = self.q4.shape[:2]
        arrays = self.pointers + (at(self.probs), native.address(grad_out)) + tuple(native.address(g) for g in grads)
        layout = self._layout((self.q4, self.k4, self.v4, self.out, grad_out) + tuple(grads))
        if self.kernels.attention_backward_parallel(*arrays, at(layout), B * H, self.scale, self.causal, self.seed,
                                                    self.threshold, self.keep_scale, _threads(), self.min_heads):
            raise MemoryError("scaled_dot_product_attention: no memory for the kernel's scratch")


def _heads_side_by_side(B, H, rows, D, dtype):
    """A (B, H, rows, D) view of a (B, rows, H, D) array."""
    return buffers.empty((B, rows, H, D), dtype).transpose(0, 2, 1, 3)


def _attention_layout(q4, k4, v4, arrays):
    """The attention kernels' `layout`: H, L, S, D, Dv, then each of `arrays`' strides in elements along its
    first three axes (B, H and the rows)."""
    _, H, L, D = q4.shape
    strides = [s // q4.itemsize for a in arrays for s in a.strides[:3]]
    return np.array([H, L, k4.shape[2], D, v4.shape[3]] + strides, dtype=np.int64)


def attention_cached(q4, k4, v4, out4, scale):
    """out4 (B, H, L, Dv) = the attention of the L new queries q4 (B, H, L, D) over the keys and values of a
    KV cache, k4 and v4 (B, H, S, D) with the new positions last: query i sees keys 0 .. S - L + i (the kernels'
    attention_cached). All four are views whose last axis is contiguous; no probabilities are kept."""
    B, H, L, D = q4.shape
    S, Dv = k4.shape[2], v4.shape[3]
    arrays = (q4, k4, v4, out4)
    layout = _attention_layout(q4, k4, v4, arrays)
    min_heads = -(-KERNEL_MIN_ELEMENTS // max(1, S * (D + Dv)))        # a head reads S (D + Dv) of K and V
    if native.kernels(q4.dtype).attention_cached_parallel(*(a.ctypes.data for a in arrays), at(layout), B * H,
                                                          scale, _threads(), min_heads):
        raise MemoryError("scaled_dot_product_attention: no memory for the kernel's scratch")


def attention_applies(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                      generator=None):
    """The kernel takes Q, K, V of 3 or 4 dimensions with the same batch dimensions, the last axis
    contiguous and no negative strides; no attn_mask; the global generator or a NumPy one; and more than one
    query. One query (generation's new position against its cache) is left to the NumPy paths, whose two
    batched products run on the BLAS: the kernel's blocks of queries and its K^T are made for many."""
    arrays = [t.data if isinstance(t, F.Tensor) else t for t in (query, key, value)]
    if attn_mask is not None or not all(isinstance(a, np.ndarray) for a in arrays):
        return False
    q, k, v = arrays
    if q.ndim >= 2 and q.shape[-2] == 1:
        return False
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
    register_fast_path("embedding", embedding, "cpu", applies=embedding_applies)
    register_fast_path("gelu", gelu, "cpu", applies=_built)
    register_fast_path("layer_norm", layer_norm, "cpu", applies=_built)
    register_fast_path("cross_entropy", cross_entropy, "cpu", applies=_built)
    register_fast_path("dropout", dropout, "cpu", applies=_built_with_numpy_generator)
    register_fast_path("adamw_step", adamw_step, "cpu", applies=_built_for_updates)
    register_fast_path("clip_grad_norm", clip_grad_norm, "cpu", applies=clip_applies)
    register_fast_path("add_arrays", add_arrays, "cpu", applies=add_applies)
    register_fast_path("scaled_dot_product_attention", scaled_dot_product_attention, "cpu",
                       applies=attention_applies)
