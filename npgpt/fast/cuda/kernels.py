"""Fused CUDA kernels for CuPy arrays: the GPU's fast path for the hottest ops.

Each kernel computes exactly what its reference in ``npgpt/functional.py`` (or ``optim.py``) computes, in one
pass over memory instead of several, and with one launch instead of many. The CUDA C is in ``kernels/*.cu``
(package data), compiled on first use by NVRTC; ``ops.py`` registers the ops built on these wrappers with the
dispatcher, and ``tests/test_gpu.py`` holds them equal to the references.

    GELU forward/backward          elementwise, erf from CUDA's math library
    dropout                        elementwise; the mask is a hash of (seed, index), regenerated in backward
    add                            the residual stream's sums, and gradients meeting at its forks
    bias rows                      a linear layer's bias written row after row, for the GEMM to add onto
    LayerNorm forward/backward     one warp per row: mean, variance, normalise in one pass; the weight and
                                   bias gradients as column sums in one more
    causal softmax + dropout       one warp per row of scores; the causal mask comes from the indices
    cross-entropy forward/backward   one block per row of logits: logsumexp, loss, and (p - onehot) * scale
    AdamW                          one elementwise kernel per parameter; the step's numbers from device memory
    sum of squares                 one reduction per gradient, for the global gradient norm

Everything here can be recorded into a CUDA graph (graph.py): what changes between replays is read
from device memory (AdamW's schedule, the dropout replay counter), never baked into a kernel argument.

CuPy itself is reached through ``npgpt.backend`` (which alone imports it); kernels compile on first use.

Shapes: rows are the last axis: (N, C) for LayerNorm and cross-entropy, (B, H, T, S) scores.

Next to read: ``ops.py``, where these wrappers become the ops' fast paths.
"""

import os

import numpy as np

from ... import backend


# Launch shapes, defined once here and handed to the CUDA sources as -D flags
UNROLL = 4                  # values each thread of an elementwise kernel loads before computing any
THREADS_PER_BLOCK = 256
WARPS_PER_BLOCK = THREADS_PER_BLOCK // 32
_THREADS, _UNROLL = THREADS_PER_BLOCK, UNROLL
SOURCE_DIR = os.path.join(os.path.dirname(__file__), "kernels")
SOURCES = ("rows.cu", "elementwise.cu")

_NAMES = ["layer_norm_forward", "layer_norm_backward", "softmax_dropout_forward", "softmax_dropout_backward",
          "cross_entropy_forward", "cross_entropy_backward", "gelu_forward", "gelu_backward", "dropout",
          "add_arrays", "adamw", "layer_norm_param_grads", "fill_rows"]
_CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
_cache = {}


def compile_options():
    """NVRTC's options: C++14, the sources' folder for their #include, and the launch constants."""
    return ("-std=c++14", f"-I{SOURCE_DIR}", f"-DUNROLL={UNROLL}", f"-DTHREADS_PER_BLOCK={THREADS_PER_BLOCK}",
            f"-DWARPS_PER_BLOCK={WARPS_PER_BLOCK}")


def source(*names):
    """The CUDA C of these files of kernels/, one after another."""
    texts = []
    for name in names:
        with open(os.path.join(SOURCE_DIR, name), encoding="utf-8") as f:
            texts.append(f.read())
    return "\n".join(texts)


def available(array):
    """True when `array` is a CuPy array of float32/float64: the fused kernels apply."""
    return backend.is_gpu_array(array) and array.dtype in _CTYPES


def _cupy():
    return backend.module_for("gpu")


def _kernel(name, dtype):
    key = ("kernels", np.dtype(dtype))
    if key not in _cache:
        cp = _cupy()
        ctype = _CTYPES[np.dtype(dtype)]
        module = cp.RawModule(code=source(*SOURCES), options=compile_options(),
                              name_expressions=[f"{n}<{ctype}>" for n in _NAMES])
        _cache[key] = {n: module.get_function(f"{n}<{ctype}>") for n in _NAMES}
    return _cache[key][name]


def _launch(name, dtype, rows, args):
    """One thread block per row (rows of tens of thousands of values: the logits)."""
    kernel = _kernel(name, dtype)
    kernel((int(rows),), (_THREADS,), args, shared_mem=_THREADS * np.dtype(dtype).itemsize)


def _launch_warps(name, dtype, rows, args):
    """One warp per row (rows of up to a few thousand values); the kernel takes the row count, and the warps
    of the last block past it return."""
    kernel = _kernel(name, dtype)
    warps = _THREADS // 32
    kernel(((int(rows) + warps - 1) // warps,), (_THREADS,), args)


def _launch_elementwise(name, x, args):
    """Enough blocks for x.size values, _UNROLL per thread; returns a new array of x's shape (the output)."""
    cp = _cupy()
    out = cp.empty(x.shape, dtype=x.dtype)
    n = x.size
    per_block = _THREADS * _UNROLL
    if n:
        _kernel(name, x.dtype)(((n + per_block - 1) // per_block,), (_THREADS,), args(out, np.int64(n)))
    return out


def _scalar(value, dtype):
    return np.dtype(dtype).type(value)


# ---- elementwise: GELU, a linear layer's bias rows, additions ------------------------------------------

def gelu_forward(x):
    """y = x Phi(x)."""
    x = _cupy().ascontiguousarray(x)
    return _launch_elementwise("gelu_forward", x, lambda y, n: (x, y, n))


def gelu_backward(grad, x):
    """dx = dy * (Phi(x) + x phi(x)), Phi recomputed: an erf costs less than storing Phi and reading it back."""
    cp = _cupy()
    x = cp.ascontiguousarray(x)
    grad = cp.ascontiguousarray(grad, dtype=x.dtype)   # a kernel reads one dtype: operands are cast to x's
    return _launch_elementwise("gelu_backward", x, lambda dx, n: (grad, x, dx, n))


def fill_rows(bias, rows):
    """A new (rows, C) array whose every row is bias (C,)."""
    cp = _cupy()
    C = bias.shape[0]
    out = cp.empty((rows, C), dtype=bias.dtype)
    if out.size == 0:
        return out
    rows_per_band = max(64, -(-rows // 65535))                   # grid.y is at most 65535 bands
    bands = max(1, -(-rows // rows_per_band))
    _kernel("fill_rows", bias.dtype)(((C + _THREADS - 1) // _THREADS, bands), (_THREADS,),
                                     (cp.ascontiguousarray(bias), out, np.int64(rows), np.int32(C),
                                      np.int32(rows_per_band)))
    return out


def add(a, b):
    """a + b for two contiguous arrays of one shape and dtype (the caller checks: see ops.add_arrays)."""
    return _launch_elementwise("add_arrays", a, lambda c, n: (a, b, c, n))


# ---- LayerNorm -------------------------------------------------------------------------------------------

def layer_norm_forward(x, weight, bias, eps):
    """y, xhat (both x's shape) and rstd (rows,) for LayerNorm over the last dimension."""
    cp = _cupy()
    C = x.shape[-1]
    x = cp.ascontiguousarray(x)
    rows = x.size // C
    y, xhat = cp.empty_like(x), cp.empty_like(x)
    rstd = cp.empty((rows,), dtype=x.dtype)
    w = weight if weight is not None else x      # any pointer: unused when has_w is 0
    b = bias if bias is not None else x
    _launch_warps("layer_norm_forward", x.dtype, rows,
                  (x, cp.ascontiguousarray(w, dtype=x.dtype), cp.ascontiguousarray(b, dtype=x.dtype), y, xhat,
                   rstd, np.int64(rows),
                   np.int32(C), _scalar(eps, x.dtype), np.int32(weight is not None), np.int32(bias is not None)))
    return y, xhat, rstd


def layer_norm_backward(grad, weight, xhat, rstd):
    cp = _cupy()
    C = xhat.shape[-1]
    grad = cp.ascontiguousarray(grad, dtype=xhat.dtype)
    dx = cp.empty_like(xhat)
    w = weight if weight is not None else grad
    rows = xhat.size // C
    _launch_warps("layer_norm_backward", xhat.dtype, rows,
                  (grad, cp.ascontiguousarray(w, dtype=xhat.dtype), xhat, rstd, dx, np.int64(rows), np.int32(C),
                   np.int32(weight is not None)))
    return dx


_ROWS_PER_BAND = 256


def layer_norm_param_grads(grad, xhat):
    """(dw, db), each (C,): the column sums of dy * xhat and of dy over every row, in one pass."""
    cp = _cupy()
    C = xhat.shape[-1]
    rows = xhat.size // C
    grad = cp.ascontiguousarray(grad, dtype=xhat.dtype)
    bands = max(1, (rows + _ROWS_PER_BAND - 1) // _ROWS_PER_BAND)
    partial_w = cp.empty((bands, C), dtype=xhat.dtype)
    partial_b = cp.empty((bands, C), dtype=xhat.dtype)
    _kernel("layer_norm_param_grads", xhat.dtype)(((C + 31) // 32, bands), (_THREADS,),
                                                  (grad, xhat, partial_w, partial_b, np.int64(rows), np.int32(C),
                                                   np.int32(_ROWS_PER_BAND)))
    return partial_w.sum(axis=0), partial_b.sum(axis=0)


# ---- dropout and the softmax over attention scores --------------------------------------------------------

def dropout_threshold(p):
    """(uint32 threshold, keep scale): an element is kept when its 32 random bits are >= the threshold, so p
    is rounded to a multiple of 2^-32, and the scale matches that rounding exactly."""
    threshold = min(int(round(p * 2.0 ** 32)), 2 ** 32 - 1)
    return threshold, 2.0 ** 32 / (2.0 ** 32 - threshold)


def dropout_forward(x, p, seed):
    """x * keep / (1 - p) with keep drawn from (seed, element index): nothing stored for backward."""
    threshold, scale = dropout_threshold(p)
    x = _cupy().ascontiguousarray(x)
    return _launch_elementwise("dropout", x, lambda y, n: (x, y, n, np.uint64(seed), replay_counter(),
                                                             np.uint32(threshold), x.dtype.type(scale)))


def dropout_backward(grad, p, seed):
    """dx = dy * keep / (1 - p), the same keep regenerated from the seed (i is the element's index)."""
    return dropout_forward(grad, p, seed)


def softmax_dropout_forward(scores, causal, p, seed, offset=0):
    """(P, A): P = softmax of (..., L, S) scores along the last axis (causal rows see keys j <= i + offset),
    and A = dropout(P) (A is P itself when p == 0). One pass over the scores."""
    cp = _cupy()
    L, S = scores.shape[-2], scores.shape[-1]
    probs = cp.empty_like(scores)
    attn = cp.empty_like(scores) if p > 0 else probs
    threshold, scale = dropout_threshold(p)
    rows = scores.size // S
    _launch_warps("softmax_dropout_forward", scores.dtype, rows,
                  (cp.ascontiguousarray(scores), probs, attn, np.int64(rows), np.int32(S), np.int32(L),
                   np.int32(offset), np.int32(causal), np.uint64(seed), replay_counter(), np.uint32(threshold),
                   _scalar(scale, scores.dtype), np.int32(p > 0)))
    return probs, attn


def softmax_dropout_backward(grad_attn, probs, row_dot, p, seed, causal=False, offset=0, row_dot_first=0):
    """dS from dA: undo the dropout (same mask, from the seed), then the softmax backward, given row_dot
    = dO . O for each query (see the kernel): (..., L), or (..., n) for all n queries when these L are
    queries row_dot_first.. of them. With the forward pass's causal and offset, the keys a row never saw
    (P = 0, so dS = 0) are not read."""
    cp = _cupy()
    L, S = probs.shape[-2], probs.shape[-1]
    grad_attn = cp.ascontiguousarray(grad_attn, dtype=probs.dtype)
    row_dot = row_dot.astype(probs.dtype, copy=False)
    grad_scores = cp.empty_like(probs)
    threshold, scale = dropout_threshold(p)
    rows = probs.size // S
    _launch_warps("softmax_dropout_backward", probs.dtype, rows,
                  (grad_attn, probs, cp.ascontiguousarray(row_dot), np.int32(row_dot.shape[-1]),
                   np.int32(row_dot_first), grad_scores, np.int64(rows), np.int32(S), np.int32(L), np.int32(offset),
                   np.int32(causal), np.uint64(seed), replay_counter(), np.uint32(threshold),
                   _scalar(scale, probs.dtype), np.int32(p > 0)))
    return grad_scores


# ---- cross-entropy --------------------------------------------------------------------------------------

def cross_entropy_forward(z, target, ignore_index):
    """Per-row (logsumexp, loss) of logits z (N, C) against int64 targets (N,)."""
    cp = _cupy()
    N, C = z.shape
    z = cp.ascontiguousarray(z)
    logsumexp, loss = cp.empty((N,), dtype=z.dtype), cp.empty((N,), dtype=z.dtype)
    _launch("cross_entropy_forward", z.dtype, N,
            (z, target.astype(cp.int64), logsumexp, loss, np.int32(C), np.int64(ignore_index)))
    return logsumexp, loss


def cross_entropy_backward(z, target, logsumexp, row_scale):
    """dz (N, C) = (softmax(z) - onehot(target)) * row_scale[:, None] (row_scale 0 where ignored)."""
    cp = _cupy()
    N, C = z.shape
    z = cp.ascontiguousarray(z)
    dz = cp.empty_like(z)
    _launch("cross_entropy_backward", z.dtype, N,
            (z, target.astype(cp.int64), logsumexp, cp.ascontiguousarray(row_scale.astype(z.dtype)), dz,
             np.int32(C)))
    return dz


# ---- AdamW ------------------------------------------------------------------------------------------------

def adamw_update(param, grad, m, v, betas, eps, decay, schedule):
    """One fused AdamW step over whole arrays, in place (see optim.AdamW for the maths).

    The numbers that change every step come from `schedule`, a device array (lr, lr / (1 - beta1^t),
    1 / sqrt(1 - beta2^t)), not from kernel arguments: a recorded CUDA graph keeps its arguments, and this
    way its replays still follow the learning-rate schedule and the step count.
    """
    if not (param.flags.c_contiguous and m.flags.c_contiguous and v.flags.c_contiguous):
        raise ValueError("AdamW on the GPU updates parameters in place and needs them contiguous; "
                         "make the parameter's array contiguous (cupy.ascontiguousarray) before the optimizer")
    grad = _cupy().ascontiguousarray(grad, dtype=param.dtype)
    beta1, beta2 = betas
    n = param.size
    per_block = _THREADS * _UNROLL
    if n:
        _kernel("adamw", param.dtype)(((n + per_block - 1) // per_block,), (_THREADS,),
                                      (param, grad, m, v, np.int64(n), schedule, np.float64(beta1),
                                       np.float64(beta2), np.float64(eps), np.float64(decay)))


def sum_of_squares(x):
    """sum(x * x) as a 0-d array, in one reduction (the gradient norm; no cuBLAS, so a graph can record it)."""
    if "sum_of_squares" not in _cache:
        _cache["sum_of_squares"] = _cupy().ReductionKernel("T x", "T y", "x * x", "a + b", "y = a", "0",
                                                           "npgpt_sum_of_squares")
    return _cache["sum_of_squares"](x)


# ---- the replay counter ---------------------------------------------------------------------------------

def replay_counter():
    """This device's (1,) uint64 counter that the dropout kernels add to their seeds (see replay_seed)."""
    cp = _cupy()
    key = ("replay", cp.cuda.runtime.getDevice())
    if key not in _cache:
        _cache[key] = cp.zeros(1, dtype=cp.uint64)
    return _cache[key]


def advance_replay_counter():
    """counter += 1, on the device: the last kernel of a recorded training step."""
    counter = replay_counter()
    counter += np.uint64(1)
