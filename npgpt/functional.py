"""The transformer's layer ops, each with its hand-written backward right beside its forward.

Signatures follow ``torch.nn.functional``: ``linear``, ``layer_norm``, ``gelu``, ``softmax``, ``log_softmax``,
``cross_entropy``, ``embedding``, ``dropout``, ``scaled_dot_product_attention``. Each op takes Tensors (or
arrays), computes its forward on the raw arrays, saves exactly what its backward needs under readable names,
and returns a Tensor whose ``backward`` closure maps dL/d(out) to dL/d(inputs). The derivation is in the
comment above each backward. Gradients of broadcast inputs (a bias, a LayerNorm weight) are returned in the
output's shape; the engine sums them back to the parameter's shape (``engine._sum_to_shape``).

This is the reference: one plain path per op, the same code for NumPy and CuPy arrays. Faster versions of
some ops register with the dispatcher (``@dispatchable``, in ``engine.py``); tests hold each of them equal
to the code here.

Shapes: B batch, T time (query length), S key length, C channels, H heads, D head size, V vocabulary,
N rows (B*T flattened).

Next to read: ``npgpt/gradcheck.py`` (which proves each backward here), then ``npgpt/nn.py``.
"""

import math

import numpy as np

from . import backend
from .engine import Tensor, _make, dispatchable

__all__ = ["linear", "layer_norm", "gelu", "softmax", "log_softmax", "cross_entropy", "embedding", "dropout",
           "scaled_dot_product_attention", "erf"]


def _t(x):
    """Accept a Tensor or a raw array."""
    return x if isinstance(x, Tensor) else Tensor(x)


def _xp(x):
    return backend.get_array_module(x)


# ========================================================================================================
# linear

@dispatchable("linear")
def linear(input, weight, bias=None):
    """y = x W^T + b, with x (..., in), W (out, in), b (out,)."""
    input, weight = _t(input), _t(weight)
    bias = _t(bias) if bias is not None else None
    x, W = input.data, weight.data
    if x.shape[-1] != W.shape[1]:
        raise ValueError(f"linear: input has {x.shape[-1]} features but weight has shape {W.shape} "
                         f"(out, in): the input's last dimension must be {W.shape[1]}")
    x2d = x.reshape(-1, W.shape[1])                         # (N, in): one GEMM for all positions
    out = x2d @ W.T                                         # (N, out)
    if bias is not None:
        out += bias.data
    out = out.reshape(*x.shape[:-1], W.shape[0])            # (..., out)

    # dx = dy W        (N, out) @ (out, in)
    # dW = dy^T x      (out, N) @ (N, in)   summed over every position
    # db = dy          returned per position; the engine sums it to (out,)
    def backward(grad):
        grad2d = grad.reshape(-1, W.shape[0])               # (N, out)
        grad_x = (grad2d @ W).reshape(x.shape) if input.requires_grad else None
        grad_W = grad2d.T @ x2d if weight.requires_grad else None
        return (grad_x, grad_W, grad) if bias is not None else (grad_x, grad_W)

    parents = (input, weight, bias) if bias is not None else (input, weight)
    return _make(out, parents, backward, "linear")


# ========================================================================================================
# layer_norm

@dispatchable("layer_norm")
def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """Normalize over the trailing `normalized_shape` dimensions, then scale by weight and shift by bias."""
    input = _t(input)
    x = input.data
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    normalized_shape = tuple(normalized_shape)
    if x.shape[x.ndim - len(normalized_shape):] != normalized_shape:
        raise ValueError(f"layer_norm: normalized_shape {normalized_shape} does not match the trailing "
                         f"dimensions of the input of shape {x.shape}")
    axes = tuple(range(x.ndim - len(normalized_shape), x.ndim))
    xp = _xp(x)
    weight = _t(weight) if weight is not None else None
    bias = _t(bias) if bias is not None else None
    parents = (input,) + ((weight,) if weight is not None else ()) + ((bias,) if bias is not None else ())

    mean = x.mean(axis=axes, keepdims=True)                 # (..., 1)
    xhat = x - mean                                         # centred now, normalized below
    var = (xhat * xhat).mean(axis=axes, keepdims=True)      # (..., 1) biased variance, as PyTorch
    rstd = 1.0 / xp.sqrt(var + x.dtype.type(eps))          # (..., 1) reciprocal standard deviation
    xhat *= rstd                                            # (..., C) zero mean, unit variance
    out = xhat * weight.data if weight is not None else xhat.copy()
    if bias is not None:
        out += bias.data

    # y = xhat * w + b, xhat = (x - mean) * rstd. With g = dL/dxhat = dy * w (over the C normalized values):
    #   dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
    #        term 1: direct path; term 2: through the mean; term 3: through the variance
    #   dw = dy * xhat,  db = dy   (per position; the engine sums them to the parameter shape)
    def backward(grad):
        grad_xhat = grad * weight.data if weight is not None else grad.copy()
        grad_x = None
        if input.requires_grad:
            term3 = xhat * (grad_xhat * xhat).mean(axis=axes, keepdims=True)
            grad_x = grad_xhat                              # built in place: term 1 ...
            grad_x -= grad_xhat.mean(axis=axes, keepdims=True)   # ... minus term 2
            grad_x -= term3                                 # ... minus term 3
            grad_x *= rstd
        grads = (grad_x,)
        if weight is not None:
            grads += (grad * xhat if weight.requires_grad else None,)
        if bias is not None:
            grads += (grad,)
        return grads

    return _make(out, parents, backward, "layer_norm")


# ========================================================================================================
# gelu, and the error function it needs (NumPy has none)
#
# erf and erfc from rational approximations with float64 accuracy (S. L. Moshier's Cephes library):
#   |x| <= 1:      erf(x)  = x T(x^2) / U(x^2)
#   1 < x < 8:     erfc(x) = exp(-x^2) P(x) / Q(x)
#   x >= 8:        erfc(x) = exp(-x^2) R(x) / S(x)
# (U, Q and S lead with 1, written out here: _polynomial reads every coefficient alike.)

_ERF_T = (9.60497373987051638749e0, 9.00260197203842689217e1, 2.23200534594684319226e3,
          7.00332514112805075473e3, 5.55923013010394962768e4)
_ERF_U = (1.0, 3.35617141647503099647e1, 5.21357949780152679795e2, 4.59432382970980127987e3,
          2.26290000613890934246e4, 4.92673942608635921086e4)
_ERFC_P = (2.46196981473530512524e-10, 5.64189564831068821977e-1, 7.46321056442269912687e0,
           4.86371970985681366614e1, 1.96520832956077098242e2, 5.26445194995477358631e2,
           9.34528527171957607540e2, 1.02755188689515710272e3, 5.57535335369399327526e2)
_ERFC_Q = (1.0, 1.32281951154744992508e1, 8.67072140885989742329e1, 3.54937778887819891062e2,
           9.75708501743205489753e2, 1.82390916687909736289e3, 2.24633760818710981792e3,
           1.65666309194161350182e3, 5.57535340817727675546e2)
_ERFC_R = (5.64189583547755073984e-1, 1.27536670759978104416e0, 5.01905042251180477414e0,
           6.16021097993053585195e0, 7.40974269950448939160e0, 2.97886665372100240670e0)
_ERFC_S = (1.0, 2.26052863220117276590e0, 9.39603524938001434673e0, 1.20489539808096656605e1,
           1.70814450747565897222e1, 9.60896809063285878198e0, 3.36907645100081516050e0)


def _polynomial(x, coefficients):
    """Horner's rule; coefficients from the highest power down."""
    result = x * coefficients[0] + coefficients[1]
    for c in coefficients[2:]:
        result *= x
        result += c
    return result


def _erfc_large(a):
    """erfc(a) for a >= 1 (float64-accurate; tiny values stay accurate, unlike 1 - erf)."""
    xp = _xp(a)
    mid = _polynomial(a, _ERFC_P) / _polynomial(a, _ERFC_Q)
    tail = _polynomial(a, _ERFC_R) / _polynomial(a, _ERFC_S)
    return xp.exp(-a * a) * xp.where(a < 8, mid, tail)


# float32: one rational function on [-4, 4] (erf(x) = x A(x^2) / B(x^2)), clamped outside, where erf is
# +-1 to float32 precision: within a few float32 ulp everywhere (as Eigen's and XLA's float32 erf). Evaluating
# the float64 formulas in float32 would not be more accurate: their coefficients are fitted for 53 bits.
_ERF32_A = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
            -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_ERF32_B = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
            -1.42647390514189e-02)


def erf(x):
    """The error function of an array, accurate to the rounding of its dtype (float64: a few ulp)."""
    xp = _xp(x)
    if x.dtype == np.float32:
        v = xp.clip(x, -4, 4)
        z = v * v
        coeffs_a = [np.float32(c) for c in _ERF32_A]
        coeffs_b = [np.float32(c) for c in _ERF32_B]
        return v * _polynomial(z, coeffs_a) / _polynomial(z, coeffs_b)
    a = xp.abs(x)
    z = x * x
    small = x * _polynomial(z, _ERF_T) / _polynomial(z, _ERF_U)
    large = xp.sign(x) * (1 - _erfc_large(xp.maximum(a, 1)))
    return xp.where(a <= 1, small, large).astype(x.dtype, copy=False)


def _normal_cdf(x):
    """Phi(x) = (1 + erf(x / sqrt 2)) / 2; in float64 via erfc in the far left tail, so tiny values keep
    their digits (float32 keeps absolute accuracy there, as PyTorch's float32 GELU does)."""
    xp = _xp(x)
    z = x * x.dtype.type(1 / math.sqrt(2))
    if x.dtype == np.float32:
        return (erf(z) + 1) * np.float32(0.5)
    left_tail = 0.5 * _erfc_large(xp.maximum(-z, 1))
    return xp.where(z < -1, left_tail, 0.5 * (1 + erf(z))).astype(x.dtype, copy=False)


@dispatchable("gelu")
def gelu(input, approximate="none"):
    """GELU(x) = x Phi(x) (exact, with erf), or its tanh approximation when approximate='tanh'."""
    input = _t(input)
    x = input.data
    xp = _xp(x)
    if approximate == "none":
        cdf = _normal_cdf(x)                                # Phi(x)
        out = x * cdf

        # d/dx [x Phi(x)] = Phi(x) + x phi(x),  phi(x) = exp(-x^2/2) / sqrt(2 pi)
        def backward(grad):
            pdf = xp.exp(x * x * x.dtype.type(-0.5)) * x.dtype.type(1 / math.sqrt(2 * math.pi))
            return (grad * (cdf + x * pdf),)
    elif approximate == "tanh":
        k = x.dtype.type(math.sqrt(2 / math.pi))
        c = x.dtype.type(0.044715)
        th = xp.tanh(k * (x + c * x * x * x))
        out = 0.5 * x * (1 + th)

        # y = x (1 + tanh u) / 2, u = k (x + 0.044715 x^3)
        # dy/dx = (1 + tanh u) / 2 + x (1 - tanh^2 u) / 2 * k (1 + 3 * 0.044715 x^2)
        def backward(grad):
            du = k * (1 + 3 * c * x * x)
            return (grad * (0.5 * (1 + th) + 0.5 * x * (1 - th * th) * du),)
    else:
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', not {approximate!r}")
    return _make(out.astype(x.dtype, copy=False), (input,), backward, "gelu")


# ========================================================================================================
# softmax and log_softmax: the one softmax that attention and cross-entropy use as well

def softmax_and_logsumexp(x, axis=-1):
    """(softmax(x), logsumexp(x)) along `axis` of an array, the logsumexp with the axis kept (size 1).

    softmax(x)_i = exp(x_i - m) / sum_j exp(x_j - m) for any m; m = max(x) keeps every exp in (0, 1], so
    nothing overflows, and logsumexp(x) = m + log(sum_j exp(x_j - m)).
    """
    xp = _xp(x)
    peak = x.max(axis=axis, keepdims=True)
    exps = xp.exp(x - peak)
    total = exps.sum(axis=axis, keepdims=True)
    exps /= total
    return exps, peak + xp.log(total)


@dispatchable("softmax")
def softmax(input, dim):
    """exp(x) / sum(exp(x)) along `dim`, shifted by the max for stability."""
    input = _t(input)
    probs, _ = softmax_and_logsumexp(input.data, dim)

    # y = softmax(x): dy_i/dx_j = y_i (delta_ij - y_j)  =>  dx = y * (dy - sum(dy * y))
    def backward(grad):
        return (probs * (grad - (grad * probs).sum(axis=dim, keepdims=True)),)
    return _make(probs, (input,), backward, "softmax")


@dispatchable("log_softmax")
def log_softmax(input, dim):
    """x - logsumexp(x) along `dim`."""
    input = _t(input)
    x = input.data
    probs, logsumexp = softmax_and_logsumexp(x, dim)
    out = x - logsumexp

    # y = x - logsumexp(x): dy_i/dx_j = delta_ij - softmax(x)_j  =>  dx = dy - softmax(x) * sum(dy)
    def backward(grad):
        return (grad - probs * grad.sum(axis=dim, keepdims=True),)
    return _make(out, (input,), backward, "log_softmax")


# ========================================================================================================
# cross_entropy

def check_class_ids(labels, num_classes, ignore_index):
    """Raise IndexError unless every id lies in [0, num_classes) or equals ignore_index."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bool(bad.any()):
        raise IndexError(f"cross_entropy: target ids must lie in [0, {num_classes}) or equal "
                         f"ignore_index={ignore_index}; found {int(labels[bad].reshape(-1)[0])}")


def cross_entropy_rows(logits, target, reduction="mean"):
    """(z, labels) for cross_entropy: the logits with the class axis last, flattened to z (N, C), and the
    target ids as an array, after checking the reduction, the ids' type and their shape."""
    xp = _xp(logits)
    labels = target.data if isinstance(target, Tensor) else target
    labels = labels if hasattr(labels, "dtype") else np.asarray(labels)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"cross_entropy: reduction must be 'mean', 'sum' or 'none', not {reduction!r}")
    if labels.dtype.kind not in "iu":
        raise TypeError(f"cross_entropy: target must hold integer class ids, not {labels.dtype}")
    # Bring the class axis last and flatten: z (N, C), t (N,)
    if logits.ndim == 1:
        z, expected_target = logits[None, :], ()
    else:
        z = xp.moveaxis(logits, 1, -1)
        expected_target = logits.shape[:1] + logits.shape[2:]
    if labels.shape != expected_target:
        raise ValueError(f"cross_entropy: input of shape {logits.shape} needs a target of shape "
                         f"{expected_target}, got {labels.shape}")
    z = z.reshape(-1, z.shape[-1])                          # (N, C)
    return z, labels


def cross_entropy_output(losses, count, labels, reduction, dtype):
    """The reduced loss from per-row losses (N,): their mean over the `count` counted rows, sum, or all."""
    if reduction == "mean":
        out = losses.sum() / count.astype(dtype)
    elif reduction == "sum":
        out = losses.sum()
    else:
        out = losses.reshape(labels.shape)
    return _xp(losses).asarray(out, dtype=dtype)


def cross_entropy_row_scale(grad, valid, count, reduction, dtype):
    """dloss/dloss_i (N,): the incoming gradient spread over the rows (1/count each for 'mean'), 0 if ignored."""
    if reduction == "none":
        return (grad.reshape(-1) * valid).astype(dtype, copy=False)
    scale = grad / count.astype(dtype) if reduction == "mean" else grad
    return (scale * valid).astype(dtype, copy=False)


def grad_logits_shape(grad_z, logits):
    """dz (N, C) back to the logits' own shape and axis order."""
    if logits.ndim == 1:
        return grad_z[0]
    grad_z = grad_z.reshape(logits.shape[:1] + logits.shape[2:] + logits.shape[1:2])
    return _xp(grad_z).moveaxis(grad_z, -1, 1)


@dispatchable("cross_entropy")
def cross_entropy(input, target, ignore_index=-100, reduction="mean"):
    """Softmax cross-entropy of logits `input` (N, C) (or (C,), or (N, C, d...)) against class ids `target`.

    Fused and stable: loss_i = logsumexp(z_i) - z_i[t_i], never a one-hot matrix. Targets equal to
    `ignore_index` contribute nothing; 'mean' divides by the number of the others.
    """
    input = _t(input)
    logits = input.data
    xp = _xp(logits)
    z, labels = cross_entropy_rows(logits, target, reduction)       # (N, C), labels
    check_class_ids(labels, z.shape[1], ignore_index)
    t = xp.asarray(labels).reshape(-1)                      # (N,) on the logits' device
    valid = t != ignore_index
    count = valid.sum()
    rows = xp.arange(z.shape[0])                            # (N,) with safe_t: each row's target column
    safe_t = xp.where(valid, t, 0)
    probs, logsumexp = softmax_and_logsumexp(z, axis=1)     # (N, C), (N, 1)
    losses = (logsumexp[:, 0] - z[rows, safe_t]) * valid    # (N,), 0 where ignored

    # dloss_i/dz_i = softmax(z_i) - onehot(t_i): subtract 1 at the target column only.
    # Scaled by the incoming gradient (and 1/count for 'mean'); ignored rows get zero.
    def backward(grad):
        row_scale = cross_entropy_row_scale(grad, valid, count, reduction, z.dtype)    # (N,)
        grad_z = probs * row_scale[:, None]                 # (N, C)
        grad_z[rows, safe_t] -= row_scale
        return (grad_logits_shape(grad_z, logits),)

    out = cross_entropy_output(losses, count, labels, reduction, z.dtype)
    return _make(out, (input,), backward, "cross_entropy")


# ========================================================================================================
# embedding

def check_ids(ids, num_embeddings):
    """Raise IndexError unless every id lies in [0, num_embeddings)."""
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= num_embeddings):
        raise IndexError(f"embedding: ids must lie in [0, {num_embeddings}), found "
                         f"{int(ids.min())}..{int(ids.max())}; check the tokenizer's vocabulary size")


def embedding_ids(input):
    """The integer id array inside `input` (a Tensor, an array or a list)."""
    ids = input.data if isinstance(input, Tensor) else input
    ids = ids if hasattr(ids, "dtype") else np.asarray(ids)
    if ids.dtype.kind not in "iu":
        raise TypeError(f"embedding: ids must be integers, not {ids.dtype}; convert with .astype(int)")
    return ids


@dispatchable("embedding")
def embedding(input, weight):
    """Rows of `weight` (V, C) picked by integer ids `input` (any shape) -> (..., C)."""
    weight = _t(weight)
    W = weight.data
    xp = _xp(W)
    ids = embedding_ids(input)
    check_ids(ids, W.shape[0])                              # where the ids are, then moved to W's device
    ids = xp.asarray(ids)
    out = W[ids]                                            # (..., C)

    # out[n] = W[ids[n]]  =>  dW[v] = sum of dout[n] over every n with ids[n] == v
    def backward(grad):
        grad_W = xp.zeros_like(W)
        backend.scatter_add(grad_W, ids.reshape(-1), grad.reshape(-1, W.shape[1]))
        return (grad_W,)
    return _make(out, (weight,), backward, "embedding")


# ========================================================================================================
# dropout

@dispatchable("dropout")
def dropout(input, p=0.5, training=True, generator=None):
    """Inverted dropout: zero each element with probability p, scale the rest by 1/(1-p)."""
    input = _t(input)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout: p must lie in [0, 1], got {p}")
    if not training or p == 0.0:
        return input
    x = input.data
    if p == 1.0:                                            # y = 0 everywhere, so dx = 0
        return _make(x * 0, (input,), lambda grad: (grad * 0,), "dropout")
    keep, scale = keep_mask(x.shape, p, x.dtype, generator)     # bool mask m, scale 1/(1-p)

    # y = x * m / (1-p)  =>  dx = dy * m / (1-p)
    def backward(grad):
        return (grad * keep * scale,)
    return _make(x * keep * scale, (input,), backward, "dropout")


def keep_mask(shape, p, dtype, generator=None):
    """A bool mask, True with probability 1-p (from `generator`, else the global one), and the scale
    1/(1-p), in `dtype`, that keeps the mean of the kept values."""
    rng = generator if generator is not None else backend.global_rng()
    keep = rng.random(shape, dtype=np.float32) >= np.float32(p)
    return keep, np.dtype(dtype).type(1.0 / (1.0 - p))


# ========================================================================================================
# scaled_dot_product_attention

def causal_mask(xp, num_queries, num_keys, offset=0):
    """(L, S) bool, True where query i may attend to key j, i.e. j <= i + offset.

    offset 0 is PyTorch's is_causal; with a KV cache holding `offset` earlier positions, the new queries
    sit at positions offset, offset + 1, ...
    """
    return xp.tri(num_queries, num_keys, k=offset, dtype=bool)


def check_attention_inputs(q, k, v, attn_mask, is_causal):
    if attn_mask is not None and is_causal:
        raise ValueError("scaled_dot_product_attention: pass attn_mask or is_causal=True, not both")
    if q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]:
        raise ValueError(f"scaled_dot_product_attention: query {q.shape}, key {k.shape} and value {v.shape} "
                         "must agree: (..., L, D), (..., S, D), (..., S, Dv)")


@dispatchable("scaled_dot_product_attention")
def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 scale=None, generator=None):
    """softmax(Q K^T * scale + mask) V, with Q (..., L, D), K (..., S, D), V (..., S, Dv).

    attn_mask: bool (True = may attend, as in PyTorch) or float (added to the scores), broadcastable to
    (..., L, S); treated as a constant. is_causal: query i sees keys 0..i.
    """
    query, key, value = _t(query), _t(key), _t(value)
    q, k, v = query.data, key.data, value.data
    xp = _xp(q)
    check_attention_inputs(q, k, v, attn_mask, is_causal)
    L, S = q.shape[-2], k.shape[-2]
    scale = q.dtype.type(1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)

    q_scaled = q * scale                                    # (..., L, D): (Q s) K^T = s (Q K^T)
    scores = q_scaled @ k.swapaxes(-1, -2)                  # (..., L, S) = Q K^T * scale
    if attn_mask is not None:
        attn_mask = xp.asarray(attn_mask.data if isinstance(attn_mask, Tensor) else attn_mask)
    if is_causal:
        attn_mask = causal_mask(xp, L, S)
    if attn_mask is not None and attn_mask.dtype == bool:
        scores = xp.where(attn_mask, scores, q.dtype.type(-np.inf))     # a masked key gets weight exp(-inf) = 0
    elif attn_mask is not None:
        scores += attn_mask
    probs, _ = softmax_and_logsumexp(scores)                # P (..., L, S): the attention weights
    if dropout_p > 0.0:
        keep, keep_scale = keep_mask(probs.shape, dropout_p, q.dtype, generator)
        attn = probs * keep * keep_scale                    # A = dropout(P)
    else:
        attn = probs
    out = attn @ v                                          # (..., L, Dv)

    # O = A V, A = dropout(P), P = softmax(Z), Z = (Q * scale) K^T   (Z: the scores, (..., L, S))
    #   dV = A^T dO                 dA = dO V^T
    #   dP = dA * dropout mask      dZ = P * (dP - sum_j(dP * P))   (softmax backward, row by row)
    #   dQ = dZ K * scale           dK = dZ^T (Q * scale)
    def backward(grad):
        grad_v = attn.swapaxes(-1, -2) @ grad               # (..., S, Dv)
        grad_probs = grad @ v.swapaxes(-1, -2)              # (..., L, S)
        if dropout_p > 0.0:
            grad_probs = grad_probs * keep * keep_scale
        grad_scores = probs * (grad_probs - (grad_probs * probs).sum(axis=-1, keepdims=True))
        grad_q = (grad_scores @ k) * scale                  # (..., L, D)
        grad_k = grad_scores.swapaxes(-1, -2) @ q_scaled    # (..., S, D)
        return grad_q, grad_k, grad_v
    return _make(out, (query, key, value), backward, "scaled_dot_product_attention")
