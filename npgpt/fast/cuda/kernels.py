"""Fused CUDA kernels for CuPy arrays: the GPU's fast path for the hottest ops.

Each kernel computes exactly what its plain ``xp`` counterpart in ``npgpt/functional.py`` (or ``optim.py``)
computes, in one pass over memory instead of several, and with one launch instead of many. The plain version
stays the readable reference; ``functional`` asks ``kernels.available(x)`` and takes the fused path only for
CuPy arrays, and ``tests/test_gpu.py`` holds the two equal.

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

Everything here can be recorded into a CUDA graph (npgpt/graph.py): what changes between replays is read
from device memory (AdamW's schedule, the dropout replay counter), never baked into a kernel argument.

CuPy itself is reached through ``npgpt.backend`` (which alone imports it); kernels compile on first use.

Shapes: rows are the last axis: (N, C) for LayerNorm and cross-entropy, (B, H, T, S) scores.

Next to read: ``npgpt/functional.py``, where each kernel's plain counterpart lives.
"""

import numpy as np

from ... import backend

_HASH = r"""
// splitmix64 of (seed, element index): counter-based random bits, so a backward pass regenerates the
// forward pass's dropout mask exactly and no mask is ever stored
__device__ unsigned int dropout_bits(unsigned long long seed, unsigned long long index) {
    unsigned long long z = seed + (index + 1ULL) * 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    z = z ^ (z >> 31);
    return (unsigned int)(z >> 32);
}

// The seed a kernel hashes with: its own (drawn on the host when the op ran) moved along by the device's
// replay counter, which stays 0 in eager training and counts the replays of a recorded CUDA graph, whose
// host seeds are frozen into it (npgpt/graph.py). So each replay draws fresh dropout masks.
__device__ unsigned long long replay_seed(unsigned long long seed, const unsigned long long* replay) {
    return seed + replay[0] * 0xD1B54A32D192ED03ULL;
}
"""

_ROW_KERNELS = _HASH + r"""
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

// Rows of up to a few thousand values (LayerNorm's C, attention's keys) get one warp each: 32 lanes stride
// along the row, and the row's sum or max is combined with warp shuffles, without shared memory or
// __syncthreads. (A whole block per row spends more time synchronising than reading such a row.)
template <typename T> __device__ T warp_sum(T value) {
    for (int lanes = 16; lanes > 0; lanes >>= 1) value += __shfl_xor_sync(0xffffffffu, value, lanes);
    return value;                                   // every lane ends with the sum of all 32
}

template <typename T> __device__ T warp_max(T value) {
    for (int lanes = 16; lanes > 0; lanes >>= 1) value = max(value, __shfl_xor_sync(0xffffffffu, value, lanes));
    return value;
}

// The row this lane's warp owns, or -1 past the last row (a whole warp returns together)
__device__ long long warp_row(long long rows) {
    long long row = ((long long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    return row < rows ? row : -1;
}

// LayerNorm over rows of C values: xhat = (x - mean) * rstd, y = xhat * w + b
template <typename T>
__global__ void layer_norm_forward(const T* x, const T* w, const T* b, T* y, T* xhat, T* rstd,
                                   long long rows, int C, T eps, int has_w, int has_b) {
    long long row = warp_row(rows);
    if (row < 0) return;
    int lane = threadIdx.x % 32;
    const T* xr = x + row * C;
    T s = 0;
    for (int j = lane; j < C; j += 32) s += xr[j];
    T mean = warp_sum(s) / C;
    T v = 0;
    for (int j = lane; j < C; j += 32) { T d = xr[j] - mean; v += d * d; }
    T r = rsqrt(warp_sum(v) / C + eps);
    if (lane == 0) rstd[row] = r;
    for (int j = lane; j < C; j += 32) {
        T h = (xr[j] - mean) * r;
        xhat[row * C + j] = h;
        T out = has_w ? h * w[j] : h;
        y[row * C + j] = has_b ? out + b[j] : out;
    }
}

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),  g = dy * w
template <typename T>
__global__ void layer_norm_backward(const T* dy, const T* w, const T* xhat, const T* rstd, T* dx,
                                    long long rows, int C, int has_w) {
    long long row = warp_row(rows);
    if (row < 0) return;
    int lane = threadIdx.x % 32;
    T s1 = 0, s2 = 0;
    for (int j = lane; j < C; j += 32) {
        T g = has_w ? dy[row * C + j] * w[j] : dy[row * C + j];
        s1 += g;
        s2 += g * xhat[row * C + j];
    }
    T mean_g = warp_sum(s1) / C;
    T mean_gx = warp_sum(s2) / C;
    T r = rstd[row];
    for (int j = lane; j < C; j += 32) {
        T g = has_w ? dy[row * C + j] * w[j] : dy[row * C + j];
        dx[row * C + j] = r * (g - mean_g - xhat[row * C + j] * mean_gx);
    }
}

// dw_j = sum over rows of dy * xhat, db_j = sum over rows of dy: column sums of (rows, C), in one read of dy
// and xhat. A block takes 32 columns of a band of rows: lane j of each warp reads column j (32 neighbouring
// values per row) down every 8th row of the band; the warps' sums meet in shared memory, and each band
// writes one row of partial sums (the caller adds the bands).
template <typename T>
__global__ void layer_norm_param_grads(const T* dy, const T* xhat, T* partial_w, T* partial_b, long long rows,
                                       int C, int rows_per_band) {
    __shared__ T shared_w[8][32], shared_b[8][32];          // [warp][lane]: blockDim.x is 256
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    int j = blockIdx.x * 32 + lane;
    long long first = (long long)blockIdx.y * rows_per_band;
    long long last = min(rows, first + rows_per_band);
    T sw = 0, sb = 0;
    if (j < C) {
        for (long long r = first + warp; r < last; r += 8) {
            T g = dy[r * C + j];
            sw += g * xhat[r * C + j];
            sb += g;
        }
    }
    shared_w[warp][lane] = sw;
    shared_b[warp][lane] = sb;
    __syncthreads();
    if (warp == 0 && j < C) {
        for (int k = 1; k < 8; ++k) { sw += shared_w[k][lane]; sb += shared_b[k][lane]; }
        partial_w[blockIdx.y * C + j] = sw;
        partial_b[blockIdx.y * C + j] = sb;
    }
}

// The last key row r of (..., L, S) scores sees: causal row r is query i = r % L, which sees j <= i + offset
__device__ int last_visible_key(long long row, int S, int L, int offset, int causal) {
    return causal ? min(S - 1, (int)(row % L) + offset) : S - 1;
}

// Softmax over each row of S scores, then dropout: P = softmax(S), A = P * keep / (1 - p).
// Keys past the last visible one get P = A = 0 and are never read.
template <typename T>
__global__ void softmax_dropout_forward(const T* scores, T* probs, T* attn, long long rows, int S, int L,
                                        int offset, int causal, unsigned long long seed,
                                        const unsigned long long* replay, unsigned int threshold, T keep_scale,
                                        int dropout) {
    long long row = warp_row(rows);
    if (row < 0) return;
    int lane = threadIdx.x % 32;
    seed = replay_seed(seed, replay);
    int last = last_visible_key(row, S, L, offset, causal);
    const T* in = scores + row * S;
    T m = negative_infinity<T>();
    #pragma unroll 4
    for (int j = lane; j <= last; j += 32) m = max(m, in[j]);      // (unrolled: several loads in flight)
    m = warp_max(m);
    T s = 0;
    #pragma unroll 4
    for (int j = lane; j <= last; j += 32) s += exp(in[j] - m);
    T inv = T(1) / warp_sum(s);
    #pragma unroll 4
    for (int j = lane; j < S; j += 32) {
        long long idx = row * S + j;
        T p = j <= last ? exp(in[j] - m) * inv : T(0);
        probs[idx] = p;
        if (dropout) attn[idx] = dropout_bits(seed, idx) >= threshold ? p * keep_scale : T(0);
    }
}

// dP = dA * keep / (1 - p), then dS = P * (dP - D) with D = sum_j dP_j P_j, the row's softmax backward.
// D arrives precomputed: sum_j dP_j P_j = sum_j dA_j A_j = sum_j (dO . V_j) A_j = dO . O, a dot product of
// two (Dv,) rows of the output and its gradient, so this is one pass over dA and P. Keys a row never saw
// (P = 0, so dS = 0) are not read. row_dot holds D for row_dot_len queries per (batch, head); a block of
// queries reads its own, from row_dot_first on.
template <typename T>
__global__ void softmax_dropout_backward(const T* dattn, const T* probs, const T* row_dot, int row_dot_len,
                                         int row_dot_first, T* dscores, long long rows, int S, int L, int offset,
                                         int causal,
                                         unsigned long long seed, const unsigned long long* replay,
                                         unsigned int threshold, T keep_scale, int dropout) {
    long long row = warp_row(rows);
    if (row < 0) return;
    int lane = threadIdx.x % 32;
    seed = replay_seed(seed, replay);
    int last = last_visible_key(row, S, L, offset, causal);
    T d = row_dot[(row / L) * row_dot_len + row_dot_first + row % L];   // this query's entry of (..., len)
    #pragma unroll 4
    for (int j = lane; j < S; j += 32) {
        long long idx = row * S + j;
        T ds = T(0);
        if (j <= last) {
            T dp = dropout ? (dropout_bits(seed, idx) >= threshold ? dattn[idx] * keep_scale : T(0)) : dattn[idx];
            ds = probs[idx] * (dp - d);
        }
        dscores[idx] = ds;
    }
}

// Cross-entropy of each row of C logits: logsumexp and loss = logsumexp - z[target] (0 where ignored).
// One read of the row: each thread keeps a running max m and sum s of exp(z - m), rescaling s when m grows
// (s exp(m_old - m_new)); the block then rescales every thread's sum to the row's max and adds them.
template <typename T>
__global__ void cross_entropy_forward(const T* z, const long long* target, T* logsumexp, T* loss, int C,
                                      long long ignore_index) {
    extern __shared__ unsigned char smem[];
    T* shared = reinterpret_cast<T*>(smem);
    long long row = blockIdx.x;
    const T* zr = z + row * C;
    const T lowest = negative_infinity<T>();
    T m = lowest, s = 0;
    #pragma unroll 4
    for (int j = threadIdx.x; j < C; j += blockDim.x) {     // (unrolled: several loads in flight)
        T v = zr[j];
        if (v > m) { s = s * exp(m - v) + T(1); m = v; }
        else if (m != lowest) s += exp(v - m);        // (v = m = -inf adds nothing)
    }
    T row_max = block_max(m, shared);
    s = m == lowest ? T(0) : s * exp(m - row_max);
    s = block_sum(s, shared);
    if (threadIdx.x == 0) {
        T lse = log(s) + row_max;
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
    #pragma unroll 4
    for (int j = threadIdx.x; j < C; j += blockDim.x) {
        T p = exp(z[row * C + j] - lse);
        dz[row * C + j] = (p - (j == t ? T(1) : T(0))) * scale;
    }
}
"""

_NORMAL = r"""
// Phi(x) = (1 + erf(x / sqrt 2)) / 2, the standard normal CDF, and phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
template <typename F> __device__ F normal_cdf(F x) { return (F)0.5 * ((F)1 + erf(x * (F)0.70710678118654752440)); }
template <typename F> __device__ F normal_pdf(F x) { return exp((F)-0.5 * x * x) * (F)0.39894228040143267794; }
"""

_ELEMENTWISE_KERNELS = _NORMAL + r"""
// Elementwise kernels over n contiguous values. Each thread first loads UNROLL values spaced a block apart,
// then computes and stores them: several independent loads in flight per thread are what keeps the memory
// busy (with one 4-byte load per thread at a time, a GPU reaches only about a third of its bandwidth).
#define UNROLL 4

__device__ long long first_index() { return (long long)blockIdx.x * blockDim.x * UNROLL + threadIdx.x; }

// y = x Phi(x)
template <typename T> __global__ void gelu_forward(const T* __restrict__ x, T* __restrict__ y, long long n) {
    long long i0 = first_index();
    T v[UNROLL];
    #pragma unroll
    for (int u = 0; u < UNROLL; ++u) { long long i = i0 + u * blockDim.x; v[u] = i < n ? x[i] : T(0); }
    #pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
        long long i = i0 + u * blockDim.x;
        if (i < n) y[i] = v[u] * normal_cdf(v[u]);
    }
}

// dx = dy (Phi(x) + x phi(x))
template <typename T>
__global__ void gelu_backward(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx, long long n) {
    long long i0 = first_index();
    T g[UNROLL], v[UNROLL];
    #pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
        long long i = i0 + u * blockDim.x;
        g[u] = i < n ? dy[i] : T(0);
        v[u] = i < n ? x[i] : T(0);
    }
    #pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
        long long i = i0 + u * blockDim.x;
        if (i < n) dx[i] = g[u] * (normal_cdf(v[u]) + v[u] * normal_pdf(v[u]));
    }
}

// AdamW on n values in place (see optim.AdamW): decay, then the moving averages m of g and v of g^2, then
// the step. schedule = (lr, lr / (1 - beta1^t), 1 / sqrt(1 - beta2^t)) comes from device memory, so a
// recorded CUDA graph's replays follow the learning-rate schedule.
template <typename T>
__global__ void adamw(T* __restrict__ p, const T* __restrict__ g, T* __restrict__ m, T* __restrict__ v, long long n,
                      const double* schedule, double beta1, double beta2, double eps, double decay) {
    long long i0 = first_index();
    const double lr = schedule[0], step_size = schedule[1], bc2_rsqrt = schedule[2];
    T pu[UNROLL], gu[UNROLL], mu[UNROLL], vu[UNROLL];
    #pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
        long long i = i0 + u * blockDim.x;
        if (i < n) { pu[u] = p[i]; gu[u] = g[i]; mu[u] = m[i]; vu[u] = v[i]; }
    }
    #pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
        long long i = i0 + u * blockDim.x;
        if (i >= n) continue;
        T pi = pu[u] * (T)(1.0 - lr * decay);
        T mi = (T)beta1 * mu[u] + (T)(1.0 - beta1) * gu[u];
        T vi = (T)beta2 * vu[u] + (T)(1.0 - beta2) * gu[u] * gu[u];
        p[i] = pi - (T)step_size * mi / (sqrt(vi) * (T)bc2_rsqrt + (T)eps);
        m[i] = mi;
        v[i] = vi;
    }
}

// out (rows, C) = the row b repeated: a linear layer's bias, written before the GEMM adds x W^T onto it.
// Thread j holds b_j and writes column j down a band of rows (a warp writes 32 neighbouring values per row).
template <typename T>
__global__ void fill_rows(const T* __restrict__ b, T* __restrict__ out, long long rows, int C, int rows_per_band) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= C) return;
    T value = b[j];
    long long first = (long long)blockIdx.y * rows_per_band, last = min(rows, first + rows_per_band);
    for (long long r = first; r < last; ++r) out[r * C + j] = value;
}

// c = a + b (the residual stream's sums, and gradients meeting where it forks)
template <typename T>
__global__ void add_arrays(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ c, long long n) {
    long long i0 = first_index();
    T u_a[UNROLL], u_b[UNROLL];
    #pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
        long long i = i0 + u * blockDim.x;
        u_a[u] = i < n ? a[i] : T(0);
        u_b[u] = i < n ? b[i] : T(0);
    }
    #pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
        long long i = i0 + u * blockDim.x;
        if (i < n) c[i] = u_a[u] + u_b[u];
    }
}

// y = x * keep / (1 - p), keep = (random bits of element i >= threshold); the same call undoes it backward
template <typename T>
__global__ void dropout(const T* __restrict__ x, T* __restrict__ y, long long n, unsigned long long seed,
                        const unsigned long long* replay, unsigned int threshold, T keep_scale) {
    long long i0 = first_index();
    seed = replay_seed(seed, replay);
    T v[UNROLL];
    #pragma unroll
    for (int u = 0; u < UNROLL; ++u) { long long i = i0 + u * blockDim.x; v[u] = i < n ? x[i] : T(0); }
    #pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
        long long i = i0 + u * blockDim.x;
        if (i < n) y[i] = dropout_bits(seed, i) >= threshold ? v[u] * keep_scale : T(0);
    }
}
"""
_UNROLL = 4

_NAMES = ["layer_norm_forward", "layer_norm_backward", "softmax_dropout_forward", "softmax_dropout_backward",
          "cross_entropy_forward", "cross_entropy_backward", "gelu_forward", "gelu_backward", "dropout",
          "add_arrays", "adamw", "layer_norm_param_grads", "fill_rows"]
_CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
_THREADS = 256
_cache = {}


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
        module = cp.RawModule(code=_ROW_KERNELS + _ELEMENTWISE_KERNELS, options=("-std=c++14",),
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
    grad, x = cp.ascontiguousarray(grad), cp.ascontiguousarray(x)
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
    """a + b for two contiguous arrays of one shape and dtype (the caller checks: see backend.add)."""
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
                  (x, cp.ascontiguousarray(w), cp.ascontiguousarray(b), y, xhat, rstd, np.int64(rows),
                   np.int32(C), _scalar(eps, x.dtype), np.int32(weight is not None), np.int32(bias is not None)))
    return y, xhat, rstd


def layer_norm_backward(grad, weight, xhat, rstd):
    cp = _cupy()
    C = xhat.shape[-1]
    grad = cp.ascontiguousarray(grad)
    dx = cp.empty_like(xhat)
    w = weight if weight is not None else grad
    rows = xhat.size // C
    _launch_warps("layer_norm_backward", xhat.dtype, rows,
                  (grad, cp.ascontiguousarray(w), xhat, rstd, dx, np.int64(rows), np.int32(C),
                   np.int32(weight is not None)))
    return dx


_ROWS_PER_BAND = 256


def layer_norm_param_grads(grad, xhat):
    """(dw, db), each (C,): the column sums of dy * xhat and of dy over every row, in one pass."""
    cp = _cupy()
    C = xhat.shape[-1]
    rows = xhat.size // C
    grad = cp.ascontiguousarray(grad)
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
    grad_attn = cp.ascontiguousarray(grad_attn)
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
