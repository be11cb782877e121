/* npgpt's CPU kernels: the textbook's elementwise, row-wise and per-head maths (npgpt/functional.py,
 * optim.py) as C loops the compiler turns into SIMD code, each a single pass over memory where NumPy needs
 * several; and a small thread pool that runs them, and the BLAS's matrix products, in chunks.
 *
 * Compiled twice by native.py, once with -DREAL=float and once with -DREAL=double, into two shared
 * libraries, and called through ctypes, which releases the GIL. Every kernel works on a slice it is given (a
 * chunk of elements, rows or heads) and writes only that slice's results, so a chunked call gives the same
 * numbers as a whole one: dropout is told where its slice starts (`start`), the causal softmax gets whole
 * (L, S) blocks of rows, and LayerNorm's weight and bias gradients are sums the caller adds up per chunk.
 * The library's entry points are the *_parallel functions at the end, which cut one op into such chunks on
 * the pool (run_parallel); block_with_cache, a generated token's whole transformer block, which calls several
 * of them; and the attention softmax and dropout that ops.py's NumPy attention calls whole.
 *
 * Shapes: GELU, dropout, AdamW: flat (n,); LayerNorm rows (N, C); cross-entropy logits (N, V); attention's
 * softmax: scores (rows, S), rows = B * H * L queries; the whole attention: Q, K, V (B, H, rows, D), a range
 * of heads per call.
 *
 * float: exp and erf are the polynomial and rational approximations below (within a few ulp), which
 * vectorise; double: the C library's exp and erfc (within an ulp or two), for the gradient checks.
 */

#define _GNU_SOURCE             /* sched_getaffinity and CPU_COUNT */
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#if defined(__AVX512F__)
#include <immintrin.h>      /* sum_lanes's _mm512_reduce_add */
#endif

#ifndef REAL
#define REAL float
#endif
#define IS_DOUBLE (sizeof(REAL) == 8)

typedef REAL real;
typedef int64_t index_t;

/* ---------------------------------------------------------------------------------------------------------
 * exp and erf for float
 *
 * exp(x) = 2^n exp(r), n = round(x / ln 2), r = x - n ln 2 in [-ln2/2, ln2/2] (ln 2 in two parts, so r keeps
 * its digits); exp(r) by a degree-6 polynomial (Cephes' expf), 2^n built in the exponent bits. Below
 * -87.3 (where float's exp leaves the normal numbers) the result is flushed to 0, as for exp(-inf); above
 * 88 it is clamped to exp(88), which keeps 2^n finite (the kernels only take exp of x <= 0). NaN stays NaN.
 */
static inline float exp_float(float x) {
    const float xc = x > 88.0f ? 88.0f : (x < -87.3f ? -87.3f : x);
    const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;   /* round to nearest */
    float r = xc - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const float y = p * r * r + r + 1.0f;
    union { int32_t i; float f; } scale;
    scale.i = ((int32_t)n + 127) << 23;
    return x < -87.3f ? 0.0f : y * scale.f;
}

/* erf(x) = v A(v^2) / B(v^2), v = clip(x, -4, 4): the textbook's float32 erf (functional.erf), the same
 * coefficients, highest power first. */
static inline float erf_float(float x) {
    const float v = x > 4.0f ? 4.0f : (x < -4.0f ? -4.0f : x);
    const float z = v * v;
    float a = -2.72614225801306e-10f;
    a = a * z + 2.77068142495902e-08f;
    a = a * z + -2.10102402082508e-06f;
    a = a * z + -5.69250639462346e-05f;
    a = a * z + -7.34990630326855e-04f;
    a = a * z + -2.95459980854025e-03f;
    a = a * z + -1.60960333262415e-02f;
    float b = -1.45660718464996e-05f;
    b = b * z + -2.13374055278905e-04f;
    b = b * z + -1.68282697438203e-03f;
    b = b * z + -7.37332916720468e-03f;
    b = b * z + -1.42647390514189e-02f;
    return v * a / b;
}

static inline real exp_real(real x) { return IS_DOUBLE ? (real)exp((double)x) : (real)exp_float((float)x); }
static inline real sqrt_real(real x) { return IS_DOUBLE ? (real)sqrt((double)x) : (real)sqrtf((float)x); }

/* Phi(x) = (1 + erf(x / sqrt 2)) / 2; for double erfc(-x / sqrt 2) / 2, which keeps tiny values' digits */
static inline real normal_cdf(real x) {
    if (IS_DOUBLE)
        return (real)(0.5 * erfc(-(double)x * 0.70710678118654752440));
    return (real)((erf_float((float)x * 0.70710678118654752f) + 1.0f) * 0.5f);
}

/* ---------------------------------------------------------------------------------------------------------
 * GELU
 *   exact:  y = x Phi(x),                   dy/dx = Phi(x) + x phi(x),  phi(x) = exp(-x^2/2) / sqrt(2 pi)
 *   tanh:   y = x (1 + tanh u) / 2,  u = sqrt(2/pi) (x + 0.044715 x^3)
 *           dy/dx = (1 + tanh u) / 2 + x (1 - tanh^2 u) / 2 * sqrt(2/pi) (1 + 3 * 0.044715 x^2)
 * The backward recomputes Phi(x) or tanh u from x: a few multiply-adds an element are cheaper than writing
 * an array of them in the forward pass and reading it back.
 * tanh u = sign(u) (1 - e) / (1 + e) and 1 - tanh^2 u = 4 e / (1 + e)^2, e = exp(-2|u|) in (0, 1]: the second
 * keeps its digits where tanh u is near +-1, where 1 - th * th would lose them.
 */
static inline real tanh_of_gelu_argument(real x, real *sech2) {
    const real u = (real)0.79788456080286535588 * (x + (real)0.044715 * x * x * x);
    const real e = exp_real((real)-2 * (u < 0 ? -u : u));
    *sech2 = (real)4 * e / (((real)1 + e) * ((real)1 + e));
    return (u < 0 ? (real)-1 : (real)1) * ((real)1 - e) / ((real)1 + e);
}

static void gelu_forward(const real *x, real *out, index_t n, int tanh_form) {
    if (tanh_form) {
        #pragma omp simd
        for (index_t i = 0; i < n; i++) {
            real sech2;
            const real th = tanh_of_gelu_argument(x[i], &sech2);
            out[i] = (real)0.5 * x[i] * ((real)1 + th);
        }
    } else {
        #pragma omp simd
        for (index_t i = 0; i < n; i++) out[i] = x[i] * normal_cdf(x[i]);
    }
}

static void gelu_backward(const real *x, const real *grad, real *grad_x, index_t n, int tanh_form) {
    const real k = (real)0.79788456080286535588, c = (real)0.044715;
    const real inv_sqrt_2pi = (real)0.39894228040143267794;
    if (tanh_form) {
        #pragma omp simd
        for (index_t i = 0; i < n; i++) {
            const real xi = x[i];
            real sech2;
            const real th = tanh_of_gelu_argument(xi, &sech2);
            const real du = k * ((real)1 + (real)3 * c * xi * xi);
            grad_x[i] = grad[i] * ((real)0.5 * ((real)1 + th) + (real)0.5 * xi * sech2 * du);
        }
    } else {
        #pragma omp simd
        for (index_t i = 0; i < n; i++) {
            const real xi = x[i];
            const real pdf = exp_real(xi * xi * (real)-0.5) * inv_sqrt_2pi;
            grad_x[i] = grad[i] * (normal_cdf(xi) + xi * pdf);
        }
    }
}

/* ---------------------------------------------------------------------------------------------------------
 * LayerNorm over rows (N, C):  mean = sum(x) / C,  var = sum((x - mean)^2) / C (biased, as PyTorch),
 * rstd = 1 / sqrt(var + eps),  xhat = (x - mean) rstd,  y = xhat w + b.  mean and rstd (N,) are kept;
 * the backward recomputes xhat from them. weight and bias may be NULL.
 */
static void layer_norm_forward(const real *x, const real *w, const real *b, real *out, real *mean, real *rstd,
                        index_t rows, index_t C, real eps) {
    for (index_t r = 0; r < rows; r++) {
        const real *xr = x + r * C;
        real *yr = out + r * C;
        real sum = 0;
        #pragma omp simd reduction(+:sum)
        for (index_t j = 0; j < C; j++) sum += xr[j];
        const real m = sum / (real)C;
        real sq = 0;
        #pragma omp simd reduction(+:sq)
        for (index_t j = 0; j < C; j++) sq += (xr[j] - m) * (xr[j] - m);
        const real s = (real)1 / sqrt_real(sq / (real)C + eps);
        mean[r] = m;
        rstd[r] = s;
        #pragma omp simd
        for (index_t j = 0; j < C; j++) {
            const real xh = (xr[j] - m) * s;
            yr[j] = (w ? xh * w[j] : xh) + (b ? b[j] : (real)0);
        }
    }
}

/* With g = dy w:  dx = rstd (g - mean(g) - xhat mean(g xhat));  dw += sum over rows of dy xhat, db += sum
 * of dy, added into this chunk's own grad_w, grad_b (C,) (either may be NULL), as is grad_x. */
static void layer_norm_backward(const real *x, const real *w, const real *mean, const real *rstd, const real *grad,
                         real *grad_x, real *grad_w, real *grad_b, index_t rows, index_t C) {
    for (index_t r = 0; r < rows; r++) {
        const real *xr = x + r * C, *gr = grad + r * C;
        const real m = mean[r], s = rstd[r];
        if (grad_x) {
            real sum_g = 0, sum_gx = 0;
            #pragma omp simd reduction(+:sum_g, sum_gx)
            for (index_t j = 0; j < C; j++) {
                const real g = w ? gr[j] * w[j] : gr[j];
                sum_g += g;
                sum_gx += g * (xr[j] - m) * s;
            }
            const real mean_g = sum_g / (real)C, mean_gx = sum_gx / (real)C;
            real *dxr = grad_x + r * C;
            #pragma omp simd
            for (index_t j = 0; j < C; j++) {
                const real g = w ? gr[j] * w[j] : gr[j];
                dxr[j] = s * (g - mean_g - (xr[j] - m) * s * mean_gx);
            }
        }
        if (grad_w) {
            #pragma omp simd
            for (index_t j = 0; j < C; j++) grad_w[j] += gr[j] * (xr[j] - m) * s;
        }
        if (grad_b) {
            #pragma omp simd
            for (index_t j = 0; j < C; j++) grad_b[j] += gr[j];
        }
    }
}

/* ---------------------------------------------------------------------------------------------------------
 * Softmax along rows, and its logsumexp
 *   softmax(z)_j = exp(z_j - max z) / sum_k exp(z_k - max z),   logsumexp(z) = log sum_k exp(z_k - max z) + max z
 */
static inline real row_max(const real *z, index_t n) {
    real peak = -INFINITY;
    #pragma omp simd reduction(max:peak)
    for (index_t j = 0; j < n; j++) peak = z[j] > peak ? z[j] : peak;
    return peak;
}

/* z[0 .. n) becomes softmax(z[0 .. n)) */
static inline void softmax_row_in_place(real *z, index_t n) {
    const real peak = row_max(z, n);
    real sum = 0;
    #pragma omp simd reduction(+:sum)
    for (index_t j = 0; j < n; j++) {
        const real e = exp_real(z[j] - peak);
        z[j] = e;
        sum += e;
    }
    const real inv = (real)1 / sum;
    #pragma omp simd
    for (index_t j = 0; j < n; j++) z[j] *= inv;
}

/* Cross-entropy's forward: logsumexp (N,) of each row of the logits (N, V); nothing else is written. */
static void logsumexp_rows(const real *z, real *logsumexp, index_t rows, index_t V) {
    for (index_t r = 0; r < rows; r++) {
        const real *zr = z + r * V;
        const real peak = row_max(zr, V);
        real sum = 0;
        #pragma omp simd reduction(+:sum)
        for (index_t j = 0; j < V; j++) sum += exp_real(zr[j] - peak);
        logsumexp[r] = (real)log((double)sum) + peak;
    }
}

/* Cross-entropy's backward without the one-hot: dz = softmax(z) * row_scale = exp(z - logsumexp) * row_scale
 * (the caller subtracts row_scale at each row's target). */
static void softmax_scaled_rows(const real *z, const real *logsumexp, const real *row_scale, real *grad_z,
                         index_t rows, index_t V) {
    for (index_t r = 0; r < rows; r++) {
        const real *zr = z + r * V;
        real *dr = grad_z + r * V;
        const real lse = logsumexp[r], scale = row_scale[r];
        #pragma omp simd
        for (index_t j = 0; j < V; j++) dr[j] = exp_real(zr[j] - lse) * scale;
    }
}

/* Attention's softmax, in place on the scores (rows, S). causal_length > 0: row r is query r % causal_length
 * (the rows are B * H blocks of L = causal_length queries) at position offset + r % L, which sees keys
 * 0 .. offset + r % L; the keys after those get probability 0 (the -inf of the causal mask). */
void softmax_rows_in_place(real *scores, index_t rows, index_t S, index_t causal_length, index_t offset) {
    for (index_t r = 0; r < rows; r++) {
        real *sr = scores + r * S;
        index_t visible = S;
        if (causal_length > 0) {
            visible = offset + r % causal_length + 1;
            visible = visible > S ? S : visible;
        }
        softmax_row_in_place(sr, visible);
        for (index_t j = visible; j < S; j++) sr[j] = 0;
    }
}

/* Its backward, in place on dP (rows, S):  dS = P (dP - sum_j dP_j P_j) */
void softmax_backward_rows_in_place(real *grad, const real *probs, index_t rows, index_t S) {
    for (index_t r = 0; r < rows; r++) {
        real *gr = grad + r * S;
        const real *pr = probs + r * S;
        real dot = 0;
        #pragma omp simd reduction(+:dot)
        for (index_t j = 0; j < S; j++) dot += gr[j] * pr[j];
        #pragma omp simd
        for (index_t j = 0; j < S; j++) gr[j] = pr[j] * (gr[j] - dot);
    }
}

/* ---------------------------------------------------------------------------------------------------------
 * Dropout:  out = x * scale where bits >= threshold, else 0, with 16-bit random bits
 *
 * The bits of element j are the top 16 of a hash of (j, seed): two rounds of a 32-bit integer mixer
 * (Wellons' lowbias32), j's low half and the seed's low half in the first, their high halves in the
 * second. So the mask is a function of the seed and the element's index alone: the same however the
 * elements are cut into chunks, and the backward pass draws it again instead of keeping it.
 * `start` is the index of x[0] in the whole array; out may be x (in place).
 */
static inline uint32_t mix32(uint32_t h) {
    h ^= h >> 16;
    h *= 0x7feb352dU;
    h ^= h >> 15;
    h *= 0x846ca68bU;
    h ^= h >> 16;
    return h;
}

void dropout_hashed(const real *x, real *out, index_t start, index_t n, uint64_t seed, int32_t threshold,
                    real scale) {
    const uint32_t seed_low = (uint32_t)seed, seed_high = (uint32_t)(seed >> 32);
    #pragma omp simd
    for (index_t i = 0; i < n; i++) {
        const uint64_t j = (uint64_t)(start + i);
        const uint32_t h = mix32(mix32((uint32_t)j ^ seed_low) ^ (seed_high + (uint32_t)(j >> 32)));
        out[i] = (int32_t)(h >> 16) >= threshold ? x[i] * scale : (real)0;
    }
}

/* ---------------------------------------------------------------------------------------------------------
 * AdamW, one pass (optim.adamw_update's maths):
 *   p -= lr * decay * p;  m = beta1 m + (1 - beta1) g;  v = beta2 v + (1 - beta2) g^2
 *   p -= lr / (1 - beta1^t) * m / (sqrt(v / (1 - beta2^t)) + eps)
 * decay_factor = 1 - lr * decay, step_size = lr / (1 - beta1^t), rsqrt_correction = 1 / sqrt(1 - beta2^t).
 */
static void adamw_update(real *p, const real *g, real *m, real *v, index_t n, real beta1, real beta2, real eps,
                  real decay_factor, real step_size, real rsqrt_correction) {
    #pragma omp simd
    for (index_t i = 0; i < n; i++) {
        const real gi = g[i];
        const real mi = beta1 * m[i] + ((real)1 - beta1) * gi;
        const real vi = beta2 * v[i] + ((real)1 - beta2) * (gi * gi);
        m[i] = mi;
        v[i] = vi;
        p[i] = p[i] * decay_factor - step_size * (mi / (sqrt_real(vi) * rsqrt_correction + eps));
    }
}

/* ---------------------------------------------------------------------------------------------------------
 * Attention, one head at a time, its scores never leaving the cache (functional.scaled_dot_product_attention):
 *   S = scale Q K^T (L, S);  P = softmax(S) along the keys (causal: query i sees keys 0 .. i);
 *   A = dropout(P), the hashed mask above for element (head, i, j) of the (heads, L, S) probabilities;  O = A V
 * and its backward, with delta_i = sum_j dA_ij A_ij = sum_d dO_id O_id:
 *   dV = A^T dO;  dA = dO V^T;  dS = P (dA * mask * keep_scale - delta);  dQ = scale dS K;  dK = scale dS^T Q
 *
 * Q, K, V, O, dO, dQ, dK, dV (B, H, rows, D) lie anywhere their last axis is contiguous: `layout` holds H, L,
 * S, D, Dv, then for each of them in that order its strides in elements along B, H and the rows. P is
 * contiguous (heads, L, S). Heads head_lo .. head_hi - 1 are done, so threads split the heads.
 *
 * Two small products do all the multiplying, both block_product below on other strides: each on ROWS rows
 * at once so that one load from memory feeds ROWS multiply-adds, a block of the result in registers:
 *   products_with_columns:  out_r[j] = sum_d x_r[d] Yt[d][j]   (Yt is K or V transposed, keys in the lanes)
 *   weighted_rows:          out_r[:] = sum_j w_r[j] Y[j][:]     (Y is V, K, Q or dO, head dims in the lanes)
 * A query's key row is padded to a multiple of LANES; the padding's scores are computed and then ignored.
 *
 * The SIMD register the compiler targets (-march=native): 64 bytes with AVX-512, 32 with AVX, 16 otherwise
 * (SSE, NEON). A block of a product's result is ROWS rows of BLOCK registers, summed in registers while the
 * depth runs, so ROWS x BLOCK sums, BLOCK loads and a broadcast must fit in the register file: 32 registers
 * with AVX-512 and on ARM64 (4 x 4 + 4 + 1 = 21), 16 with AVX or SSE (4 x 2 + 2 + 1 = 11). A block wider than
 * the register file spills its sums to the stack at every step of the depth, several times slower. Columns
 * left after the whole blocks take a block of two registers (where BLOCK is 4), then of one. */
#if defined(__AVX512F__)
#define VECTOR_BYTES 64
#define REGISTERS_BLOCK 4
#elif defined(__AVX__)
#define VECTOR_BYTES 32
#define REGISTERS_BLOCK 2
#elif defined(__aarch64__)
#define VECTOR_BYTES 16
#define REGISTERS_BLOCK 4
#else
#define VECTOR_BYTES 16
#define REGISTERS_BLOCK 2
#endif
#ifndef BLOCK               /* -DBLOCK=4 builds another block for this width (the tests run ARM64's on x86) */
#define BLOCK REGISTERS_BLOCK
#endif
#define LANES ((index_t)(VECTOR_BYTES / sizeof(real)))     /* reals in a SIMD register */
#define ROWS 4

int vector_bytes(void) { return VECTOR_BYTES; }      /* which of the above was built, for native.status() */

static inline index_t round_up(index_t n, index_t m) { return (n + m - 1) / m * m; }

static inline index_t visible_keys(index_t i, index_t S, int causal) {
    return causal ? (i + 1 < S ? i + 1 : S) : S;
}

static inline real dropout_keep(uint64_t index, uint32_t seed_low, uint32_t seed_high, int32_t threshold) {
    const uint32_t h = mix32(mix32((uint32_t)index ^ seed_low) ^ (seed_high + (uint32_t)(index >> 32)));
    return (int32_t)(h >> 16) >= threshold ? (real)1 : (real)0;
}

/* xt (cols, padded_rows) = x (rows, cols) transposed, the columns after `rows` zero. By 8 x 8 tiles whose
 * loops have constant bounds, so that the compiler unrolls them whole and can keep a tile in registers: each
 * of its 8 rows read as 8 neighbouring columns, then each of its 8 columns written as 8 neighbouring rows
 * (element by element, a tile's loads and stores stay in 8 cache lines each but depend on no loop counter).
 * The rows and columns after the last whole tile are copied one by one. */
#define TILE 8
static void transpose_padded(const real *x, index_t row_stride, index_t rows, index_t cols, index_t padded_rows,
                             real *xt) {
    index_t r0 = 0;
    for (; r0 + TILE <= rows; r0 += TILE) {
        index_t c0 = 0;
        for (; c0 + TILE <= cols; c0 += TILE) {
            real tile[TILE][TILE];                                  /* tile[c][r] = x[r0 + r][c0 + c] */
            #pragma GCC unroll 8
            for (int r = 0; r < TILE; r++)
                #pragma GCC unroll 8
                for (int c = 0; c < TILE; c++) tile[c][r] = x[(r0 + r) * row_stride + c0 + c];
            #pragma GCC unroll 8
            for (int c = 0; c < TILE; c++)
                #pragma GCC unroll 8
                for (int r = 0; r < TILE; r++) xt[(c0 + c) * padded_rows + r0 + r] = tile[c][r];
        }
        for (; c0 < cols; c0++)
            for (index_t r = r0; r < r0 + TILE; r++) xt[c0 * padded_rows + r] = x[r * row_stride + c0];
    }
    for (; r0 < rows; r0++)
        for (index_t c = 0; c < cols; c++) xt[c * padded_rows + r0] = x[r0 * row_stride + c];
    for (index_t c = 0; c < cols; c++)
        for (index_t r = rows; r < padded_rows; r++) xt[c * padded_rows + r] = 0;
}

/* One SIMD register's worth of reals in GCC's vector extension (also clang's), loaded from and stored to any
 * real's address. The blocks below are arrays of them whose loops have constant bounds (ROWS, and BLOCK or
 * 1), which the compiler unrolls whole, so that each sum stays in a register. */
typedef real vec __attribute__((vector_size(VECTOR_BYTES), aligned(sizeof(real)), may_alias));
#define LOAD(p) (*(const vec *)(p))
#define STORE(p, v) (*(vec *)(p) = (v))
#define INLINE static inline __attribute__((always_inline))
/* GCC folds a load into each multiply-add that uses it, so a row of y meant to be loaded once and used by
 * ROWS multiply-adds is loaded ROWS times, and the loads, not the multiply-adds, set the pace; an empty asm
 * that claims to change the register makes the compiler keep the loaded value there */
#if defined(__GNUC__) && defined(__SSE2__)
#define IN_REGISTER(v) __asm__("" : "+v"(v))
#elif defined(__GNUC__) && defined(__aarch64__)
#define IN_REGISTER(v) __asm__("" : "+w"(v))
#else
#define IN_REGISTER(v) ((void)0)
#endif

/* The one small product both attention passes are made of, on ROWS rows and `regs` registers of columns
 * (regs is BLOCK, 2 or 1):
 *   out[r][col + :regs LANES] = scale sum_{t = lo}^{hi - 1} a[r][t * a_step] y[t * y_stride + col + :regs LANES]
 * each a[r][t] broadcast against a row of y already in registers, so one load of y feeds ROWS multiply-adds */
INLINE void block_product(const real *const a[ROWS], index_t a_step, const real *y, index_t y_stride,
                          index_t lo, index_t hi, index_t col, real scale, real *const out[ROWS], const int regs) {
    vec sum[ROWS][BLOCK];
    #pragma GCC unroll 4
    for (int r = 0; r < ROWS; r++)
        #pragma GCC unroll 4
        for (int c = 0; c < regs; c++) sum[r][c] = (vec){0};
    for (index_t t = lo; t < hi; t++) {
        const real *yt = y + t * y_stride + col;
        vec yv[BLOCK];
        #pragma GCC unroll 4
        for (int c = 0; c < regs; c++) {
            yv[c] = LOAD(yt + c * LANES);
            IN_REGISTER(yv[c]);
        }
        #pragma GCC unroll 4
        for (int r = 0; r < ROWS; r++) {
            const real ar = a[r][t * a_step];
            #pragma GCC unroll 4
            for (int c = 0; c < regs; c++) sum[r][c] += ar * yv[c];
        }
    }
    #pragma GCC unroll 4
    for (int r = 0; r < ROWS; r++)
        #pragma GCC unroll 4
        for (int c = 0; c < regs; c++) STORE(out[r] + col + c * LANES, sum[r][c] * scale);
}

/* out_r[j] = scale sum_d x_r[d] yt[d * yt_stride + j] for j < n (n a multiple of LANES), r < ROWS (out_r at
 * out + r * out_stride): a query's scores against the keys (or dO's against V), keys in the lanes */
static void products_with_columns(const real *const x[ROWS], const real *yt, index_t yt_stride, index_t depth,
                                  index_t n, real scale, real *out, index_t out_stride) {
    real *rows[ROWS];
    for (int r = 0; r < ROWS; r++) rows[r] = out + r * out_stride;
    index_t jb = 0;
    for (; jb + BLOCK * LANES <= n; jb += BLOCK * LANES)
        block_product(x, 1, yt, yt_stride, 0, depth, jb, scale, rows, BLOCK);
    for (; BLOCK > 2 && jb + 2 * LANES <= n; jb += 2 * LANES)
        block_product(x, 1, yt, yt_stride, 0, depth, jb, scale, rows, 2);
    for (; jb < n; jb += LANES)
        block_product(x, 1, yt, yt_stride, 0, depth, jb, scale, rows, 1);
}

/* out[r][:width] = scale sum_{j = lo}^{hi - 1} w[r * w_row + j * w_col] y[j * y_stride + :width], r < ROWS:
 * weights times rows of V, K, Q or dO, head dims in the lanes */
static void weighted_rows(const real *w, index_t w_row, index_t w_col, const real *y, index_t y_stride,
                          index_t lo, index_t hi, index_t width, real scale, real *const out[ROWS]) {
    const real *wr[ROWS];
    for (int r = 0; r < ROWS; r++) wr[r] = w + r * w_row;
    index_t db = 0;
    for (; db + BLOCK * LANES <= width; db += BLOCK * LANES)
        block_product(wr, w_col, y, y_stride, lo, hi, db, scale, out, BLOCK);
    for (; BLOCK > 2 && db + 2 * LANES <= width; db += 2 * LANES)    /* a head of 32 floats on AVX-512 */
        block_product(wr, w_col, y, y_stride, lo, hi, db, scale, out, 2);
    for (; db + LANES <= width; db += LANES)
        block_product(wr, w_col, y, y_stride, lo, hi, db, scale, out, 1);
    for (; db < width; db++)                                   /* a head width not a multiple of LANES */
        for (int r = 0; r < ROWS; r++) {
            real sum = 0;
            for (index_t j = lo; j < hi; j++) sum += w[r * w_row + j * w_col] * y[j * y_stride + db];
            out[r][db] = sum * scale;
        }
}

/* softmax_row_in_place on the ROWS rows of a block at once:
 *   p_rj = exp(z_rj - max_k z_rk) / sum_k exp(z_rk - max_k z_rk)      (each exp at most 1, no overflow)
 * each row over the same `width` (a multiple of LANES), the keys it does not see already -inf (exp gives 0);
 * every row has a finite score, its first key. A row's maximum and sum are chains of dependent steps; the four
 * rows' chains, interleaved, overlap where one row's would wait on itself. */
_Static_assert(ROWS == 4, "softmax_block_in_place is written for four rows");
static void softmax_block_in_place(real *const p[ROWS], index_t width) {
    real *const p0 = p[0], *const p1 = p[1], *const p2 = p[2], *const p3 = p[3];
    real peak0 = -INFINITY, peak1 = -INFINITY, peak2 = -INFINITY, peak3 = -INFINITY;
    #pragma omp simd reduction(max:peak0, peak1, peak2, peak3)
    for (index_t j = 0; j < width; j++) {
        peak0 = p0[j] > peak0 ? p0[j] : peak0;
        peak1 = p1[j] > peak1 ? p1[j] : peak1;
        peak2 = p2[j] > peak2 ? p2[j] : peak2;
        peak3 = p3[j] > peak3 ? p3[j] : peak3;
    }
    real sum0 = 0, sum1 = 0, sum2 = 0, sum3 = 0;
    #pragma omp simd reduction(+:sum0, sum1, sum2, sum3)
    for (index_t j = 0; j < width; j++) {
        const real e0 = exp_real(p0[j] - peak0), e1 = exp_real(p1[j] - peak1);
        const real e2 = exp_real(p2[j] - peak2), e3 = exp_real(p3[j] - peak3);
        p0[j] = e0;
        p1[j] = e1;
        p2[j] = e2;
        p3[j] = e3;
        sum0 += e0;
        sum1 += e1;
        sum2 += e2;
        sum3 += e3;
    }
    const real inv0 = (real)1 / sum0, inv1 = (real)1 / sum1, inv2 = (real)1 / sum2, inv3 = (real)1 / sum3;
    #pragma omp simd
    for (index_t j = 0; j < width; j++) {
        p0[j] *= inv0;
        p1[j] *= inv1;
        p2[j] *= inv2;
        p3[j] *= inv3;
    }
}

/* The scratch (in reals) each call needs: forward K^T, a block of score rows and a row for unused results;
 * backward V^T, dS and A for the head's queries, and the same spare rows. */
static index_t attention_scratch_size(index_t L, index_t S, index_t D, index_t Dv, int backward) {
    const index_t padded = round_up(S, LANES), width = D > Dv ? D : Dv;
    if (!backward) return D * padded + ROWS * padded + width;
    return Dv * padded + 2 * round_up(L, ROWS) * padded + width;
}

static void attention_forward(const real *q, const real *k, const real *v, real *out, real *probs,
                       const index_t *layout, index_t head_lo, index_t head_hi, real scale, int causal,
                       uint64_t seed, int32_t threshold, real keep_scale, real *scratch) {
    const index_t H = layout[0], L = layout[1], S = layout[2], D = layout[3], Dv = layout[4];
    const index_t padded = round_up(S, LANES);
    const uint32_t seed_low = (uint32_t)seed, seed_high = (uint32_t)(seed >> 32);
    real *kt = scratch, *rows = kt + D * padded, *spare = rows + ROWS * padded;    /* (D, padded), (ROWS, padded) */
    for (index_t head = head_lo; head < head_hi; head++) {
        const index_t b = head / H, h = head % H;
        const real *qh = q + b * layout[5] + h * layout[6];
        const real *kh = k + b * layout[8] + h * layout[9];
        const real *vh = v + b * layout[11] + h * layout[12];
        real *oh = out + b * layout[14] + h * layout[15];
        transpose_padded(kh, layout[10], S, D, padded, kt);
        for (index_t i0 = 0; i0 < L; i0 += ROWS) {
            const index_t count = L - i0 < ROWS ? L - i0 : ROWS;
            const real *qr[ROWS];
            real *orow[ROWS];
            for (int r = 0; r < ROWS; r++) {               /* rows past L repeat the last; their results unused */
                const index_t i = i0 + (r < count ? r : count - 1);
                qr[r] = qh + i * layout[7];
                orow[r] = r < count ? oh + i * layout[16] : spare;
            }
            const index_t n_block = visible_keys(i0 + count - 1, S, causal);
            products_with_columns(qr, kt, padded, D, round_up(n_block, LANES), scale, rows, padded);
            /* the keys a row does not see, up to the block's last visible one rounded to a whole register,
             * become -inf (exp gives 0): the four rows' softmax then runs on whole registers of one width */
            const index_t width = round_up(n_block, LANES), saved_width = width < S ? width : S;
            real *p[ROWS];
            for (int r = 0; r < ROWS; r++) {
                p[r] = rows + r * padded;
                for (index_t j = visible_keys(i0 + (r < count ? r : count - 1), S, causal); j < width; j++)
                    p[r][j] = -(real)INFINITY;
            }
            softmax_block_in_place(p, width);
            for (index_t r = 0; r < count; r++) {
                const index_t i = i0 + r, n = visible_keys(i, S, causal);
                if (probs) {                                /* NULL where no backward will need P */
                    real *saved = probs + (head * L + i) * S;
                    for (index_t j = 0; j < saved_width; j++) saved[j] = p[r][j];
                    for (index_t j = saved_width; j < S; j++) saved[j] = 0;
                }
                if (threshold >= 0) {
                    const uint64_t start = (uint64_t)(head * L + i) * (uint64_t)S;
                    #pragma omp simd
                    for (index_t j = 0; j < n; j++)
                        p[r][j] *= keep_scale * dropout_keep(start + j, seed_low, seed_high, threshold);
                }
            }
            weighted_rows(rows, padded, 1, vh, layout[13], 0, n_block, Dv, 1, orow);
        }
    }
}

static void attention_backward(const real *q, const real *k, const real *v, const real *out, const real *probs,
                        const real *grad_out, real *grad_q, real *grad_k, real *grad_v, const index_t *layout,
                        index_t head_lo, index_t head_hi, real scale, int causal, uint64_t seed,
                        int32_t threshold, real keep_scale, real *scratch) {
    const index_t H = layout[0], L = layout[1], S = layout[2], D = layout[3], Dv = layout[4];
    const index_t padded = round_up(S, LANES), L_rows = round_up(L, ROWS);
    const uint32_t seed_low = (uint32_t)seed, seed_high = (uint32_t)(seed >> 32);
    real *vt = scratch, *ds = vt + Dv * padded, *attn = ds + L_rows * padded, *spare = attn + L_rows * padded;
    for (index_t head = head_lo; head < head_hi; head++) {
        const index_t b = head / H, h = head % H;
        const real *qh = q + b * layout[5] + h * layout[6];
        const real *kh = k + b * layout[8] + h * layout[9];
        const real *vh = v + b * layout[11] + h * layout[12];
        const real *oh = out + b * layout[14] + h * layout[15], *ph = probs + head * L * S;
        const real *doh = grad_out + b * layout[17] + h * layout[18];
        real *dqh = grad_q + b * layout[20] + h * layout[21], *dkh = grad_k + b * layout[23] + h * layout[24];
        real *dvh = grad_v + b * layout[26] + h * layout[27];
        const index_t o_row = layout[16], do_row = layout[19];
        transpose_padded(vh, layout[13], S, Dv, padded, vt);
        /* by query rows: dA, then dS and A, then dQ */
        for (index_t i0 = 0; i0 < L; i0 += ROWS) {
            const index_t count = L - i0 < ROWS ? L - i0 : ROWS;
            const real *dor[ROWS];
            real *dqr[ROWS];
            for (int r = 0; r < ROWS; r++) {
                const index_t i = i0 + (r < count ? r : count - 1);
                dor[r] = doh + i * do_row;
                dqr[r] = r < count ? dqh + i * layout[22] : spare;
            }
            const index_t n_block = visible_keys(i0 + count - 1, S, causal);
            products_with_columns(dor, vt, padded, Dv, round_up(n_block, LANES), 1, ds + i0 * padded, padded);
            for (index_t r = 0; r < ROWS; r++) {
                const index_t i = i0 + r, n = r < count ? visible_keys(i, S, causal) : 0;
                real *dsi = ds + i * padded, *ai = attn + i * padded;
                if (n > 0) {
                    const real *doi = doh + i * do_row, *oi = oh + i * o_row, *pi = ph + i * S;
                    const uint64_t start = (uint64_t)(head * L + i) * (uint64_t)S;
                    real delta = 0;
                    #pragma omp simd reduction(+:delta)
                    for (index_t d = 0; d < Dv; d++) delta += doi[d] * oi[d];
                    /* P is 0 past the visible keys: whole registers up to S cost less than a tail */
                    const index_t width = round_up(n, LANES) < S ? round_up(n, LANES) : S;
                    if (threshold >= 0) {
                        #pragma omp simd
                        for (index_t j = 0; j < width; j++) {
                            const real keep = keep_scale * dropout_keep(start + j, seed_low, seed_high, threshold);
                            ai[j] = pi[j] * keep;
                            dsi[j] = pi[j] * (dsi[j] * keep - delta) * scale;
                        }
                    } else {
                        #pragma omp simd
                        for (index_t j = 0; j < width; j++) {
                            ai[j] = pi[j];
                            dsi[j] = pi[j] * (dsi[j] - delta) * scale;
                        }
                    }
                }
                for (index_t j = n; j < padded; j++) dsi[j] = ai[j] = 0;
            }
            weighted_rows(ds + i0 * padded, padded, 1, kh, layout[10], 0, n_block, D, 1, dqr);
        }
        /* by key rows: dK = dS^T Q and dV = A^T dO, over the queries that see the keys */
        for (index_t j0 = 0; j0 < S; j0 += ROWS) {
            const index_t count = S - j0 < ROWS ? S - j0 : ROWS;
            real *dkr[ROWS], *dvr[ROWS];
            for (int r = 0; r < ROWS; r++) {
                dkr[r] = r < count ? dkh + (j0 + r) * layout[25] : spare;
                dvr[r] = r < count ? dvh + (j0 + r) * layout[28] : spare;
            }
            const index_t first = causal ? (j0 < L ? j0 : L) : 0;
            weighted_rows(ds + j0, 1, padded, qh, layout[7], first, L, D, 1, dkr);
            weighted_rows(attn + j0, 1, padded, doh, do_row, first, L, Dv, 1, dvr);
        }
    }
}

/* ---------------------------------------------------------------------------------------------------------
 * The threads: a small pool of this library's own, so that one kernel call splits its work among the cores
 * with a hand-off of microseconds (Python's threads need the interpreter's lock and a wake-up each, which
 * costs as much as a small op's whole work).
 *
 * run_parallel(threads, size, min_chunk, body, job) cuts [0, size) into parallel_chunks(...) chunks with
 * fixed bounds (chunk c: [c size / n, (c + 1) size / n)) and runs body(job, lo, hi, c) on each, the calling
 * thread and up to threads - 1 pool threads taking chunks from a shared counter. The bounds depend on the
 * size and the thread count alone, so a sum the caller adds up per chunk is the same on every run.
 * A pool thread spins for SPIN_NS (1 ms) after its last chunk, then sleeps until the next task: the next op
 * usually follows within microseconds, and a wake-up from sleep costs tens of them. One task runs at a time;
 * a call that finds the pool busy (another thread of the program) does its chunks itself, as does one whose
 * pool thread cannot be started. A forked child starts with an empty pool of its own (pthread_atfork).
 */
#define MAX_HELPERS 63
#define CHUNKS_PER_THREAD 2
#define SPIN_NS 1000000

typedef void (*chunk_body)(const void *job, index_t lo, index_t hi, index_t chunk);

static struct {
    pthread_mutex_t busy, sleep_lock;
    pthread_cond_t wake;
    int helpers;                            /* started */
    int sleepers;
    atomic_ulong generation;                /* one more per task */
    atomic_int open, joined;                /* the task's fields may be read while open; joined: readers */
    atomic_long next, done;                 /* chunks taken, chunks finished */
    chunk_body body;
    const void *job;
    index_t size, chunks;
    int takers;                             /* pool threads 0 .. takers - 1 take part */
} pool = {.busy = PTHREAD_MUTEX_INITIALIZER, .sleep_lock = PTHREAD_MUTEX_INITIALIZER,
            .wake = PTHREAD_COND_INITIALIZER};

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static inline int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static void take_chunks(void) {
    for (;;) {
        const long c = atomic_fetch_add(&pool.next, 1);
        if (c >= pool.chunks) return;
        pool.body(pool.job, c * pool.size / pool.chunks, (c + 1) * pool.size / pool.chunks, c);
        atomic_fetch_add(&pool.done, 1);
    }
}

static void *helper_main(void *arg) {
    const int id = (int)(intptr_t)arg;
    unsigned long seen = atomic_load(&pool.generation);
    for (;;) {
        const int64_t spin_until = now_ns() + SPIN_NS;
        unsigned spins = 0;
        while (atomic_load(&pool.generation) == seen) {
            cpu_relax();
            if (++spins % 256 == 0 && now_ns() > spin_until) {
                pthread_mutex_lock(&pool.sleep_lock);
                pool.sleepers++;
                while (atomic_load(&pool.generation) == seen) pthread_cond_wait(&pool.wake, &pool.sleep_lock);
                pool.sleepers--;
                pthread_mutex_unlock(&pool.sleep_lock);
            }
        }
        seen = atomic_load(&pool.generation);
        atomic_fetch_add(&pool.joined, 1);
        if (atomic_load(&pool.open) && id < pool.takers) take_chunks();
        atomic_fetch_sub(&pool.joined, 1);
    }
    return NULL;
}

/* per_thread chunks a thread, fewer where a chunk would hold less than min_chunk; more chunks than threads
 * only in a multiple of the threads, since equal chunks shared unequally leave a thread idle (3 chunks on 2
 * threads take as long as 4: one thread does two while the other does one) */
static index_t chunk_count(index_t size, index_t min_chunk, int threads, int per_thread) {
    if (threads <= 1 || size < 2 * min_chunk) return 1;
    const index_t n = size / (min_chunk > 0 ? min_chunk : 1), most = (index_t)threads * per_thread;
    if (n >= most) return most;
    return n > threads ? n / threads * threads : n;
}

index_t parallel_chunks(index_t size, index_t min_chunk, int threads) {
    return chunk_count(size, min_chunk, threads, CHUNKS_PER_THREAD);
}

/* the cores this process may run on: a pool thread beyond them spins against one that works. (The chunks'
 * bounds still follow the thread count asked for, so the sums are the same however many threads run.) */
static int usable_cores(void) {
#ifdef __linux__
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) return CPU_COUNT(&set);
#endif
    const long online = sysconf(_SC_NPROCESSORS_ONLN);
    return online > 0 ? (int)online : 1;
}

/* in a forked child the pool threads are gone and the locks may have been held by them: start afresh */
static void pool_after_fork_in_child(void) {
    pthread_mutex_init(&pool.busy, NULL);
    pthread_mutex_init(&pool.sleep_lock, NULL);
    pthread_cond_init(&pool.wake, NULL);
    pool.helpers = 0;
    pool.sleepers = 0;
    atomic_store(&pool.open, 0);
    atomic_store(&pool.joined, 0);
}

static pthread_once_t pool_fork_handler = PTHREAD_ONCE_INIT;

static void register_fork_handler(void) { pthread_atfork(NULL, NULL, pool_after_fork_in_child); }

static void run_parallel_chunks(int threads, index_t size, index_t min_chunk, int per_thread, chunk_body body,
                                const void *job) {
    const index_t chunks = chunk_count(size, min_chunk, threads, per_thread);
    int wanted = threads - 1 < chunks - 1 ? threads - 1 : (int)(chunks - 1);
    const int cores = usable_cores();
    wanted = wanted > cores - 1 ? cores - 1 : wanted;         /* more would only spin on a busy core */
    wanted = wanted > MAX_HELPERS ? MAX_HELPERS : wanted;
    if (wanted <= 0 || pthread_mutex_trylock(&pool.busy) != 0) {
        for (index_t c = 0; c < chunks; c++) body(job, c * size / chunks, (c + 1) * size / chunks, c);
        return;
    }
    pthread_once(&pool_fork_handler, register_fork_handler);
    while (pool.helpers < wanted) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        const int failed = pthread_create(&t, &attr, helper_main, (void *)(intptr_t)pool.helpers);
        pthread_attr_destroy(&attr);
        if (failed) break;
        pool.helpers++;
    }
    pool.body = body;
    pool.job = job;
    pool.size = size;
    pool.chunks = chunks;
    pool.takers = wanted;
    atomic_store(&pool.next, 0);
    atomic_store(&pool.done, 0);
    atomic_store(&pool.open, 1);
    atomic_fetch_add(&pool.generation, 1);
    pthread_mutex_lock(&pool.sleep_lock);
    if (pool.sleepers > 0) pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.sleep_lock);
    take_chunks();
    while (atomic_load(&pool.done) < chunks) cpu_relax();      /* the pool threads' last chunks */
    atomic_store(&pool.open, 0);
    while (atomic_load(&pool.joined) > 0) cpu_relax();        /* nobody reads the task's fields any more */
    pthread_mutex_unlock(&pool.busy);
}

static void run_parallel(int threads, index_t size, index_t min_chunk, chunk_body body, const void *job) {
    run_parallel_chunks(threads, size, min_chunk, CHUNKS_PER_THREAD, body, job);
}

/* ---------------------------------------------------------------------------------------------------------
 * The kernels above, each cut into chunks on the pool: *_parallel(..., threads, min_chunk) */

typedef struct { const real *x, *grad; real *out; int tanh_form; } gelu_job;

static void gelu_forward_chunk(const void *job, index_t lo, index_t hi, index_t chunk) {
    const gelu_job *j = job;
    gelu_forward(j->x + lo, j->out + lo, hi - lo, j->tanh_form);
}

static void gelu_backward_chunk(const void *job, index_t lo, index_t hi, index_t chunk) {
    const gelu_job *j = job;
    gelu_backward(j->x + lo, j->grad + lo, j->out + lo, hi - lo, j->tanh_form);
}

void gelu_forward_parallel(const real *x, real *out, index_t n, int tanh_form, int threads, index_t min_chunk) {
    const gelu_job job = {x, NULL, out, tanh_form};
    run_parallel(threads, n, min_chunk, gelu_forward_chunk, &job);
}

void gelu_backward_parallel(const real *x, const real *grad, real *grad_x, index_t n, int tanh_form, int threads,
                            index_t min_chunk) {
    const gelu_job job = {x, grad, grad_x, tanh_form};
    run_parallel(threads, n, min_chunk, gelu_backward_chunk, &job);
}

typedef struct {
    const real *x, *w, *b, *mean_in, *rstd_in, *grad;
    real *out, *mean, *rstd, *grad_w, *grad_b;          /* grad_w, grad_b: (chunks, C), one row per chunk */
    index_t C;
    real eps;
} layer_norm_job;

static void layer_norm_forward_chunk(const void *job, index_t lo, index_t hi, index_t chunk) {
    const layer_norm_job *j = job;
    layer_norm_forward(j->x + lo * j->C, j->w, j->b, j->out + lo * j->C, j->mean + lo, j->rstd + lo, hi - lo,
                       j->C, j->eps);
}

static void layer_norm_backward_chunk(const void *job, index_t lo, index_t hi, index_t chunk) {
    const layer_norm_job *j = job;
    layer_norm_backward(j->x + lo * j->C, j->w, j->mean_in + lo, j->rstd_in + lo, j->grad + lo * j->C,
                        j->out ? j->out + lo * j->C : NULL, j->grad_w ? j->grad_w + chunk * j->C : NULL,
                        j->grad_b ? j->grad_b + chunk * j->C : NULL, hi - lo, j->C);
}

void layer_norm_forward_parallel(const real *x, const real *w, const real *b, real *out, real *mean, real *rstd,
                                 index_t rows, index_t C, real eps, int threads, index_t min_rows) {
    const layer_norm_job job = {x, w, b, NULL, NULL, NULL, out, mean, rstd, NULL, NULL, C, eps};
    run_parallel(threads, rows, min_rows, layer_norm_forward_chunk, &job);
}

/* grad_w, grad_b (either may be NULL): (parallel_chunks(rows, min_rows, threads), C) of zeros, each chunk's
 * sums in its own row, for the caller to add up in order */
void layer_norm_backward_parallel(const real *x, const real *w, const real *mean, const real *rstd,
                                  const real *grad, real *grad_x, real *grad_w, real *grad_b, index_t rows,
                                  index_t C, int threads, index_t min_rows) {
    const layer_norm_job job = {x, w, NULL, mean, rstd, grad, grad_x, NULL, NULL, grad_w, grad_b, C, 0};
    run_parallel(threads, rows, min_rows, layer_norm_backward_chunk, &job);
}

typedef struct { const real *z, *row_scale; real *logsumexp, *grad_z; index_t V; } softmax_job;

static void logsumexp_chunk(const void *job, index_t lo, index_t hi, index_t chunk) {
    const softmax_job *j = job;
    logsumexp_rows(j->z + lo * j->V, j->logsumexp + lo, hi - lo, j->V);
}

static void softmax_scaled_chunk(const void *job, index_t lo, index_t hi, index_t chunk) {
    const softmax_job *j = job;
    softmax_scaled_rows(j->z + lo * j->V, j->logsumexp + lo, j->row_scale + lo, j->grad_z + lo * j->V, hi - lo,
                        j->V);
}

void logsumexp_rows_parallel(const real *z, real *logsumexp, index_t rows, index_t V, int threads,
                             index_t min_rows) {
    const softmax_job job = {z, NULL, logsumexp, NULL, V};
    run_parallel(threads, rows, min_rows, logsumexp_chunk, &job);
}

void softmax_scaled_rows_parallel(const real *z, const real *logsumexp, const real *row_scale, real *grad_z,
                                  index_t rows, index_t V, int threads, index_t min_rows) {
    const softmax_job job = {z, row_scale, (real *)logsumexp, grad_z, V};
    run_parallel(threads, rows, min_rows, softmax_scaled_chunk, &job);
}

typedef struct { const real *x; real *out; uint64_t seed; int32_t threshold; real scale; } dropout_job;

static void dropout_chunk(const void *job, index_t lo, index_t hi, index_t chunk) {
    const dropout_job *j = job;
    dropout_hashed(j->x + lo, j->out + lo, lo, hi - lo, j->seed, j->threshold, j->scale);
}

void dropout_hashed_parallel(const real *x, real *out, index_t n, uint64_t seed, int32_t threshold, real scale,
                             int threads, index_t min_chunk) {
    const dropout_job job = {x, out, seed, threshold, scale};
    run_parallel(threads, n, min_chunk, dropout_chunk, &job);
}

typedef struct {
    const real *q, *k, *v, *out, *probs, *grad_out;
    real *out_w, *probs_w, *grad_q, *grad_k, *grad_v;
    const index_t *layout;
    real scale, keep_scale;
    int causal;
    uint64_t seed;
    int32_t threshold;
    atomic_int *failures;
} attention_job;

/* each chunk of heads takes its scratch from the heap (tens of KB); a failed allocation leaves its heads
 * undone and is counted in the job's failures, which the caller turns into MemoryError */

static void attention_forward_chunk(const void *job, index_t lo, index_t hi, index_t chunk) {
    const attention_job *j = job;
    const index_t *l = j->layout;
    real *scratch = malloc(sizeof(real) * attention_scratch_size(l[1], l[2], l[3], l[4], 0));
    if (!scratch) { atomic_fetch_add(j->failures, 1); return; }
    attention_forward(j->q, j->k, j->v, j->out_w, j->probs_w, l, lo, hi, j->scale, j->causal, j->seed,
                      j->threshold, j->keep_scale, scratch);
    free(scratch);
}

static void attention_backward_chunk(const void *job, index_t lo, index_t hi, index_t chunk) {
    const attention_job *j = job;
    const index_t *l = j->layout;
    real *scratch = malloc(sizeof(real) * attention_scratch_size(l[1], l[2], l[3], l[4], 1));
    if (!scratch) { atomic_fetch_add(j->failures, 1); return; }
    attention_backward(j->q, j->k, j->v, j->out, j->probs, j->grad_out, j->grad_q, j->grad_k, j->grad_v, l, lo,
                       hi, j->scale, j->causal, j->seed, j->threshold, j->keep_scale, scratch);
    free(scratch);
}

/* returns 0, or -1 where scratch memory could not be had */
int attention_forward_parallel(const real *q, const real *k, const real *v, real *out, real *probs,
                               const index_t *layout, index_t heads, real scale, int causal, uint64_t seed,
                               int32_t threshold, real keep_scale, int threads, index_t min_heads) {
    atomic_int failures = 0;
    const attention_job job = {q, k, v, NULL, NULL, NULL, out, probs, NULL, NULL, NULL, layout, scale, keep_scale,
                               causal, seed, threshold, &failures};
    run_parallel(threads, heads, min_heads, attention_forward_chunk, &job);
    return atomic_load(&failures) ? -1 : 0;
}

int attention_backward_parallel(const real *q, const real *k, const real *v, const real *out, const real *probs,
                                const real *grad_out, real *grad_q, real *grad_k, real *grad_v,
                                const index_t *layout, index_t heads, real scale, int causal, uint64_t seed,
                                int32_t threshold, real keep_scale, int threads, index_t min_heads) {
    atomic_int failures = 0;
    const attention_job job = {q, k, v, out, probs, grad_out, NULL, NULL, grad_q, grad_k, grad_v, layout, scale,
                               keep_scale, causal, seed, threshold, &failures};
    run_parallel(threads, heads, min_heads, attention_backward_chunk, &job);
    return atomic_load(&failures) ? -1 : 0;
}

/* ---------------------------------------------------------------------------------------------------------
 * Matrix products of npgpt's own: C (M, N) = op(A) (M, K) op(B) (K, N), row-major, on one thread.
 *   C[i][j] = sum_k op(A)[i][k] op(B)[k][j]   (each depth slice's sum from 0, then added to C)
 * Used instead of the BLAS's for float on Intel CPUs with 512-bit vectors (own_product_available), where it
 * was measured 5-15% faster than OpenBLAS's on a transformer's products (K and C's columns of a few hundred
 * to a few thousand); elsewhere the BLAS's products run. It is Goto's blocking, as in BLIS and OpenBLAS, in
 * three levels:
 *   - K in slices of PRODUCT_DEPTH and N in slices of PRODUCT_COLUMNS. A slice of B is copied ("packed") into
 *     panels of PANEL_COLUMNS columns (two registers), each panel's rows one after another, so that the
 *     kernel reads a panel as one stream; the packed slice (1 MB) stays in the core's L2 cache.
 *   - C's rows, PANEL_ROWS at a time: their PANEL_ROWS x PRODUCT_DEPTH values of A (24 KB in float) stay in
 *     the L1 cache while every panel of B's slice passes them. Where A's rows lie along K they are read in
 *     place; A transposed is packed A_BLOCK_ROWS rows at a time, read along its rows (a k each), into panels
 *     that hold each k's PANEL_ROWS values side by side.
 *   - the kernel, product_block: a (PANEL_ROWS, PANEL_COLUMNS) block of C in 24 registers of sums; at each
 *     k, two registers of B's panel and PANEL_ROWS broadcast values of A make 24 multiply-adds.
 * Each element of C is one sum in a fixed order of k (the depth slices in turn, each from its first k up)
 * whichever block or thread makes it, so its bits do not depend on how C is split among threads.
 */
#define PANEL_ROWS 12
#define PANEL_COLUMNS (2 * LANES)
#define PRODUCT_DEPTH 512
#define PRODUCT_COLUMNS ((index_t)(1 << 20) / (PRODUCT_DEPTH * (index_t)sizeof(real)))
#define A_BLOCK_ROWS (8 * PANEL_ROWS)
/* Packed panels lie a cache line further apart than their size: panels a multiple of 4 KB apart, written a
 * k at a time, would all fall in the same few sets of the L1 cache, and their stores would seem to overlap
 * the loads that follow them (the CPU compares the addresses' last 12 bits). */
#define PANEL_GAP ((index_t)(64 / sizeof(real)))
static inline index_t a_panel_size(index_t depth) { return depth * PANEL_ROWS + PANEL_GAP; }
static inline index_t b_panel_size(index_t depth) { return depth * PANEL_COLUMNS + PANEL_GAP; }

int own_product_available(void) {
#if defined(__AVX512F__)
    return !IS_DOUBLE && __builtin_cpu_is("intel");
#else
    return 0;
#endif
}

/* c (rows, cols) [+]= a (rows, depth) b_panel (depth, PANEL_COLUMNS): a's value (i, k) at a[i * a_row_step +
 * k * a_depth_step]; the panel's columns past `cols` are zeros, and their sums are not stored. */
INLINE void product_block(index_t depth, const real *a, index_t a_row_step, index_t a_depth_step,
                          const real *b_panel, real *c, index_t ldc, index_t rows, index_t cols, int add_to_c) {
    vec sum[PANEL_ROWS][2];
    #pragma GCC unroll 16
    for (int i = 0; i < PANEL_ROWS; i++) sum[i][0] = sum[i][1] = (vec){0};
    for (index_t k = 0; k < depth; k++) {
        vec b0 = LOAD(b_panel + k * PANEL_COLUMNS), b1 = LOAD(b_panel + k * PANEL_COLUMNS + LANES);
        IN_REGISTER(b0);
        IN_REGISTER(b1);
        #pragma GCC unroll 16
        for (int i = 0; i < PANEL_ROWS; i++) {
            const real a_ik = a[i * a_row_step + k * a_depth_step];
            sum[i][0] += a_ik * b0;
            sum[i][1] += a_ik * b1;
        }
    }
    if (rows == PANEL_ROWS && cols == PANEL_COLUMNS) {
        #pragma GCC unroll 16
        for (int i = 0; i < PANEL_ROWS; i++) {
            real *ci = c + i * ldc;
            if (add_to_c) {
                sum[i][0] += LOAD(ci);
                sum[i][1] += LOAD(ci + LANES);
            }
            STORE(ci, sum[i][0]);
            STORE(ci + LANES, sum[i][1]);
        }
        return;
    }
    real block[PANEL_ROWS][PANEL_COLUMNS];
    #pragma GCC unroll 16
    for (int i = 0; i < PANEL_ROWS; i++) {
        STORE(block[i], sum[i][0]);
        STORE(block[i] + LANES, sum[i][1]);
    }
    for (index_t i = 0; i < rows; i++)
        for (index_t j = 0; j < cols; j++) c[i * ldc + j] = add_to_c ? c[i * ldc + j] + block[i][j] : block[i][j];
}

/* Two instances of the kernel: A read in place (its rows along K), and A packed (a k's values side by side) */
static void product_block_in_place(index_t depth, const real *a, index_t lda, const real *b_panel, real *c,
                                   index_t ldc, index_t cols, int add_to_c) {
    product_block(depth, a, lda, 1, b_panel, c, ldc, PANEL_ROWS, cols, add_to_c);
}

static void product_block_packed(index_t depth, const real *a_panel, const real *b_panel, real *c, index_t ldc,
                                 index_t rows, index_t cols, int add_to_c) {
    product_block(depth, a_panel, 1, PANEL_ROWS, b_panel, c, ldc, rows, cols, add_to_c);
}

/* op(A)'s value (i, k): A transposed holds it at a[k * lda + i], else at a[i * lda + k] */
static inline real a_value(int trans_a, const real *a, index_t lda, index_t i, index_t k) {
    return trans_a ? a[k * lda + i] : a[i * lda + k];
}

/* out = op(A)'s rows (rows, depth) as panels of PANEL_ROWS rows, a_panel_size(depth) apart: row i0 + i of
 * panel i0 / PANEL_ROWS holds its value at k in the panel's [k * PANEL_ROWS + i], the last panel's rows past
 * `rows` zero. A transposed is read along its rows (a k each), its whole panels' values a memcpy each. */
static void pack_a_block(int trans_a, const real *a, index_t lda, index_t rows, index_t depth, real *out) {
    const index_t whole = trans_a ? rows / PANEL_ROWS * PANEL_ROWS : 0;
    for (index_t k = 0; k < depth; k++)
        for (index_t i0 = 0; i0 < whole; i0 += PANEL_ROWS)
            memcpy(out + i0 / PANEL_ROWS * a_panel_size(depth) + k * PANEL_ROWS, a + k * lda + i0,
                   PANEL_ROWS * sizeof(real));
    for (index_t i0 = whole; i0 < rows; i0 += PANEL_ROWS) {
        real *panel = out + i0 / PANEL_ROWS * a_panel_size(depth);
        for (index_t k = 0; k < depth; k++)
            for (index_t i = 0; i < PANEL_ROWS; i++)
                panel[k * PANEL_ROWS + i] = i0 + i < rows ? a_value(trans_a, a, lda, i0 + i, k) : 0;
    }
}

/* op(B)'s value (k, j): B transposed holds it at b[j * ldb + k], else at b[k * ldb + j] */
static inline real b_value(int trans_b, const real *b, index_t ldb, index_t k, index_t j) {
    return trans_b ? b[j * ldb + k] : b[k * ldb + j];
}

/* out = the slice op(B) (depth, cols) as panels of PANEL_COLUMNS columns, b_panel_size(depth) apart: column
 * j0 + j of panel j0 / PANEL_COLUMNS holds its value at k in the panel's [k * PANEL_COLUMNS + j], the last
 * panel's columns past `cols` zero. B is read along its rows (B transposed: its rows gathered). */
static void pack_b_slice(int trans_b, const real *b, index_t ldb, index_t cols, index_t depth, real *out) {
    const index_t whole = cols / PANEL_COLUMNS * PANEL_COLUMNS;
    if (!trans_b)
        for (index_t k = 0; k < depth; k++)
            for (index_t j0 = 0; j0 < whole; j0 += PANEL_COLUMNS)
                memcpy(out + j0 / PANEL_COLUMNS * b_panel_size(depth) + k * PANEL_COLUMNS, b + k * ldb + j0,
                       PANEL_COLUMNS * sizeof(real));
    else
        for (index_t j0 = 0; j0 < whole; j0 += PANEL_COLUMNS) {
            real *panel = out + j0 / PANEL_COLUMNS * b_panel_size(depth);
#if defined(__AVX512F__)
            if (!IS_DOUBLE && PANEL_COLUMNS == 32 && ldb <= INT32_MAX / 32) {
                /* a k's 32 values are 16 + 16 of B's rows, each 16 one gather: rows j0 .. j0 + 15 at k, then
                 * j0 + 16 .. j0 + 31 */
                const __m512i row_offsets = _mm512_mullo_epi32(
                    _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                    _mm512_set1_epi32((int)ldb));
                const float *rows_first = (const float *)b + j0 * ldb, *rows_second = rows_first + 16 * ldb;
                for (index_t k = 0; k < depth; k++) {
                    _mm512_storeu_ps((float *)panel + k * 32, _mm512_i32gather_ps(row_offsets, rows_first + k, 4));
                    _mm512_storeu_ps((float *)panel + k * 32 + 16,
                                     _mm512_i32gather_ps(row_offsets, rows_second + k, 4));
                }
                continue;
            }
#endif
            for (index_t k = 0; k < depth; k++)
                #pragma GCC unroll 32
                for (index_t j = 0; j < PANEL_COLUMNS; j++) panel[k * PANEL_COLUMNS + j] = b[(j0 + j) * ldb + k];
        }
    if (whole < cols) {
        real *panel = out + whole / PANEL_COLUMNS * b_panel_size(depth);
        for (index_t k = 0; k < depth; k++)
            for (index_t j = 0; j < PANEL_COLUMNS; j++)
                panel[k * PANEL_COLUMNS + j] = whole + j < cols ? b_value(trans_b, b, ldb, k, whole + j) : 0;
    }
}

/* Each thread's packing space (1.2 MB in float), allocated at its first product; a calling thread's is freed
 * when it exits, the pool's threads keep theirs for the life of the process */
#define PACKING_REALS (PRODUCT_COLUMNS / PANEL_COLUMNS * b_panel_size(PRODUCT_DEPTH) + \
                       A_BLOCK_ROWS / PANEL_ROWS * a_panel_size(PRODUCT_DEPTH))
static pthread_key_t packing_key;
static pthread_once_t packing_key_once = PTHREAD_ONCE_INIT;
static void make_packing_key(void) { pthread_key_create(&packing_key, free); }

static real *packing_space(void) {
    pthread_once(&packing_key_once, make_packing_key);
    real *space = pthread_getspecific(packing_key);
    if (!space) {
        space = aligned_alloc(64, PACKING_REALS * sizeof(real));
        if (space && pthread_setspecific(packing_key, space) != 0) {
            free(space);
            space = NULL;
        }
    }
    return space;
}

/* C = op(A) op(B) as above; -1 (C untouched) where the thread's packing space cannot be allocated */
static int own_product(int trans_a, int trans_b, index_t M, index_t N, index_t K, const real *A, index_t lda,
                       const real *B, index_t ldb, real *C, index_t ldc) {
    if (K == 0) {                   /* an empty sum: zeros, as the BLAS writes them */
        for (index_t i = 0; i < M; i++)
            for (index_t j = 0; j < N; j++) C[i * ldc + j] = 0;
        return 0;
    }
    real *space = packing_space();
    if (!space) return -1;
    real *b_slice = space, *a_block = space + PRODUCT_COLUMNS / PANEL_COLUMNS * b_panel_size(PRODUCT_DEPTH);
    for (index_t j0 = 0; j0 < N; j0 += PRODUCT_COLUMNS) {
        const index_t cols = N - j0 < PRODUCT_COLUMNS ? N - j0 : PRODUCT_COLUMNS;
        for (index_t p = 0; p < K; p += PRODUCT_DEPTH) {
            const index_t depth = K - p < PRODUCT_DEPTH ? K - p : PRODUCT_DEPTH;
            pack_b_slice(trans_b, trans_b ? B + j0 * ldb + p : B + p * ldb + j0, ldb, cols, depth, b_slice);
            for (index_t i0 = 0; i0 < M; i0 += A_BLOCK_ROWS) {
                const index_t block_rows = M - i0 < A_BLOCK_ROWS ? M - i0 : A_BLOCK_ROWS;
                const real *a = trans_a ? A + p * lda + i0 : A + i0 * lda + p;
                /* A's rows along K are read in place, all but a last panel of fewer than PANEL_ROWS */
                const index_t in_place = trans_a ? 0 : block_rows / PANEL_ROWS * PANEL_ROWS;
                if (in_place < block_rows)
                    pack_a_block(trans_a, trans_a ? a : a + in_place * lda, lda, block_rows - in_place, depth,
                                 a_block);
                for (index_t i = 0; i < block_rows; i += PANEL_ROWS) {
                    const index_t rows = block_rows - i < PANEL_ROWS ? block_rows - i : PANEL_ROWS;
                    for (index_t j = 0; j < cols; j += PANEL_COLUMNS) {
                        const index_t width = cols - j < PANEL_COLUMNS ? cols - j : PANEL_COLUMNS;
                        const real *b_panel = b_slice + j / PANEL_COLUMNS * b_panel_size(depth);
                        real *c = C + (i0 + i) * ldc + j0 + j;
                        if (i < in_place)
                            product_block_in_place(depth, a + i * lda, lda, b_panel, c, ldc, width, p > 0);
                        else
                            product_block_packed(depth, a_block + (i - in_place) / PANEL_ROWS * a_panel_size(depth),
                                                 b_panel, c, ldc, rows, width, p > 0);
                    }
                }
            }
        }
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------------------------
 * Matrix products on the pool: C = op(A) op(B) (+ bias on each row), row-major, by own_product or the BLAS
 * NumPy loaded, called on each thread for its own block of C's rows (or columns, where C is wide and short),
 * with BLAS itself at one thread meanwhile (the caller's scope). One set of threads then does all of a
 * step's work: no BLAS threads are left spinning while the pool's run the next op.
 * `gemm` is NULL for own_product, else the address of cblas_sgemm or cblas_dgemm (matching REAL) with 64-bit
 * (int64 = 1) or 32-bit integers. The entry points return -1 where own_product found no packing space.
 */
typedef void (*gemm64_fn)(int, int, int, int64_t, int64_t, int64_t, real, const real *, int64_t, const real *,
                          int64_t, real, real *, int64_t);
typedef void (*gemm32_fn)(int, int, int, int32_t, int32_t, int32_t, real, const real *, int32_t, const real *,
                          int32_t, real, real *, int32_t);
enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };

typedef struct {
    void *gemm;
    int int64, trans_a, trans_b, by_columns;
    index_t M, N, K, lda, ldb, ldc;
    const real *A, *B, *bias;
    real *C;
    atomic_int *failures;       /* blocks whose own_product found no packing space */
} gemm_job;

static void gemm_block(const gemm_job *j, index_t M, index_t N, const real *A, const real *B, real *C) {
    const int ta = j->trans_a ? TRANS : NO_TRANS, tb = j->trans_b ? TRANS : NO_TRANS;
    if (M == 0 || N == 0) return;
    if (!j->gemm) {
        if (own_product(j->trans_a, j->trans_b, M, N, j->K, A, j->lda, B, j->ldb, C, j->ldc) < 0)
            atomic_fetch_add(j->failures, 1);
    } else if (j->int64)
        ((gemm64_fn)j->gemm)(ROW_MAJOR, ta, tb, M, N, j->K, 1, A, j->lda, B, j->ldb, 0, C, j->ldc);
    else
        ((gemm32_fn)j->gemm)(ROW_MAJOR, ta, tb, (int32_t)M, (int32_t)N, (int32_t)j->K, 1, A, (int32_t)j->lda, B,
                             (int32_t)j->ldb, 0, C, (int32_t)j->ldc);
}

static void gemm_chunk(const void *job, index_t lo, index_t hi, index_t chunk) {
    const gemm_job *j = job;
    index_t r0 = 0, r1 = j->M, c0 = 0, c1 = j->N;
    if (j->by_columns) {
        c0 = lo, c1 = hi;
        gemm_block(j, j->M, hi - lo, j->A, j->trans_b ? j->B + lo * j->ldb : j->B + lo, j->C + lo);
    } else {
        r0 = lo, r1 = hi;
        gemm_block(j, hi - lo, j->N, j->trans_a ? j->A + lo : j->A + lo * j->lda, j->B, j->C + lo * j->ldc);
    }
    if (j->bias)
        for (index_t r = r0; r < r1; r++) {
            real *row = j->C + r * j->ldc;
            #pragma omp simd
            for (index_t c = c0; c < c1; c++) row[c] += j->bias[c];
        }
}

/* C (M, N) = op(A) (M, K) op(B) (K, N) [+ bias (N,)]: rows of C split among the threads, or its columns
 * where it has fewer rows than columns; blocks of at least min_block rows (columns). */
int gemm_parallel(void *gemm, int int64, int trans_a, int trans_b, index_t M, index_t N, index_t K,
                  const real *A, index_t lda, const real *B, index_t ldb, real *C, index_t ldc, const real *bias,
                  int threads, index_t min_block) {
    const int by_columns = N > M;
    atomic_int failures = 0;
    const gemm_job job = {gemm, int64, trans_a, trans_b, by_columns, M, N, K, lda, ldb, ldc, A, B, bias, C,
                          &failures};
    run_parallel_chunks(threads, by_columns ? N : M, min_block, 1, gemm_chunk, &job);
    return atomic_load(&failures) ? -1 : 0;
}

/* Two products at once, of equal work (a linear's dx = dy W and dW = dy^T x): with an even number of
 * threads, each cut into threads / 2 blocks as gemm_parallel cuts one, so that with two threads each thread
 * makes one whole product (a larger, faster call to the BLAS than half of each, and one hand-off for both).
 * desc: for each product, its trans_a, trans_b, M, N, K, A, lda, B, ldb, C, ldc (11 integers, addresses
 * included). */
typedef struct { gemm_job product[2]; index_t blocks[2]; } gemm_pair_job;

static void gemm_pair_chunk(const void *job, index_t lo, index_t hi, index_t chunk) {
    const gemm_pair_job *j = job;
    for (index_t c = lo; c < hi; c++) {
        const int p = c >= j->blocks[0];
        const gemm_job *g = &j->product[p];
        const index_t block = c - (p ? j->blocks[0] : 0), n = j->blocks[p], size = g->by_columns ? g->N : g->M;
        gemm_chunk(g, block * size / n, (block + 1) * size / n, 0);
    }
}

int gemm_pair_parallel(void *gemm, int int64, const int64_t *desc, int threads, index_t min_block) {
    gemm_pair_job job;
    atomic_int failures = 0;
    for (int p = 0; p < 2; p++) {
        const int64_t *d = desc + 11 * p;
        const gemm_job g = {gemm, int64, (int)d[0], (int)d[1], d[3] > d[2], d[2], d[3], d[4], d[6], d[8], d[10],
                            (const real *)(uintptr_t)d[5], (const real *)(uintptr_t)d[7], NULL,
                            (real *)(uintptr_t)d[9], &failures};
        job.product[p] = g;
        job.blocks[p] = chunk_count(g.by_columns ? g.N : g.M, min_block, threads / 2 > 0 ? threads / 2 : 1, 1);
    }
    const index_t total = job.blocks[0] + job.blocks[1];
    run_parallel_chunks(threads, total, 1, (int)total, gemm_pair_chunk, &job);
    return atomic_load(&failures) ? -1 : 0;
}

/* ---------------------------------------------------------------------------------------------------------
 * Products with few rows: out (M, N) = x (M, K) W^T [+ bias (N,)], W (N, K) with rows at stride ldw, for M
 * of a few rows (generation: one new position a sequence).
 *   out[m][n] = sum_k x[m][k] W[n][k] (+ bias[n]):  LANES partial sums along k, then those added together
 * Here each element of W is used M times, so the product is bound by reading W from memory, not by its
 * multiply-adds, and the BLAS's blocking for reuse buys nothing. W is read once, ROWS of its rows at a time,
 * each row block against every row of x while it is in the L1 cache; the threads split W's rows. Each
 * element of out is one thread's sum in a fixed order, so the result does not depend on the thread count. */
static inline real sum_lanes(vec v) {
#if defined(__AVX512F__)     /* in registers, by the compiler's shuffles: the generic loop below goes through memory */
    return IS_DOUBLE ? (real)_mm512_reduce_add_pd((__m512d)v) : (real)_mm512_reduce_add_ps((__m512)v);
#else
    real sum = 0;
    for (index_t l = 0; l < LANES; l++) sum += v[l];
    return sum;
#endif
}

static void few_rows_product(const real *x, index_t ldx, const real *W, index_t ldw, const real *bias, real *out,
                             index_t ldo, index_t M, index_t K, index_t n_lo, index_t n_hi) {
    _Static_assert(ROWS == 4, "the row block below is written out for 4 rows");
    const index_t whole = K / LANES * LANES;
    index_t n = n_lo;
    for (; n + ROWS <= n_hi; n += ROWS) {
        const real *w0 = W + n * ldw, *w1 = w0 + ldw, *w2 = w1 + ldw, *w3 = w2 + ldw;
        for (index_t m = 0; m < M; m++) {
            const real *xm = x + m * ldx;
            vec s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
            for (index_t k = 0; k < whole; k += LANES) {
                const vec xv = LOAD(xm + k);
                s0 += LOAD(w0 + k) * xv;
                s1 += LOAD(w1 + k) * xv;
                s2 += LOAD(w2 + k) * xv;
                s3 += LOAD(w3 + k) * xv;
            }
            real s[ROWS] = {sum_lanes(s0), sum_lanes(s1), sum_lanes(s2), sum_lanes(s3)};
            for (int r = 0; r < ROWS; r++) {
                for (index_t k = whole; k < K; k++) s[r] += xm[k] * w0[r * ldw + k];
                out[m * ldo + n + r] = bias ? s[r] + bias[n + r] : s[r];
            }
        }
    }
    for (; n < n_hi; n++)
        for (index_t m = 0; m < M; m++) {
            const real *xm = x + m * ldx, *wn = W + n * ldw;
            vec sum = {0};
            for (index_t k = 0; k < whole; k += LANES) sum += LOAD(wn + k) * LOAD(xm + k);
            real s = sum_lanes(sum);
            for (index_t k = whole; k < K; k++) s += xm[k] * wn[k];
            out[m * ldo + n] = bias ? s + bias[n] : s;
        }
}

typedef struct { const real *x, *W, *bias; real *out; index_t ldx, ldw, ldo, M, K; } few_rows_job;

static void few_rows_chunk(const void *job, index_t lo, index_t hi, index_t chunk) {
    const few_rows_job *j = job;
    few_rows_product(j->x, j->ldx, j->W, j->ldw, j->bias, j->out, j->ldo, j->M, j->K, lo, hi);
}

/* W's rows cut into chunks of at least min_rows */
void few_rows_product_parallel(const real *x, index_t ldx, const real *W, index_t ldw, const real *bias,
                               real *out, index_t ldo, index_t M, index_t N, index_t K, int threads,
                               index_t min_rows) {
    const few_rows_job job = {x, W, bias, out, ldx, ldw, ldo, M, K};
    run_parallel(threads, N, min_rows, few_rows_chunk, &job);
}

/* out[:width] = sum_{j < n} w[j] y[j * y_stride + :width]: two registers of columns at a time, even and odd
 * j summed apart (four chains of multiply-adds in flight, not one waiting on the last) */
static void weighted_sum(const real *w, const real *y, index_t y_stride, index_t n, index_t width, real *out) {
    index_t d = 0;
    for (; d + LANES <= width; d += 2 * LANES) {
        const int regs = d + 2 * LANES <= width ? 2 : 1;
        vec even[2] = {{0}, {0}}, odd[2] = {{0}, {0}};
        index_t j = 0;
        for (; j + 2 <= n; j += 2)
            for (int c = 0; c < regs; c++) {
                even[c] += w[j] * LOAD(y + j * y_stride + d + c * LANES);
                odd[c] += w[j + 1] * LOAD(y + (j + 1) * y_stride + d + c * LANES);
            }
        for (; j < n; j++)
            for (int c = 0; c < regs; c++) even[c] += w[j] * LOAD(y + j * y_stride + d + c * LANES);
        for (int c = 0; c < regs; c++) STORE(out + d + c * LANES, even[c] + odd[c]);
    }
    for (d = width / LANES * LANES; d < width; d++) {
        real sum = 0;
        for (index_t j = 0; j < n; j++) sum += w[j] * y[j * y_stride + d];
        out[d] = sum;
    }
}

/* ---------------------------------------------------------------------------------------------------------
 * Attention for a few new queries against a KV cache (generation): Q (B, H, L, D) the new positions, K and V
 * (B, H, S, D) every position so far (the new ones last), out (B, H, L, Dv):
 *   query i is position S - L + i and sees keys 0 .. S - L + i (the causal rule; all S where L = 1)
 *   s_j = scale q_i . k_j;  p = softmax(s);  o_i = sum_j p_j v_j
 * The scores are few_rows_product's dot products (the keys are its W); no probabilities are kept (there is
 * no backward: generation records no graph). `layout`: H, L, S, D, Dv, then the strides in elements along B,
 * H and the rows of Q, K, V and out. Heads head_lo .. head_hi - 1; scratch holds S reals. */
static void attention_cached(const real *q, const real *k, const real *v, real *out, const index_t *layout,
                             index_t head_lo, index_t head_hi, real scale, real *scores) {
    const index_t H = layout[0], L = layout[1], S = layout[2], D = layout[3], Dv = layout[4];
    const index_t *qs = layout + 5, *ks = layout + 8, *vs = layout + 11, *os = layout + 14;
    for (index_t head = head_lo; head < head_hi; head++) {
        const index_t b = head / H, h = head % H;
        const real *qh = q + b * qs[0] + h * qs[1], *kh = k + b * ks[0] + h * ks[1], *vh = v + b * vs[0] + h * vs[1];
        real *oh = out + b * os[0] + h * os[1];
        for (index_t i = 0; i < L; i++) {
            const index_t visible = S - L + i + 1;
            few_rows_product(qh + i * qs[2], 0, kh, ks[2], NULL, scores, 0, 1, D, 0, visible);
            for (index_t j = 0; j < visible; j++) scores[j] *= scale;
            softmax_row_in_place(scores, visible);
            weighted_sum(scores, vh, vs[2], visible, Dv, oh + i * os[2]);
        }
    }
}

typedef struct { const real *q, *k, *v; real *out; const index_t *layout; real scale; atomic_int *failures; }
    cached_attention_job;

static void attention_cached_chunk(const void *job, index_t lo, index_t hi, index_t chunk) {
    const cached_attention_job *j = job;
    real *scores = malloc(sizeof(real) * (j->layout[2] > 0 ? j->layout[2] : 1));
    if (!scores) { atomic_fetch_add(j->failures, 1); return; }
    attention_cached(j->q, j->k, j->v, j->out, j->layout, lo, hi, j->scale, scores);
    free(scores);
}

/* returns 0, or -1 where scratch memory could not be had */
int attention_cached_parallel(const real *q, const real *k, const real *v, real *out, const index_t *layout,
                              index_t heads, real scale, int threads, index_t min_heads) {
    atomic_int failures = 0;
    const cached_attention_job job = {q, k, v, out, layout, scale, &failures};
    run_parallel(threads, heads, min_heads, attention_cached_chunk, &job);
    return atomic_load(&failures) ? -1 : 0;
}

/* ---------------------------------------------------------------------------------------------------------
 * A transformer block on generation's few new positions (TransformerBlock.forward with a KV cache, which
 * records no graph), in one call: T new positions a sequence after `start` cached ones, x (N, C), N = B T,
 * H heads of D = C / H:
 *   a = LayerNorm1(x);  q, k, v = a W_q^T + b_q,  a W_k^T + b_k,  a W_v^T + b_v        (N, C) each
 *   the cache's keys and values (B, H, capacity, D) take k and v at positions start .. start + T - 1
 *   context = attention_cached(q, the cache's first S = start + T keys and values)      (N, C)
 *   h = x + context W_o^T + b_o
 *   y = h + gelu(LayerNorm2(h) W1^T + b1) W2^T + b2
 * on the same kernels as the fast paths' ops (few_rows_product for every product, on the pool).
 * `weights`: 16 addresses, LayerNorm1's weight and bias, then W_q, b_q, W_k, b_k, W_v, b_v, W_o, b_o, then
 * LayerNorm2's, then W1, b1, W2, b2, each weight contiguous; 0 for a bias (or LayerNorm weight) that is
 * absent. `dims`: B, T, C, H, d_ff, start, capacity (N >= 1); scale: the attention's, 1 / sqrt(D) as the caller
 * rounds it. min_elements: the fewest elements worth a thread. Returns 0, or -1 where scratch memory could not
 * be had. */
int block_with_cache(const real *x, real *y, const uint64_t *weights, real *keys, real *values,
                     const index_t *dims, real scale, real eps1, real eps2, int tanh_form, int threads,
                     index_t min_elements) {
    const index_t B = dims[0], T = dims[1], C = dims[2], H = dims[3], d_ff = dims[4], start = dims[5];
    const index_t capacity = dims[6], N = B * T, D = C / H, S = start + T;
    const real *const *w = (const real *const *)weights;
    real *scratch = malloc(sizeof(real) * (N * (5 * C + d_ff) + 2 * N));
    if (!scratch) return -1;
    real *a = scratch, *q = a + N * C, *k = q + N * C, *v = k + N * C, *context = v + N * C, *g = context + N * C;
    real *mean = g + N * d_ff, *rstd = mean + N;
    const index_t rows_C = (min_elements + C - 1) / C, rows_ff = (min_elements + d_ff - 1) / d_ff;

    layer_norm_forward(x, w[0], w[1], a, mean, rstd, N, C, eps1);
    few_rows_product_parallel(a, C, w[2], C, w[3], q, C, N, C, C, threads, rows_C);
    few_rows_product_parallel(a, C, w[4], C, w[5], k, C, N, C, C, threads, rows_C);
    few_rows_product_parallel(a, C, w[6], C, w[7], v, C, N, C, C, threads, rows_C);
    for (index_t b = 0; b < B; b++)                                 /* the cache takes the new k and v */
        for (index_t h = 0; h < H; h++)
            for (index_t t = 0; t < T; t++) {
                const index_t from = (b * T + t) * C + h * D, to = ((b * H + h) * capacity + start + t) * D;
                for (index_t d = 0; d < D; d++) {
                    keys[to + d] = k[from + d];
                    values[to + d] = v[from + d];
                }
            }
    /* q and context (N, C) seen as (B, H, T, D); the cache (B, H, capacity, D), its first S positions */
    const index_t layout[17] = {H, T, S, D, D, T * C, D, C, H * capacity * D, capacity * D, D,
                                H * capacity * D, capacity * D, D, T * C, D, C};
    const index_t min_heads = (min_elements + 2 * S * D - 1) / (2 * S * D);
    if (attention_cached_parallel(q, keys, values, context, layout, B * H, scale, threads, min_heads)) {
        free(scratch);
        return -1;
    }
    few_rows_product_parallel(context, C, w[8], C, w[9], y, C, N, C, C, threads, rows_C);
    for (index_t i = 0; i < N * C; i++) y[i] += x[i];                                  /* h, kept in y */
    layer_norm_forward(y, w[10], w[11], a, mean, rstd, N, C, eps2);
    few_rows_product_parallel(a, C, w[12], C, w[13], g, d_ff, N, d_ff, C, threads, rows_C);
    gelu_forward_parallel(g, g, N * d_ff, tanh_form, threads, min_elements);
    few_rows_product_parallel(g, d_ff, w[14], d_ff, w[15], q, C, N, C, d_ff, threads, rows_ff);
    for (index_t i = 0; i < N * C; i++) y[i] += q[i];
    free(scratch);
    return 0;
}

/* ---------------------------------------------------------------------------------------------------------
 * Sums: out = a + b (flat); column sums of x (rows, C), one row of `partial` (chunks, C) per chunk of rows,
 * for the caller to add up in chunk order (a bias's gradient: db = sum over the rows of dy). */
typedef struct { const real *a, *b; real *out; index_t C; } sum_job;

static void add_chunk(const void *job, index_t lo, index_t hi, index_t chunk) {
    const sum_job *j = job;
    #pragma omp simd
    for (index_t i = lo; i < hi; i++) j->out[i] = j->a[i] + j->b[i];
}

void add_parallel(const real *a, const real *b, real *out, index_t n, int threads, index_t min_chunk) {
    const sum_job job = {a, b, out, 0};
    run_parallel(threads, n, min_chunk, add_chunk, &job);
}

static void column_sums_chunk(const void *job, index_t lo, index_t hi, index_t chunk) {
    const sum_job *j = job;
    real *sums = j->out + chunk * j->C;
    for (index_t r = lo; r < hi; r++) {
        const real *row = j->a + r * j->C;
        #pragma omp simd
        for (index_t c = 0; c < j->C; c++) sums[c] += row[c];
    }
}

void column_sums_parallel(const real *x, real *partial, index_t rows, index_t C, int threads, index_t min_rows) {
    const sum_job job = {x, NULL, partial, C};
    run_parallel(threads, rows, min_rows, column_sums_chunk, &job);
}

/* Many arrays laid end to end (starts: the running totals of their sizes, from 0): the part [*a, *b) of the
 * elements [lo, hi) that falls in array i, counted from that array's first element; empty where *a >= *b. */
static inline void part_in(const index_t *starts, index_t i, index_t lo, index_t hi, index_t *a, index_t *b) {
    const index_t begin = starts[i], end = starts[i + 1];
    *a = (lo > begin ? lo : begin) - begin;
    *b = (hi < end ? hi : end) - begin;
}

/* AdamW over many parameters at once: parameter i has `sizes[i]` elements, its p, g, m, v at
 * pointers[4 i .. 4 i + 3] and its six scalars (adamw_update's) at scalars[6 i ..]; the elements of all of
 * them, end to end, are cut into chunks, so the threads share the work whatever the parameters' sizes. */
typedef struct { const uint64_t *pointers; const index_t *starts; const real *scalars; index_t count; } adamw_job;

static void adamw_chunk(const void *job, index_t lo, index_t hi, index_t chunk) {
    const adamw_job *j = job;
    for (index_t i = 0; i < j->count; i++) {
        index_t a, b;
        part_in(j->starts, i, lo, hi, &a, &b);
        if (a >= b) continue;
        real *const *ptr = (real *const *)(j->pointers + 4 * i);
        const real *s = j->scalars + 6 * i;
        adamw_update(ptr[0] + a, ptr[1] + a, ptr[2] + a, ptr[3] + a, b - a, s[0], s[1], s[2], s[3], s[4], s[5]);
    }
}

/* starts: (count + 1,) the running totals of the sizes, from 0 */
void adamw_update_many(const uint64_t *pointers, const index_t *starts, const real *scalars, index_t count,
                       int threads, index_t min_chunk) {
    const adamw_job job = {pointers, starts, scalars, count};
    run_parallel(threads, starts[count], min_chunk, adamw_chunk, &job);
}

/* Gradient clipping over many arrays at once, laid out as adamw_update_many's: array i has its elements at
 * pointers[i], from starts[i] to starts[i + 1] of all of them end to end, which are cut into chunks.
 * sum_of_squares_many: each chunk's sum of x^2 (in double) into partial[chunk], for the caller to add in
 * chunk order; scale_many: every element times factor, in place. */
typedef struct { const uint64_t *pointers; const index_t *starts; index_t count; double *partial; real factor; }
    arrays_job;

static void squares_chunk(const void *job, index_t lo, index_t hi, index_t chunk) {
    const arrays_job *j = job;
    double sum = 0.0;
    for (index_t i = 0; i < j->count; i++) {
        index_t a, b;
        part_in(j->starts, i, lo, hi, &a, &b);
        const real *x = (const real *)j->pointers[i];
        #pragma omp simd reduction(+:sum)
        for (index_t e = a; e < b; e++) sum += (double)x[e] * (double)x[e];
    }
    j->partial[chunk] = sum;
}

void sum_of_squares_many(const uint64_t *pointers, const index_t *starts, index_t count, double *partial,
                         int threads, index_t min_chunk) {
    const arrays_job job = {pointers, starts, count, partial, 0};
    run_parallel(threads, starts[count], min_chunk, squares_chunk, &job);
}

static void scale_chunk(const void *job, index_t lo, index_t hi, index_t chunk) {
    const arrays_job *j = job;
    for (index_t i = 0; i < j->count; i++) {
        index_t a, b;
        part_in(j->starts, i, lo, hi, &a, &b);
        real *x = (real *)j->pointers[i];
        const real factor = j->factor;
        #pragma omp simd
        for (index_t e = a; e < b; e++) x[e] *= factor;
    }
}

void scale_many(const uint64_t *pointers, const index_t *starts, index_t count, real factor, int threads,
                index_t min_chunk) {
    const arrays_job job = {pointers, starts, count, NULL, factor};
    run_parallel(threads, starts[count], min_chunk, scale_chunk, &job);
}

/* ---------------------------------------------------------------------------------------------------------
 * Embedding's backward: dW (V, C) = 0, then dW[ids[n]] += dy[n] for each of the N rows of dy (N, C), in row
 * order. The zeroing is cut by rows of dW, the sums by blocks of columns (each thread its own columns of
 * every row, so no two threads add into one element and the order of the sums is fixed). */
typedef struct { const int64_t *ids; const real *grad; real *grad_w; index_t N, C; } embedding_job;

static void zero_rows_chunk(const void *job, index_t lo, index_t hi, index_t chunk) {
    const embedding_job *j = job;
    for (index_t i = lo * j->C; i < hi * j->C; i++) j->grad_w[i] = 0;
}

static void scatter_columns_chunk(const void *job, index_t lo, index_t hi, index_t chunk) {
    const embedding_job *j = job;
    for (index_t n = 0; n < j->N; n++) {
        const real *g = j->grad + n * j->C;
        real *w = j->grad_w + j->ids[n] * j->C;
        #pragma omp simd
        for (index_t c = lo; c < hi; c++) w[c] += g[c];
    }
}

void embedding_backward_parallel(const int64_t *ids, const real *grad, real *grad_w, index_t N, index_t V,
                                 index_t C, int threads, index_t min_rows, index_t min_columns) {
    const embedding_job job = {ids, grad, grad_w, N, C};
    run_parallel(threads, V, min_rows, zero_rows_chunk, &job);
    run_parallel(threads, C, min_columns, scatter_columns_chunk, &job);
}
