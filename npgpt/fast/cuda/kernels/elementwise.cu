// Elementwise kernels: GELU, dropout, add, bias rows, AdamW, sum of squares.
// Compiled by npgpt/fast/cuda/kernels.py with NVRTC: -DUNROLL, -DTHREADS_PER_BLOCK and -DWARPS_PER_BLOCK
// come from there, defined once.

#include "random.cuh"
#include "normal.cuh"
// Elementwise kernels over n contiguous values. Each thread first loads UNROLL values spaced a block apart,
// then computes and stores them: several independent loads in flight per thread are what keeps the memory
// busy (with one 4-byte load per thread at a time, a GPU reaches only about a third of its bandwidth).

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
