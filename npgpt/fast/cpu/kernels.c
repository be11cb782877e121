/* npgpt's CPU kernels: the textbook's elementwise and row-wise maths (npgpt/functional.py, optim.py) as C
 * loops the compiler turns into SIMD code, each a single pass over memory where NumPy needs several.
 *
 * Compiled twice by native.py, once with -DREAL=float and once with -DREAL=double, into two shared
 * libraries; called through ctypes, which releases the GIL, so the worker threads (parallel.py) run chunks
 * of one call at the same time. Every function works on a contiguous slice it is given (a chunk of elements
 * or of rows) and writes only that slice's results, so a chunked call gives the same numbers as a whole one
 * given the same arguments: dropout is told where its slice starts (`start`), the causal softmax gets whole
 * (L, S) blocks of rows, and LayerNorm's weight and bias gradients are sums the caller adds up per chunk.
 *
 * Shapes: GELU, dropout, AdamW: flat (n,); LayerNorm rows (N, C); cross-entropy logits (N, V); attention
 * scores (rows, S), rows = B * H * L queries.
 *
 * float: exp and erf are the polynomial and rational approximations below (within a few ulp), which
 * vectorise; double: the C library's exp and erfc (within an ulp or two), for the gradient checks.
 */

#include <math.h>
#include <stdint.h>

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

void gelu_forward(const real *x, real *out, index_t n, int tanh_form) {
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

void gelu_backward(const real *x, const real *grad, real *grad_x, index_t n, int tanh_form) {
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
void layer_norm_forward(const real *x, const real *w, const real *b, real *out, real *mean, real *rstd,
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
void layer_norm_backward(const real *x, const real *w, const real *mean, const real *rstd, const real *grad,
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

/* Cross-entropy's forward: logsumexp (N,) of each row of the logits (N, V); nothing else is written. */
void logsumexp_rows(const real *z, real *logsumexp, index_t rows, index_t V) {
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
void softmax_scaled_rows(const real *z, const real *logsumexp, const real *row_scale, real *grad_z,
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
        const real peak = row_max(sr, visible);
        real sum = 0;
        #pragma omp simd reduction(+:sum)
        for (index_t j = 0; j < visible; j++) {
            const real e = exp_real(sr[j] - peak);
            sr[j] = e;
            sum += e;
        }
        const real inv = (real)1 / sum;
        #pragma omp simd
        for (index_t j = 0; j < visible; j++) sr[j] *= inv;
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
void adamw_update(real *p, const real *g, real *m, real *v, index_t n, real beta1, real beta2, real eps,
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
