"""The transformer's layer ops, each with its hand-written backward right beside its forward.

Signatures follow ``torch.nn.functional``: ``linear``, ``layer_norm``, ``gelu``, ``softmax``, ``log_softmax``,
``cross_entropy``, ``embedding``, ``dropout``, ``scaled_dot_product_attention``. Each op takes Tensors (or
arrays), computes its forward on the raw arrays, saves exactly what its backward needs under readable names,
and returns a Tensor whose ``backward`` closure maps dL/d(out) to dL/d(inputs). The derivation is in the
comment above each backward. Gradients of broadcast inputs (a bias, a LayerNorm weight) are returned in the
output's shape; the engine sums them back to the parameter's shape (``engine._sum_to_shape``).

Shapes: B batch, T time (query length), S key length, C channels, H heads, D head size, V vocabulary,
N rows (B*T flattened).

Next to read: ``npgpt/checks.py`` (gradcheck, which proves each backward here), then ``npgpt/nn.py``.
"""

import math

import numpy as np

from . import backend
from .fast.cuda import kernels
from .backend import matmul     # a @ b; on the GPU through cuBLAS directly, so a CUDA graph can record it
from .engine import Tensor, _make

__all__ = ["linear", "layer_norm", "gelu", "softmax", "log_softmax", "cross_entropy", "embedding", "dropout",
           "scaled_dot_product_attention", "erf"]


def _t(x):
    """Accept a Tensor or a raw array."""
    return x if isinstance(x, Tensor) else Tensor(x)


def _xp(x):
    return backend.get_array_module(x)


def _recording(array):
    """True for a GPU array while a CUDA graph records: its values cannot be read back then."""
    return backend.is_gpu_array(array) and backend.capturing()


# ========================================================================================================
# linear

def linear(input, weight, bias=None):
    """y = x W^T + b, with x (..., in), W (out, in), b (out,)."""
    input, weight = _t(input), _t(weight)
    x, W = input.data, weight.data
    if x.shape[-1] != W.shape[1]:
        raise ValueError(f"linear: input has {x.shape[-1]} features but weight has shape {W.shape} "
                         f"(out, in): the input's last dimension must be {W.shape[1]}")
    lead = x.shape[:-1]
    x2d = x.reshape(-1, W.shape[1])                         # (N, in): one GEMM for all positions
    if bias is None:
        out = matmul(x2d, W.T)                              # (N, out)
    elif backend.products_in_place(x):
        # GPU: the bias is written first and the GEMM adds the product onto it (cuBLAS's beta = 1), so the
        # bias costs one write of the output instead of a separate read-modify-write pass over it
        bias = _t(bias)
        dtype = np.result_type(x.dtype, W.dtype)
        if kernels.available(bias.data) and bias.data.ndim == 1 and bias.dtype == dtype:
            out = kernels.fill_rows(bias.data, x2d.shape[0])
        else:
            out = _xp(x).empty((x2d.shape[0], W.shape[0]), dtype=dtype)
            out[...] = bias.data
        matmul(x2d, W.T, out=out, accumulate=True)          # (N, out)
    else:
        bias = _t(bias)
        out = matmul(x2d, W.T)                              # (N, out)
        out += bias.data
    out = out.reshape(*lead, W.shape[0])                    # (..., out)

    # dx = dy W        (N, out) @ (out, in)
    # dW = dy^T x      (out, N) @ (N, in)   summed over every position
    # db = dy          returned per position; the engine sums it to (out,)
    def backward(grad):
        grad2d = grad.reshape(-1, W.shape[0])               # (N, out)
        grad_x = matmul(grad2d, W).reshape(x.shape) if input.requires_grad else None
        grad_W = matmul(grad2d.T, x2d) if weight.requires_grad else None
        return (grad_x, grad_W, grad) if bias is not None else (grad_x, grad_W)

    parents = (input, weight, bias) if bias is not None else (input, weight)
    return _make(out, parents, backward, "linear")


# ========================================================================================================
# layer_norm

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
    if len(axes) == 1 and kernels.available(x):
        return _layer_norm_fused(input, weight, bias, eps, parents)

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
            term3 = grad_xhat * xhat
            term3 = xhat * term3.mean(axis=axes, keepdims=True)
            grad_x = grad_xhat                              # built in place: term 1 ...
            grad_x -= grad_xhat.mean(axis=axes, keepdims=True)   # ... minus term 2
            grad_x -= term3                                 # ... minus term 3
            grad_x *= rstd
        return (grad_x,) + _layer_norm_param_grads(grad, xhat, weight, bias)

    return _make(out, parents, backward, "layer_norm")


def _layer_norm_param_grads(grad, xhat, weight, bias):
    """(dw, db) as there are parameters: dw = dy * xhat, db = dy, per position (the engine sums them)."""
    grads = ()
    if weight is not None:
        grads += (grad * xhat if weight.requires_grad else None,)
    if bias is not None:
        grads += (grad,)
    return grads


def _layer_norm_fused(input, weight, bias, eps, parents):
    """layer_norm over the last dimension with the GPU kernels: the same maths, one pass each way."""
    w = weight.data if weight is not None else None
    out, xhat, rstd = kernels.layer_norm_forward(input.data, w, bias.data if bias is not None else None, eps)

    def backward(grad):
        grad_x = kernels.layer_norm_backward(grad, w, xhat, rstd.reshape(-1)) if input.requires_grad else None
        grads = (grad_x,)
        if weight is not None or bias is not None:
            grad_w, grad_b = kernels.layer_norm_param_grads(grad, xhat)    # (C,) each, already summed
            if weight is not None:
                grads += (grad_w if weight.requires_grad else None,)
            if bias is not None:
                grads += (grad_b,)
        return grads
    return _make(out, parents, backward, "layer_norm")


# ========================================================================================================
# gelu, and the error function it needs (NumPy has none)
#
# erf and erfc from rational approximations with float64 accuracy (S. L. Moshier's Cephes library):
#   |x| <= 1:      erf(x)  = x T(x^2) / U(x^2)
#   1 < x < 8:     erfc(x) = exp(-x^2) P(x) / Q(x)
#   x >= 8:        erfc(x) = exp(-x^2) R(x) / S(x)
# (U, Q and S have a leading coefficient of 1, left implicit.)

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


# float32: one rational function on [-4, 4] (erf(x) = x A(x^2) / B(x^2), clamped outside, where erf is
# +-1 to float32 precision), as in Eigen and XLA: a few float32 ulp, and ~15 array passes instead of ~60.
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


def gelu(input, approximate="none"):
    """GELU(x) = x Phi(x) (exact, with erf), or its tanh approximation when approximate='tanh'."""
    input = _t(input)
    x = input.data
    xp = _xp(x)
    if approximate == "none" and kernels.available(x):     # GPU: one fused kernel each way
        out = kernels.gelu_forward(x)                       # Phi(x) is recomputed in backward, not stored
        return _make(out, (input,), lambda grad: (kernels.gelu_backward(grad, x),), "gelu")
    if approximate == "none":
        cdf = _normal_cdf(x)                                # Phi(x)
        out = x * cdf

        # d/dx [x Phi(x)] = Phi(x) + x phi(x),  phi(x) = exp(-x^2/2) / sqrt(2 pi)
        def backward(grad):
            pdf = xp.exp(x * x * x.dtype.type(-0.5)) * x.dtype.type(1 / math.sqrt(2 * math.pi))
            return (grad * (cdf + x * pdf),)
    elif approximate == "tanh":
        k = math.sqrt(2 / math.pi)
        inner = k * (x + 0.044715 * x * x * x)
        th = xp.tanh(inner)
        out = 0.5 * x * (1 + th)

        # y = x (1 + tanh u) / 2, u = k (x + 0.044715 x^3)
        # dy/dx = (1 + tanh u) / 2 + x (1 - tanh^2 u) / 2 * k (1 + 3 * 0.044715 x^2)
        def backward(grad):
            du = k * (1 + 3 * 0.044715 * x * x)
            return (grad * (0.5 * (1 + th) + 0.5 * x * (1 - th * th) * du),)
    else:
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', not {approximate!r}")
    return _make(out.astype(x.dtype, copy=False), (input,), backward, "gelu")


# ========================================================================================================
# softmax and log_softmax

def softmax(input, dim):
    """exp(x) / sum(exp(x)) along `dim`, shifted by the max for stability."""
    input = _t(input)
    x = input.data
    xp = _xp(x)
    probs = xp.exp(x - x.max(axis=dim, keepdims=True))
    probs /= probs.sum(axis=dim, keepdims=True)

    # y = softmax(x): dy_i/dx_j = y_i (delta_ij - y_j)  =>  dx = y * (dy - sum(dy * y))
    def backward(grad):
        return (probs * (grad - (grad * probs).sum(axis=dim, keepdims=True)),)
    return _make(probs, (input,), backward, "softmax")


def log_softmax(input, dim):
    """x - logsumexp(x) along `dim`."""
    input = _t(input)
    x = input.data
    xp = _xp(x)
    shifted = x - x.max(axis=dim, keepdims=True)
    out = shifted - xp.log(xp.exp(shifted).sum(axis=dim, keepdims=True))

    # y = x - logsumexp(x): dy_i/dx_j = delta_ij - softmax(x)_j  =>  dx = dy - softmax(x) * sum(dy)
    def backward(grad):
        return (grad - xp.exp(out) * grad.sum(axis=dim, keepdims=True),)
    return _make(out, (input,), backward, "log_softmax")


# ========================================================================================================
# cross_entropy

def _softmax_rows(z):
    """Row-wise softmax of z (N, C) and logsumexp (N,), stable (the max is subtracted first).

    Worked through in blocks of rows small enough to stay in cache: each block is read from memory once
    and all five steps run on it there (on the GPU, one block of all rows).
    """
    xp = _xp(z)
    probs = xp.empty_like(z)
    logsumexp = xp.empty(z.shape[0], dtype=z.dtype)
    step = backend.rows_per_block(z)
    for lo in range(0, z.shape[0], step):
        block, out = z[lo:lo + step], probs[lo:lo + step]
        peak = block.max(axis=1, keepdims=True)             # (n, 1)
        xp.subtract(block, peak, out=out)
        xp.exp(out, out=out)
        sum_exp = out.sum(axis=1, keepdims=True)            # (n, 1)
        out /= sum_exp
        logsumexp[lo:lo + step] = (xp.log(sum_exp) + peak)[:, 0]
    return probs, logsumexp


def cross_entropy(input, target, ignore_index=-100, reduction="mean"):
    """Softmax cross-entropy of logits `input` (N, C) (or (C,), or (N, C, d...)) against class ids `target`.

    Fused and stable: loss_i = logsumexp(z_i) - z_i[t_i], never a one-hot matrix. Targets equal to
    `ignore_index` contribute nothing; 'mean' divides by the number of the others.
    """
    input = _t(input)
    logits = input.data
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
    num_classes = z.shape[-1]
    z = z.reshape(-1, num_classes)                          # (N, C)
    # Checked where the ids are: NumPy ids (the training loop's) on the host, for free; device ids cost a
    # wait for the GPU, and are not checked while a CUDA graph records (npgpt/graph.py checks its batches)
    if not _recording(labels):
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
        if bool(bad.any()):
            raise IndexError(f"cross_entropy: target ids must lie in [0, {num_classes}) or equal "
                             f"ignore_index={ignore_index}; found {int(labels[bad].reshape(-1)[0])}")
    t = xp.asarray(labels).reshape(-1)                      # (N,) on the logits' device
    valid = t != ignore_index
    count = valid.sum()

    fused = kernels.available(z)
    if fused:                                               # GPU: logsumexp and loss in one kernel
        logsumexp, losses = kernels.cross_entropy_forward(z, t, ignore_index)
    else:
        rows = xp.arange(z.shape[0])                        # (N,) with safe_t: each row's target column
        safe_t = xp.where(valid, t, 0)
        probs, logsumexp = _softmax_rows(z)                 # (N, C), (N,)
        losses = (logsumexp - z[rows, safe_t]) * valid      # (N,), 0 where ignored
        saved = {"probs": probs}                            # the first backward turns it into dz in place
    if reduction == "mean":
        out = losses.sum() / count.astype(z.dtype)
    elif reduction == "sum":
        out = losses.sum()
    else:
        out = losses.reshape(labels.shape)

    # dloss_i/dz_i = softmax(z_i) - onehot(t_i): subtract 1 at the target column only.
    # Scaled by the incoming gradient (and 1/count for 'mean'); ignored rows get zero.
    def backward(grad):
        if reduction == "none":
            row_scale = grad.reshape(-1) * valid            # (N,)
        else:
            scale = grad / count.astype(z.dtype) if reduction == "mean" else grad
            row_scale = scale * valid                       # (N,)
        if fused:
            grad_z = kernels.cross_entropy_backward(z, t, logsumexp, row_scale)
        else:
            # probs is needed by no one else: scaled in place it becomes dz (a second backward, with
            # retain_graph, recomputes it)
            grad_z = saved.pop("probs", None)
            if grad_z is None:
                grad_z = _softmax_rows(z)[0]
            grad_z *= row_scale[:, None].astype(z.dtype, copy=False)   # (N, C)
            grad_z[rows, safe_t] -= row_scale
        if logits.ndim == 1:
            return (grad_z[0],)
        grad_z = grad_z.reshape(z_shape_moved)
        return (xp.moveaxis(grad_z, -1, 1),)

    z_shape_moved = logits.shape[:1] + logits.shape[2:] + (num_classes,) if logits.ndim > 1 else None
    return _make(xp.asarray(out, dtype=z.dtype), (input,), backward, "cross_entropy")


# ========================================================================================================
# embedding

def embedding(input, weight):
    """Rows of `weight` (V, C) picked by integer ids `input` (any shape) -> (..., C)."""
    weight = _t(weight)
    W = weight.data
    xp = _xp(W)
    ids = input.data if isinstance(input, Tensor) else input
    ids = ids if hasattr(ids, "dtype") else np.asarray(ids)
    if ids.dtype.kind not in "iu":
        raise TypeError(f"embedding: ids must be integers, not {ids.dtype}; convert with .astype(int)")
    num_embeddings = W.shape[0]
    # checked where the ids are (NumPy ids on the host, for free; see cross_entropy), then moved to W's device
    if ids.size and not _recording(ids) and (int(ids.min()) < 0 or int(ids.max()) >= num_embeddings):
        raise IndexError(f"embedding: ids must lie in [0, {num_embeddings}), found "
                         f"{int(ids.min())}..{int(ids.max())}; check the tokenizer's vocabulary size")
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

def dropout(input, p=0.5, training=True, generator=None):
    """Inverted dropout: zero each element with probability p, scale the rest by 1/(1-p)."""
    input = _t(input)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout: p must lie in [0, 1], got {p}")
    if not training or p == 0.0:
        return input
    x = input.data
    if p == 1.0:
        return _make(x * 0, (input,), lambda grad: (grad * 0,), "dropout")
    if generator is None and kernels.available(x):          # GPU: one kernel each way, no stored mask
        seed = backend.next_seed()
        return _make(kernels.dropout_forward(x, p, seed), (input,),
                     lambda grad: (kernels.dropout_backward(grad, p, seed),), "dropout")
    keep, scale = _keep_mask(x.shape, p, x.dtype, generator)   # bool mask m, scale 1/(1-p)

    # y = x * m / (1-p)  =>  dx = dy * m / (1-p)
    def backward(grad):
        grad_x = grad * keep
        grad_x *= scale
        return (grad_x,)
    out = x * keep
    out *= scale
    return _make(out, (input,), backward, "dropout")


def _keep_mask(shape, p, dtype, generator):
    """A bool mask, True with probability 1-p, and the dtype scale 1/(1-p) that keeps the mean."""
    rng = generator if generator is not None else backend.global_rng()
    keep, scale = backend.keep_mask(rng, shape, p)
    return keep, np.dtype(dtype).type(scale)


# ========================================================================================================
# scaled_dot_product_attention

_mask_cache = {}


def causal_mask(xp, num_queries, num_keys, offset=0):
    """(L, S) bool, True where query i may attend to key j, i.e. j <= i + offset.

    offset 0 is PyTorch's is_causal; with a KV cache holding `offset` earlier positions, the new queries
    sit at positions offset, offset + 1, ...
    """
    key = ("bool", xp.__name__, num_queries, num_keys, offset)
    if key not in _mask_cache:
        _mask_cache[key] = xp.tril(xp.ones((num_queries, num_keys), dtype=bool), k=offset)
    return _mask_cache[key]


def _additive_mask(mask, dtype, cache_key=None):
    """A bool mask (True = attend) as 0 / -inf to add to the scores (cached for the causal mask)."""
    if cache_key is not None and cache_key + (np.dtype(dtype).name,) in _mask_cache:
        return _mask_cache[cache_key + (np.dtype(dtype).name,)]
    xp = _xp(mask)
    additive = xp.where(mask, dtype.type(0), dtype.type(-np.inf)).astype(dtype)
    if cache_key is not None:
        _mask_cache[cache_key + (np.dtype(dtype).name,)] = additive
    return additive


def _scaled_queries(q, scale, in_place):
    """(Q', s) with Q' K^T * s = Q K^T * scale. On the GPU the scale rides in the product (cuBLAS's alpha,
    free) and Q is read where it lies; on the CPU Q (L, D) is scaled once, which is cheaper than scaling the
    (L, S) scores, into a contiguous array that every product then reads fast."""
    if in_place:
        return q, scale
    return _xp(q).multiply(q, scale, out=_xp(q).empty(q.shape, dtype=q.dtype)), q.dtype.type(1)


def _empty_in_layout(like, shape, in_place):
    """An empty array of `shape`; on the GPU with its axes in memory in the same order as `like`'s. The heads
    arrive as (B, H, T, D) views of (B, T, H, D) projections; outputs and gradients laid out the same way make
    the heads' merge back to (B, T, C) a view, not a copy (cuBLAS writes the heads where they lie). On the CPU,
    row-major, which NumPy's matmul writes fastest."""
    xp = _xp(like)
    if not in_place or like.ndim != len(shape):
        return xp.empty(shape, dtype=like.dtype)
    return xp.empty_like(like, shape=shape)


def _matmul_shape(a, b):
    """The shape of a @ b for stacks of matrices (batch axes broadcast)."""
    return tuple(np.broadcast_shapes(a.shape[:-2], b.shape[:-2])) + (a.shape[-2], b.shape[-1])


# Long causal sequences are scored block by block (see _causal_attention_blocked): from 128 positions on the
# CPU; on the GPU only once the (..., L, L) scores reach this many elements, below which the extra kernels
# of the blocks cost more than the skipped work saves.
GPU_BLOCKED_ATTENTION_SCORES = 2**25
CAUSAL_ATTENTION_BLOCKS = 4     # query blocks of the blocked path: n blocks score (n + 1) / 2n of the tiles


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 scale=None, generator=None):
    """softmax(Q K^T * scale + mask) V, with Q (..., L, D), K (..., S, D), V (..., S, Dv).

    attn_mask: bool (True = may attend, as in PyTorch) or float (added to the scores), broadcastable to
    (..., L, S); treated as a constant. is_causal: query i sees keys 0..i.
    """
    query, key, value = _t(query), _t(key), _t(value)
    q, k, v = query.data, key.data, value.data
    xp = _xp(q)
    if attn_mask is not None and is_causal:
        raise ValueError("scaled_dot_product_attention: pass attn_mask or is_causal=True, not both")
    if q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]:
        raise ValueError(f"scaled_dot_product_attention: query {q.shape}, key {k.shape} and value {v.shape} "
                         "must agree: (..., L, D), (..., S, D), (..., S, Dv)")
    L, S = q.shape[-2], k.shape[-2]
    scale = q.dtype.type(1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if is_causal and L == S and L >= 128 and (not kernels.available(q) or
                                              q.size // q.shape[-1] * L >= GPU_BLOCKED_ATTENTION_SCORES):
        return _causal_attention_blocked(query, key, value, scale, dropout_p, generator)

    in_place = backend.products_in_place(q)
    q_scaled, score_scale = _scaled_queries(q, scale, in_place)
    scores = matmul(q_scaled, k.swapaxes(-1, -2), alpha=score_scale)   # (..., L, S), scaled
    fused = kernels.available(scores) and attn_mask is None and (dropout_p == 0.0 or generator is None)
    if fused:                                               # GPU: masked softmax + dropout in one kernel
        seed = backend.next_seed() if dropout_p > 0.0 else 0
        probs, attn = kernels.softmax_dropout_forward(scores, is_causal, dropout_p, seed)
    elif is_causal:
        scores += _additive_mask(causal_mask(xp, L, S), q.dtype, ("causal", xp.__name__, L, S))
    elif attn_mask is not None:
        attn_mask = xp.asarray(attn_mask.data if isinstance(attn_mask, Tensor) else attn_mask)
        scores += _additive_mask(attn_mask, q.dtype) if attn_mask.dtype == bool else attn_mask
    if not fused:
        # softmax along the keys, in place: the scores array becomes the probabilities P
        probs = scores
        probs -= probs.max(axis=-1, keepdims=True)
        xp.exp(probs, out=probs)
        probs /= probs.sum(axis=-1, keepdims=True)
    if fused:
        pass                                                # attn = dropout(probs) came from the kernel
    elif dropout_p > 0.0:
        keep, keep_scale = _keep_mask(probs.shape, dropout_p, q.dtype, generator)
        attn = probs * keep                                  # A = dropout(P)
        attn *= keep_scale
    else:
        attn = probs
    out = matmul(attn, v, out=_empty_in_layout(q, _matmul_shape(attn, v), in_place))   # (..., L, Dv)

    # O = A V, A = dropout(P), P = softmax(S), S = (Q * scale) K^T
    #   dV = A^T dO                 dA = dO V^T
    #   dP = dA * dropout mask      dS = P * (dP - sum_j(dP * P))   (softmax backward, row by row;
    #                                    on the GPU sum_j(dP * P) is taken as dO . O, which equals it)
    #   dQ = dS K * scale           dK = dS^T (Q * scale)
    def backward(grad):
        attn_t = attn.swapaxes(-1, -2)
        grad_v = matmul(attn_t, grad, out=_empty_in_layout(v, _matmul_shape(attn_t, grad), in_place))  # (..., S, Dv)
        grad_scores = matmul(grad, v.swapaxes(-1, -2))      # (..., L, S): dA, turned into dS in place
        if fused:
            row_dot = (grad * out).sum(axis=-1)             # (..., L): sum_j dP * P, see the kernel
            grad_scores = kernels.softmax_dropout_backward(grad_scores, probs, row_dot, dropout_p, seed,
                                                           is_causal)
        else:
            if dropout_p > 0.0:
                grad_scores *= keep
                grad_scores *= keep_scale
            grad_scores -= (grad_scores * probs).sum(axis=-1, keepdims=True)
            grad_scores *= probs
        grad_q = matmul(grad_scores, k, alpha=scale,                                          # (..., L, D)
                        out=_empty_in_layout(q, _matmul_shape(grad_scores, k), in_place))
        grad_scores_t = grad_scores.swapaxes(-1, -2)
        grad_k = matmul(grad_scores_t, q_scaled, alpha=score_scale,                           # (..., S, D)
                        out=_empty_in_layout(k, _matmul_shape(grad_scores_t, q_scaled), in_place))
        return grad_q, grad_k, grad_v
    return _make(out, (query, key, value), backward, "scaled_dot_product_attention")


def _causal_attention_blocked(query, key, value, scale, dropout_p, generator):
    """Causal attention computed block by block of queries, skipping the keys no query of the block sees.

    The fast path for long sequences: the same maths as scaled_dot_product_attention (tests hold them
    equal), but queries i0..i1-1 are only scored against keys 0..i1-1. With 4 blocks that is 10 of the
    16 score tiles, so ~37% of the attention's multiplies, exponentials and dropout draws are never done.
    On the GPU each block's causal softmax and dropout is one fused kernel (query r of the block sees keys
    j <= i0 + r).
    """
    q, k, v = query.data, key.data, value.data
    xp = _xp(q)
    in_place = backend.products_in_place(q)
    if not in_place:                                        # read by every block: laid out once
        k, v = xp.ascontiguousarray(k), xp.ascontiguousarray(v)
    L = q.shape[-2]
    block = max(64, -(-L // CAUSAL_ATTENTION_BLOCKS))
    fused = kernels.available(q) and generator is None
    q_scaled, score_scale = _scaled_queries(q, scale, in_place)
    out = _empty_in_layout(q, q.shape[:-1] + v.shape[-1:], in_place)     # (..., L, Dv)
    saved = []                                              # per block: (i0, i1, P, A, dropout mask)
    for i0 in range(0, L, block):
        i1 = min(L, i0 + block)
        scores = matmul(q_scaled[..., i0:i1, :], k[..., :i1, :].swapaxes(-1, -2),      # (..., b, i1), scaled
                        alpha=score_scale)
        if fused:                                           # the mask is a seed: regenerated in backward
            mask = backend.next_seed() if dropout_p > 0.0 else 0
            probs, attn = kernels.softmax_dropout_forward(scores, True, dropout_p, mask, offset=i0)
        else:
            scores += _additive_mask(causal_mask(xp, i1 - i0, i1, offset=i0), q.dtype,
                                     ("causal", xp.__name__, i1 - i0, i1, i0))
            probs = scores                                  # softmax in place, as in the plain path
            probs -= probs.max(axis=-1, keepdims=True)
            xp.exp(probs, out=probs)
            probs /= probs.sum(axis=-1, keepdims=True)
            mask, attn = None, probs
            if dropout_p > 0.0:
                mask = _keep_mask(probs.shape, dropout_p, q.dtype, generator)    # (keep, keep_scale)
                attn = probs * mask[0]
                attn *= mask[1]
        matmul(attn, v[..., :i1, :], out=out[..., i0:i1, :])   # the block's rows of O, written in place
        saved.append((i0, i1, probs, attn, mask))

    # Per block, with P, A of shape (..., b, i1): the plain path's backward restricted to the visible keys.
    # Keys and values collect their gradients from every block that sees them; the products write (and add)
    # straight into the gradients' slices, and dQ's scale rides along in the product.
    def backward(grad):
        if not in_place:
            grad = xp.ascontiguousarray(grad)               # (..., L, Dv), sliced by every block
        row_dot = (grad * out).sum(axis=-1) if fused else None     # (..., L): the kernel's sum_j dP * P
        grad_q = _empty_in_layout(q, q.shape, in_place)
        # the last block sees every key: going backwards, it writes dK and dV whole, and the others add
        grad_k, grad_v = xp.empty_like(k), xp.empty_like(v)
        for i0, i1, probs, attn, mask in reversed(saved):
            first = i1 == L
            grad_block = grad[..., i0:i1, :]                # (..., b, Dv)
            matmul(attn.swapaxes(-1, -2), grad_block, out=grad_v[..., :i1, :], accumulate=not first)
            grad_scores = matmul(grad_block, v[..., :i1, :].swapaxes(-1, -2))     # dA, then dS
            if fused:
                grad_scores = kernels.softmax_dropout_backward(grad_scores, probs, row_dot, dropout_p, mask, True,
                                                               i0, row_dot_first=i0)
            else:
                if mask is not None:
                    grad_scores *= mask[0]
                    grad_scores *= mask[1]
                grad_scores -= (grad_scores * probs).sum(axis=-1, keepdims=True)
                grad_scores *= probs
            matmul(grad_scores, k[..., :i1, :], out=grad_q[..., i0:i1, :], alpha=scale)
            matmul(grad_scores.swapaxes(-1, -2), q_scaled[..., i0:i1, :], out=grad_k[..., :i1, :],
                   alpha=score_scale, accumulate=not first)
        return grad_q, grad_k, grad_v
    return _make(out, (query, key, value), backward, "scaled_dot_product_attention")
