"""CUDA fast paths: the textbook's ops on CuPy arrays through npgpt's kernels and cuBLAS.

The same maths as ``npgpt/functional.py`` and ``optim.py``, arranged for a GPU and for recording into a CUDA
graph (``graph.py``): every matrix product goes to cuBLAS directly (``cublas.matmul``; CuPy's own refuses to
run while a graph records), scales and sums ride inside the GEMMs (alpha, beta), and nothing waits for the
device or copies from the host while a graph records (``capturing()``).

    matmul, linear        cuBLAS; a linear layer's bias written first and the product added onto it
    layer_norm, gelu      one kernel each way; LayerNorm's weight and bias gradients as one column-sum kernel
    dropout               the mask hashed from (seed, index): nothing stored, regenerated in backward
    attention             heads read and written where they lie ((B, H, T, D) views of (B, T, H, D)
                          projections); masked softmax + dropout in one kernel; long sequences block by block
    cross_entropy         one kernel each way, the logits read once
    embedding             the reference, without the id check while a graph records (the graph checks batches)
    add_arrays            the residual stream's sums
    adamw_step            one kernel per parameter, the step's numbers read from device memory
    sum_of_squares        one reduction per gradient

Operands of two float dtypes never reach these (the dispatcher sends them to the reference); gradients of
another dtype arriving in a backward are cast to the op's dtype by the kernel wrappers.

Shapes: (B, T, C) activations, (B, H, T, D) heads, (N, V) logits.
"""

import math

import numpy as np

from ... import backend
from ... import functional as F
from ...engine import _make, register_fast_path
from ...engine import matmul as engine_matmul
from . import cublas, kernels
from .capture import capturing, copy_into

matmul = cublas.matmul      # alpha * (a @ b), into `out` (added when accumulate); recordable into a graph


def next_seed():
    """A fresh 63-bit seed drawn on the host: the dropout kernels hash it with each element's index, so their
    random numbers need no device generator and no copy back to the host."""
    return int(backend.host_rng().integers(0, 2**63 - 1))


_ones = {}


def ones_row(like, n):
    """A (1, n) row of ones on like's device, kept for reuse (not while a graph records: the fill would only
    run at replay)."""
    cp = backend.module_for("gpu")
    key = (cp.cuda.runtime.getDevice(), n, like.dtype.str)
    if key in _ones:
        return _ones[key]
    ones = cp.ones((1, n), dtype=like.dtype)
    if not capturing():
        _ones[key] = ones
    return ones


def sum_rows(array):
    """The sum over every leading axis, as a (1, N) @ (N, C) product whose reads are coalesced (a reduction
    over leading axes reads with a stride on a GPU). Its own array: a .grad keeps it."""
    flat = array.reshape(-1, array.shape[-1])
    summed = backend.module_for("gpu").empty(array.shape[-1:], dtype=array.dtype)
    matmul(ones_row(array, flat.shape[0]), flat, out=summed.reshape(1, -1))
    return summed


def empty_in_layout(like, shape):
    """An empty array of `shape` with its axes in memory in the same order as `like`'s. The heads arrive as
    (B, H, T, D) views of (B, T, H, D) projections; outputs and gradients laid out the same way make the
    heads' merge back to (B, T, C) a view, not a copy (cuBLAS writes the heads where they lie)."""
    cp = backend.module_for("gpu")
    if like.ndim != len(shape):
        return cp.empty(shape, dtype=like.dtype)
    return cp.empty_like(like, shape=shape)


def _matmul_shape(a, b):
    """The shape of a @ b for stacks of matrices (batch axes broadcast)."""
    return tuple(np.broadcast_shapes(a.shape[:-2], b.shape[:-2])) + (a.shape[-2], b.shape[-1])


# ========================================================================================================
# matmul, add, linear

def tensor_matmul(a, b):
    x, w = a.data, b.data
    if x.ndim < 2 or w.ndim < 2 or x.shape[-1] != w.shape[-2]:
        return engine_matmul.reference(a, b)

    def backward(grad):
        return matmul(grad, w.swapaxes(-1, -2)), matmul(x.swapaxes(-1, -2), grad)
    return _make(matmul(x, w), (a, b), backward, "matmul")


def add_arrays(a, b):
    return kernels.add(a, b)


def _same_contiguous_arrays(a, b):
    return (a.shape == b.shape and a.dtype == b.dtype and a.flags.c_contiguous and b.flags.c_contiguous)


def linear(input, weight, bias=None):
    """y = x W^T + b with the bias rows written first and the GEMM adding the product onto them (cuBLAS's
    beta = 1): the bias costs one write of the output instead of another pass over it."""
    input, weight = F._t(input), F._t(weight)
    bias = F._t(bias) if bias is not None else None
    x, W = input.data, weight.data
    if x.shape[-1] != W.shape[1]:
        return F.linear.reference(input, weight, bias)      # the reference's error
    x2d = x.reshape(-1, W.shape[1])                         # (N, in)
    if bias is None:
        out = matmul(x2d, W.T)
    else:
        out = kernels.fill_rows(bias.data, x2d.shape[0]) if bias.data.ndim == 1 else \
            backend.module_for("gpu").broadcast_to(bias.data, (x2d.shape[0], W.shape[0])).copy()
        matmul(x2d, W.T, out=out, accumulate=True)          # (N, out)
    out = out.reshape(*x.shape[:-1], W.shape[0])

    def backward(grad):
        grad2d = grad.reshape(-1, W.shape[0])
        grad_x = matmul(grad2d, W).reshape(x.shape) if input.requires_grad else None
        grad_W = matmul(grad2d.T, x2d) if weight.requires_grad else None
        if bias is None:
            return grad_x, grad_W
        return grad_x, grad_W, sum_rows(grad2d).reshape(bias.shape)

    parents = (input, weight, bias) if bias is not None else (input, weight)
    return _make(out, parents, backward, "linear")


# ========================================================================================================
# layer_norm, gelu, dropout

def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    input = F._t(input)
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if len(shape) != 1 or input.shape[-1:] != shape:
        return F.layer_norm.reference(input, normalized_shape, weight, bias, eps)
    weight = F._t(weight) if weight is not None else None
    bias = F._t(bias) if bias is not None else None
    parents = (input,) + ((weight,) if weight is not None else ()) + ((bias,) if bias is not None else ())
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


def gelu(input, approximate="none"):
    input = F._t(input)
    x = input.data
    out = kernels.gelu_forward(x)                           # Phi(x) is recomputed in backward, not stored
    return _make(out, (input,), lambda grad: (kernels.gelu_backward(grad, x),), "gelu")


def _exact_gelu(*args, **kwargs):
    return kwargs.get("approximate", args[1] if len(args) > 1 else "none") == "none"


def dropout(input, p=0.5, training=True, generator=None):
    input = F._t(input)
    if not 0.0 <= p <= 1.0 or not training or p in (0.0, 1.0):
        return F.dropout.reference(input, p, training, generator)
    seed = next_seed()
    return _make(kernels.dropout_forward(input.data, p, seed), (input,),
                 lambda grad: (kernels.dropout_backward(grad, p, seed),), "dropout")


def _no_generator(*args, **kwargs):
    return kwargs.get("generator", args[3] if len(args) > 3 else None) is None


# ========================================================================================================
# scaled_dot_product_attention

# On the GPU the blocked causal path pays only once the (..., L, L) scores reach this many elements: below
# it, the extra kernels of the blocks cost more than the skipped work saves.
BLOCKED_ATTENTION_SCORES = 2**25
CAUSAL_ATTENTION_BLOCKS = 4


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 scale=None, generator=None):
    """The reference's attention with the heads read where they lie, Q's scale as cuBLAS's alpha, and the
    causal softmax and dropout in one kernel (the mask from the indices, the dropout from a seed)."""
    query, key, value = F._t(query), F._t(key), F._t(value)
    q, k, v = query.data, key.data, value.data
    F.check_attention_inputs(q, k, v, attn_mask, is_causal)
    L, S = q.shape[-2], k.shape[-2]
    scale = q.dtype.type(1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if is_causal and L == S and L >= 128 and q.size // q.shape[-1] * L >= BLOCKED_ATTENTION_SCORES:
        return causal_attention_blocked(query, key, value, scale, dropout_p)

    scores = matmul(q, k.swapaxes(-1, -2), alpha=scale)                 # (..., L, S), scaled
    seed = next_seed() if dropout_p > 0.0 else 0
    probs, attn = kernels.softmax_dropout_forward(scores, is_causal, dropout_p, seed)
    out = matmul(attn, v, out=empty_in_layout(q, _matmul_shape(attn, v)))   # (..., L, Dv)

    # As the reference's backward; sum_j(dP * P) is taken as dO . O, which equals it (the kernel's row_dot)
    def backward(grad):
        attn_t = attn.swapaxes(-1, -2)
        grad_v = matmul(attn_t, grad, out=empty_in_layout(v, _matmul_shape(attn_t, grad)))     # (..., S, Dv)
        grad_attn = matmul(grad, v.swapaxes(-1, -2))                    # (..., L, S): dA
        row_dot = (grad * out).sum(axis=-1)                             # (..., L)
        grad_scores = kernels.softmax_dropout_backward(grad_attn, probs, row_dot, dropout_p, seed, is_causal)
        grad_q = matmul(grad_scores, k, alpha=scale, out=empty_in_layout(q, _matmul_shape(grad_scores, k)))
        grad_scores_t = grad_scores.swapaxes(-1, -2)
        grad_k = matmul(grad_scores_t, q, alpha=scale, out=empty_in_layout(k, _matmul_shape(grad_scores_t, q)))
        return grad_q, grad_k, grad_v
    return _make(out, (query, key, value), backward, "scaled_dot_product_attention")


def causal_attention_blocked(query, key, value, scale, dropout_p):
    """Causal attention block by block of queries (see npgpt/fast/cpu/ops.py for the idea): each block's
    causal softmax and dropout is one kernel (query r of the block sees keys j <= i0 + r)."""
    q, k, v = query.data, key.data, value.data
    L = q.shape[-2]
    block = max(64, -(-L // CAUSAL_ATTENTION_BLOCKS))
    out = empty_in_layout(q, q.shape[:-1] + v.shape[-1:])               # (..., L, Dv)
    saved = []                                              # per block: (i0, i1, P, A, dropout seed)
    for i0 in range(0, L, block):
        i1 = min(L, i0 + block)
        scores = matmul(q[..., i0:i1, :], k[..., :i1, :].swapaxes(-1, -2), alpha=scale)    # (..., b, i1)
        seed = next_seed() if dropout_p > 0.0 else 0
        probs, attn = kernels.softmax_dropout_forward(scores, True, dropout_p, seed, offset=i0)
        matmul(attn, v[..., :i1, :], out=out[..., i0:i1, :])
        saved.append((i0, i1, probs, attn, seed))

    def backward(grad):
        row_dot = (grad * out).sum(axis=-1)                             # (..., L)
        grad_q = empty_in_layout(q, q.shape)
        cp = backend.module_for("gpu")
        grad_k, grad_v = cp.empty_like(k), cp.empty_like(v)
        for i0, i1, probs, attn, seed in reversed(saved):
            first = i1 == L                                 # the last block sees every key: it writes them whole
            grad_block = grad[..., i0:i1, :]
            matmul(attn.swapaxes(-1, -2), grad_block, out=grad_v[..., :i1, :], accumulate=not first)
            grad_attn = matmul(grad_block, v[..., :i1, :].swapaxes(-1, -2))
            grad_scores = kernels.softmax_dropout_backward(grad_attn, probs, row_dot, dropout_p, seed, True,
                                                           i0, row_dot_first=i0)
            matmul(grad_scores, k[..., :i1, :], out=grad_q[..., i0:i1, :], alpha=scale)
            matmul(grad_scores.swapaxes(-1, -2), q[..., i0:i1, :], out=grad_k[..., :i1, :], alpha=scale,
                   accumulate=not first)
        return grad_q, grad_k, grad_v
    return _make(out, (query, key, value), backward, "scaled_dot_product_attention")


def _fused_attention_applies(*args, **kwargs):
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "generator")
    given = dict(zip(names, args), **kwargs)
    return given.get("attn_mask") is None and (given.get("dropout_p", 0.0) == 0.0 or given.get("generator") is None)


# ========================================================================================================
# cross_entropy, embedding

def cross_entropy(input, target, ignore_index=-100, reduction="mean"):
    input = F._t(input)
    logits = input.data
    cp = backend.module_for("gpu")
    z, labels = F.cross_entropy_rows(logits, target, reduction)
    if not backend.is_gpu_array(labels) or not capturing():     # device ids cost a wait; a graph checks its own
        F.check_class_ids(labels, z.shape[1], ignore_index)
    t = cp.asarray(labels).reshape(-1)
    valid = t != ignore_index
    count = valid.sum()
    logsumexp, losses = kernels.cross_entropy_forward(z, t, ignore_index)   # the logits read once

    def backward(grad):
        row_scale = F.cross_entropy_row_scale(grad, valid, count, reduction, z.dtype)
        return (F.grad_logits_shape(kernels.cross_entropy_backward(z, t, logsumexp, row_scale), logits),)

    out = F.cross_entropy_output(losses, count, labels, reduction, z.dtype)
    return _make(out, (input,), backward, "cross_entropy")


def embedding(input, weight):
    weight = F._t(weight)
    W = weight.data
    cp = backend.module_for("gpu")
    ids = F.embedding_ids(input)
    if not backend.is_gpu_array(ids) or not capturing():
        F.check_ids(ids, W.shape[0])
    ids = cp.asarray(ids)

    def backward(grad):
        grad_W = cp.zeros_like(W)
        backend.scatter_add(grad_W, ids.reshape(-1), grad.reshape(-1, W.shape[1]))
        return (grad_W,)
    return _make(W[ids], (weight,), backward, "embedding")


# ========================================================================================================
# AdamW and the gradient norm

class AdamWSchedule:
    """The numbers AdamW's kernels read from device memory: one row (lr, lr / (1 - beta1^t),
    1 / sqrt(1 - beta2^t)) per parameter of the last step. A recorded CUDA graph keeps its kernel arguments;
    reading these instead, its replays follow the learning-rate schedule and the step count
    (graph.py calls replay_step before each replay)."""

    def __init__(self):
        self.updates, self.rows = [], None

    def write(self, updates):
        cp = backend.module_for("gpu")
        self.updates = updates
        if self.rows is None or self.rows.shape[0] != len(updates):
            self.rows = cp.zeros((len(updates), 3), dtype=np.float64)      # (parameters, 3)
        if not capturing():          # while a graph records, the copy waits for replay_step
            copy_into(self.rows, self.host_rows())

    def host_rows(self):
        rows = []
        for _, state, group in self.updates:
            lr, (beta1, beta2), t = group["lr"], group["betas"], state["step"]
            rows.append((lr, lr / (1 - beta1 ** t), 1 / math.sqrt(1 - beta2 ** t)))
        return np.array(rows, dtype=np.float64)

    def replay_step(self, count=True):
        """Before a recorded step replays: count the step for the parameters it updates (count=False for the
        launch right after recording, whose step() already counted) and write the numbers it reads."""
        if count:
            for _, state, _ in self.updates:
                state["step"] += 1
        copy_into(self.rows, self.host_rows())


adamw_schedule = AdamWSchedule()


def adamw_step(updates):
    adamw_schedule.write(updates)
    for (p, state, group), row in zip(updates, adamw_schedule.rows):
        kernels.adamw_update(p.data, p.grad, state["exp_avg"], state["exp_avg_sq"], group["betas"],
                             group["eps"], group["weight_decay"], row)


def register():
    register_fast_path("matmul", tensor_matmul, "gpu")
    register_fast_path("add_arrays", add_arrays, "gpu", applies=_same_contiguous_arrays)
    register_fast_path("linear", linear, "gpu")
    register_fast_path("layer_norm", layer_norm, "gpu")
    register_fast_path("gelu", gelu, "gpu", applies=_exact_gelu)
    register_fast_path("dropout", dropout, "gpu", applies=_no_generator)
    register_fast_path("scaled_dot_product_attention", scaled_dot_product_attention, "gpu",
                       applies=_fused_attention_applies)
    register_fast_path("cross_entropy", cross_entropy, "gpu")
    register_fast_path("embedding", embedding, "gpu")
    register_fast_path("adamw_step", adamw_step, "gpu")
    register_fast_path("sum_of_squares", kernels.sum_of_squares, "gpu")
