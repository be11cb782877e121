// Row kernels: LayerNorm, causal softmax + dropout, cross-entropy (one warp or one block per row).
// Compiled by npgpt/fast/cuda/kernels.py with NVRTC: -DUNROLL, -DTHREADS_PER_BLOCK and -DWARPS_PER_BLOCK
// come from there, defined once.

#include "random.cuh"

// loops over a row: UNROLL iterations unrolled (#pragma unroll takes a constant expression, not a macro)
constexpr int row_unroll = UNROLL;
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
// values per row) down every WARPS_PER_BLOCK-th row of the band; the warps' sums meet in shared memory, and each band
// writes one row of partial sums (the caller adds the bands).
template <typename T>
__global__ void layer_norm_param_grads(const T* dy, const T* xhat, T* partial_w, T* partial_b, long long rows,
                                       int C, int rows_per_band) {
    __shared__ T shared_w[WARPS_PER_BLOCK][32], shared_b[WARPS_PER_BLOCK][32];   // [warp][lane]
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    int j = blockIdx.x * 32 + lane;
    long long first = (long long)blockIdx.y * rows_per_band;
    long long last = min(rows, first + rows_per_band);
    T sw = 0, sb = 0;
    if (j < C) {
        for (long long r = first + warp; r < last; r += WARPS_PER_BLOCK) {
            T g = dy[r * C + j];
            sw += g * xhat[r * C + j];
            sb += g;
        }
    }
    shared_w[warp][lane] = sw;
    shared_b[warp][lane] = sb;
    __syncthreads();
    if (warp == 0 && j < C) {
        for (int k = 1; k < WARPS_PER_BLOCK; ++k) { sw += shared_w[k][lane]; sb += shared_b[k][lane]; }
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
    #pragma unroll row_unroll
    for (int j = lane; j <= last; j += 32) m = max(m, in[j]);      // (unrolled: several loads in flight)
    m = warp_max(m);
    T s = 0;
    #pragma unroll row_unroll
    for (int j = lane; j <= last; j += 32) s += exp(in[j] - m);
    T inv = T(1) / warp_sum(s);
    #pragma unroll row_unroll
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
    #pragma unroll row_unroll
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
    #pragma unroll row_unroll
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
    #pragma unroll row_unroll
    for (int j = threadIdx.x; j < C; j += blockDim.x) {
        T p = exp(z[row * C + j] - lse);
        dz[row * C + j] = (p - (j == t ? T(1) : T(0))) * scale;
    }
}
