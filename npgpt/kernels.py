"""Fused CUDA kernels for CuPy arrays: the GPU's fast path for the hottest ops.

Each kernel computes exactly what its plain ``xp`` counterpart in ``npgpt/functional.py`` (or ``optim.py``)
computes, in one pass over memory instead of several, and with one launch instead of many. The plain version
stays the readable reference; ``functional`` asks ``kernels.available(x)`` and takes the fused path only for
CuPy arrays, and ``tests/test_gpu.py`` holds the two equal.

    GELU forward/backward          elementwise, erf from CUDA's math library
    LayerNorm forward/backward     one thread block per row: mean, variance, normalise in one pass
    causal softmax forward/backward  one block per row of scores; the mask is computed from the indices
    cross-entropy forward/backward   one block per row of logits: logsumexp, loss, and (p - onehot) * scale
    AdamW                          one elementwise kernel over a whole parameter group at once

CuPy itself is reached through ``npgpt.backend`` (which alone imports it); kernels compile on first use.
"""

import numpy as np

from . import backend

_ROW_KERNELS = r"""
template <typename T> __device__ T negative_infinity();
template <> __device__ float negative_infinity<float>() { return -__int_as_float(0x7f800000); }
template <> __device__ double negative_infinity<double>() { return -__longlong_as_double(0x7ff0000000000000LL); }

template <typename T> __device__ T block_sum(T value, T* shared) {
    // sum over the block: a tree in shared memory (blockDim.x is a power of two)
    shared[threadIdx.x] = value;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) shared[threadIdx.x] += shared[threadIdx.x + stride];
        __syncthreads();
    }
    T total = shared[0];
    __syncthreads();
    return total;
}

template <typename T> __device__ T block_max(T value, T* shared) {
    shared[threadIdx.x] = value;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) shared[threadIdx.x] = max(shared[threadIdx.x], shared[threadIdx.x + stride]);
        __syncthreads();
    }
    T total = shared[0];
    __syncthreads();
    return total;
}

// LayerNorm over rows of C values: xhat = (x - mean) * rstd, y = xhat * w + b
template <typename T>
__global__ void layer_norm_forward(const T* x, const T* w, const T* b, T* y, T* xhat, T* rstd,
                                   int C, T eps, int has_w, int has_b) {
    extern __shared__ unsigned char smem[];
    T* shared = reinterpret_cast<T*>(smem);
    long long row = blockIdx.x;
    const T* xr = x + row * C;
    T s = 0;
    for (int j = threadIdx.x; j < C; j += blockDim.x) s += xr[j];
    T mean = block_sum(s, shared) / C;
    T v = 0;
    for (int j = threadIdx.x; j < C; j += blockDim.x) { T d = xr[j] - mean; v += d * d; }
    T r = rsqrt(block_sum(v, shared) / C + eps);
    if (threadIdx.x == 0) rstd[row] = r;
    for (int j = threadIdx.x; j < C; j += blockDim.x) {
        T h = (xr[j] - mean) * r;
        xhat[row * C + j] = h;
        T out = has_w ? h * w[j] : h;
        y[row * C + j] = has_b ? out + b[j] : out;
    }
}

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),  g = dy * w
template <typename T>
__global__ void layer_norm_backward(const T* dy, const T* w, const T* xhat, const T* rstd, T* dx,
                                    int C, int has_w) {
    extern __shared__ unsigned char smem[];
    T* shared = reinterpret_cast<T*>(smem);
    long long row = blockIdx.x;
    T s1 = 0, s2 = 0;
    for (int j = threadIdx.x; j < C; j += blockDim.x) {
        T g = has_w ? dy[row * C + j] * w[j] : dy[row * C + j];
        s1 += g;
        s2 += g * xhat[row * C + j];
    }
    T mean_g = block_sum(s1, shared) / C;
    T mean_gx = block_sum(s2, shared) / C;
    T r = rstd[row];
    for (int j = threadIdx.x; j < C; j += blockDim.x) {
        T g = has_w ? dy[row * C + j] * w[j] : dy[row * C + j];
        dx[row * C + j] = r * (g - mean_g - xhat[row * C + j] * mean_gx);
    }
}

// Softmax over each row of S scores; with causal != 0, row r is query i = r % L, which sees keys j <= i + offset
template <typename T>
__global__ void softmax_forward(const T* scores, T* probs, int S, int L, int offset, int causal) {
    extern __shared__ unsigned char smem[];
    T* shared = reinterpret_cast<T*>(smem);
    long long row = blockIdx.x;
    int last = causal ? min(S - 1, (int)(row % L) + offset) : S - 1;   // last visible key
    const T* in = scores + row * S;
    T m = negative_infinity<T>();
    for (int j = threadIdx.x; j <= last; j += blockDim.x) m = max(m, in[j]);
    m = block_max(m, shared);
    T s = 0;
    for (int j = threadIdx.x; j <= last; j += blockDim.x) s += exp(in[j] - m);
    s = block_sum(s, shared);
    for (int j = threadIdx.x; j < S; j += blockDim.x)
        probs[row * S + j] = j <= last ? exp(in[j] - m) / s : T(0);
}

// dS = P * (dP - sum_j dP * P), row by row
template <typename T>
__global__ void softmax_backward(const T* dprobs, const T* probs, T* dscores, int S) {
    extern __shared__ unsigned char smem[];
    T* shared = reinterpret_cast<T*>(smem);
    long long row = blockIdx.x;
    T s = 0;
    for (int j = threadIdx.x; j < S; j += blockDim.x) s += dprobs[row * S + j] * probs[row * S + j];
    s = block_sum(s, shared);
    for (int j = threadIdx.x; j < S; j += blockDim.x)
        dscores[row * S + j] = probs[row * S + j] * (dprobs[row * S + j] - s);
}

// Cross-entropy of each row of C logits: logsumexp and loss = logsumexp - z[target] (0 where ignored)
template <typename T>
__global__ void cross_entropy_forward(const T* z, const long long* target, T* logsumexp, T* loss, int C,
                                      long long ignore_index) {
    extern __shared__ unsigned char smem[];
    T* shared = reinterpret_cast<T*>(smem);
    long long row = blockIdx.x;
    const T* zr = z + row * C;
    T m = negative_infinity<T>();
    for (int j = threadIdx.x; j < C; j += blockDim.x) m = max(m, zr[j]);
    m = block_max(m, shared);
    T s = 0;
    for (int j = threadIdx.x; j < C; j += blockDim.x) s += exp(zr[j] - m);
    s = block_sum(s, shared);
    if (threadIdx.x == 0) {
        T lse = log(s) + m;
        logsumexp[row] = lse;
        long long t = target[row];
        loss[row] = t == ignore_index ? T(0) : lse - zr[t];
    }
}

// dz = (softmax(z) - onehot(target)) * row_scale, recomputing softmax from z and the saved logsumexp
template <typename T>
__global__ void cross_entropy_backward(const T* z, const long long* target, const T* logsumexp,
                                       const T* row_scale, T* dz, int C) {
    long long row = blockIdx.x;
    long long t = target[row];
    T lse = logsumexp[row], scale = row_scale[row];
    for (int j = threadIdx.x; j < C; j += blockDim.x) {
        T p = exp(z[row * C + j] - lse);
        dz[row * C + j] = (p - (j == t ? T(1) : T(0))) * scale;
    }
}
"""

_NAMES = ["layer_norm_forward", "layer_norm_backward", "softmax_forward", "softmax_backward",
          "cross_entropy_forward", "cross_entropy_backward"]
_CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
_THREADS = 256
_cache = {}


def available(array):
    """True when `array` is a CuPy array of float32/float64: the fused kernels apply."""
    return backend.is_gpu_array(array) and array.dtype in _CTYPES


def _cupy():
    return backend.module_for("gpu")


def _row_kernel(name, dtype):
    key = ("rows", np.dtype(dtype))
    if key not in _cache:
        cp = _cupy()
        ctype = _CTYPES[np.dtype(dtype)]
        module = cp.RawModule(code=_ROW_KERNELS, options=("-std=c++14",),
                              name_expressions=[f"{n}<{ctype}>" for n in _NAMES])
        _cache[key] = {n: module.get_function(f"{n}<{ctype}>") for n in _NAMES}
    return _cache[key][name]


def _launch(name, dtype, rows, args):
    kernel = _row_kernel(name, dtype)
    kernel((int(rows),), (_THREADS,), args, shared_mem=_THREADS * np.dtype(dtype).itemsize)


def _scalar(value, dtype):
    return np.dtype(dtype).type(value)


# ---- GELU ----------------------------------------------------------------------------------------------

def _elementwise(name, in_params, out_params, body):
    if name not in _cache:
        _cache[name] = _cupy().ElementwiseKernel(in_params, out_params, body, f"npgpt_{name}")
    return _cache[name]


def gelu_forward(x):
    """(y, cdf) with cdf = Phi(x) = (1 + erf(x / sqrt 2)) / 2 and y = x * cdf."""
    kernel = _elementwise("gelu_forward", "T x", "T y, T cdf",
                          "cdf = (T)0.5 * ((T)1 + erf(x * (T)0.70710678118654752440)); y = x * cdf;")
    return kernel(x)


def gelu_backward(grad, x, cdf):
    """dx = dy * (Phi(x) + x phi(x))."""
    kernel = _elementwise("gelu_backward", "T g, T x, T cdf", "T dx",
                          "dx = g * (cdf + x * exp((T)-0.5 * x * x) * (T)0.39894228040143267794);")
    return kernel(grad, x, cdf)


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
    _launch("layer_norm_forward", x.dtype, rows,
            (x, cp.ascontiguousarray(w), cp.ascontiguousarray(b), y, xhat, rstd, np.int32(C),
             _scalar(eps, x.dtype), np.int32(weight is not None), np.int32(bias is not None)))
    return y, xhat, rstd


def layer_norm_backward(grad, weight, xhat, rstd):
    cp = _cupy()
    C = xhat.shape[-1]
    grad = cp.ascontiguousarray(grad)
    dx = cp.empty_like(xhat)
    w = weight if weight is not None else grad
    _launch("layer_norm_backward", xhat.dtype, xhat.size // C,
            (grad, cp.ascontiguousarray(w), xhat, rstd, dx, np.int32(C), np.int32(weight is not None)))
    return dx


# ---- softmax over attention scores ---------------------------------------------------------------------

def softmax_forward(scores, causal=False, offset=0):
    """Softmax along the last axis of (..., L, S) scores, in place; causal rows see keys j <= i + offset."""
    L, S = scores.shape[-2], scores.shape[-1]
    _launch("softmax_forward", scores.dtype, scores.size // S,
            (scores, scores, np.int32(S), np.int32(L), np.int32(offset), np.int32(causal)))
    return scores


def softmax_backward(grad_probs, probs):
    """dS = P * (dP - sum(dP * P)) along the last axis; written over grad_probs."""
    cp = _cupy()
    S = probs.shape[-1]
    grad_probs = cp.ascontiguousarray(grad_probs)
    _launch("softmax_backward", probs.dtype, probs.size // S, (grad_probs, probs, grad_probs, np.int32(S)))
    return grad_probs


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

def adamw_update(param, grad, m, v, settings):
    """One fused AdamW step over whole arrays, in place (see optim.AdamW for the maths).

    settings: a device array [lr, beta1, beta2, eps, weight_decay, lr / (1 - beta1^t), 1 / sqrt(1 - beta2^t)],
    read by the kernel, so a recorded CUDA graph replays the update with the current step's numbers.
    """
    kernel = _elementwise(
        "adamw", "T g, raw float64 s", "T p, T m, T v",
        "p = p * (T)(1.0 - s[0] * s[4]);"
        "m = (T)s[1] * m + (T)(1.0 - s[1]) * g;"
        "v = (T)s[2] * v + (T)(1.0 - s[2]) * g * g;"
        "p = p - (T)s[5] * m / (sqrt(v) * (T)s[6] + (T)s[3]);")
    kernel(grad, settings, param, m, v)
