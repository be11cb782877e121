"""The CUDA fast paths' own logic, run on the CPU: cuBLAS and the kernels replaced by NumPy stand-ins that do
what their docstrings say, so the arrangement around them (bias first, heads read and written in their
layout, scales as alpha, blocks, dS from dO . O) is held equal to the reference on any machine. On a GPU,
tests/test_gpu.py runs the real kernels."""

import numpy as np
import pytest

import npgpt
import npgpt.functional as F
from npgpt import backend
from npgpt.fast.cuda import kernels, ops as cuda_ops



def stand_in_matmul(a, b, out=None, alpha=1.0, accumulate=False):
    """alpha * (a @ b), returned or written into out (added when accumulate): cublas.matmul's contract."""
    product = np.matmul(a, b) * a.dtype.type(alpha)
    if out is None:
        return product
    if accumulate:
        out += product
    else:
        out[...] = product
    return out


def stand_in_softmax_dropout_forward(scores, causal, p, seed, offset=0):
    assert p == 0.0
    L, S = scores.shape[-2:]
    allowed = np.tri(L, S, k=offset, dtype=bool) if causal else np.ones((L, S), bool)
    probs = F.softmax_and_logsumexp(np.where(allowed, scores, -np.inf))[0]
    return probs, probs


def stand_in_softmax_dropout_backward(grad_attn, probs, row_dot, p, seed, causal=False, offset=0,
                                      row_dot_first=0):
    L = probs.shape[-2]
    return probs * (grad_attn - row_dot[..., row_dot_first:row_dot_first + L, None])


@pytest.fixture
def emulated_gpu(monkeypatch):
    monkeypatch.setattr(backend, "module_for", lambda device: np)
    monkeypatch.setattr(cuda_ops, "matmul", stand_in_matmul)
    monkeypatch.setattr(cuda_ops, "capturing", lambda: False)
    monkeypatch.setattr(cuda_ops, "ones_row", lambda like, n: np.ones((1, n), like.dtype))
    monkeypatch.setattr(kernels, "fill_rows", lambda bias, rows: np.tile(bias, (rows, 1)))
    monkeypatch.setattr(kernels, "softmax_dropout_forward", stand_in_softmax_dropout_forward)
    monkeypatch.setattr(kernels, "softmax_dropout_backward", stand_in_softmax_dropout_backward)


def grads_of(fn, tensors, cot):
    for t in tensors:
        t.grad = None
    out = fn(*tensors)
    (out * npgpt.Tensor(cot)).sum().backward()
    return [out.data.copy()] + [t.grad.copy() for t in tensors]


def test_linear_writes_the_bias_first(emulated_gpu):
    rng = np.random.default_rng(0)
    x, w, b = (npgpt.Tensor(rng.standard_normal(s), requires_grad=True) for s in ((2, 5, 4), (3, 4), (3,)))
    cot = rng.standard_normal((2, 5, 3))
    fast = grads_of(cuda_ops.linear, [x, w, b], cot)
    reference = grads_of(F.linear.reference, [x, w, b], cot)
    for got, expected in zip(fast, reference):
        np.testing.assert_allclose(got, expected, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(fast[0], x.data @ w.data.T + b.data, rtol=1e-13)
    npgpt.gradcheck(cuda_ops.linear, [x, w, b])


@pytest.mark.parametrize("length,blocked", [(6, False), (130, False), (130, True)])
def test_attention_on_head_views_writes_in_their_layout(emulated_gpu, monkeypatch, length, blocked):
    """Heads arrive as (B, H, T, D) views of (B, T, H, D) projections and are read where they lie; the output
    and the gradients come back in the (B, T, H, D) layout, so merging the heads is a view."""
    monkeypatch.setattr(cuda_ops, "BLOCKED_ATTENTION_SCORES", 0 if blocked else 2**60)
    rng = np.random.default_rng(length)
    projections = [rng.standard_normal((2, length, 3, 4)) for _ in range(3)]          # (B, T, H, D)
    cot = rng.standard_normal((2, 3, length, 4))
    results = {}
    for name, attention in (("fast", cuda_ops.scaled_dot_product_attention),
                            ("reference", F.scaled_dot_product_attention.reference)):
        heads = [npgpt.Tensor(p.copy(), requires_grad=True) for p in projections]
        q, k, v = (h.transpose(1, 2) for h in heads)                    # (B, H, T, D) views
        out = attention(q, k, v, is_causal=True, scale=0.7)
        backward = out._backward
        (out * npgpt.Tensor(cot)).sum().backward()
        results[name] = [out.data] + [h.grad for h in heads]
        if name == "fast":
            assert out.data.swapaxes(1, 2).flags.c_contiguous, "heads merge back to (B, T, C) as a view"
            grads = backward(cot.swapaxes(1, 2).copy().swapaxes(1, 2))     # dO as the merge's view
            assert all(g.swapaxes(1, 2).flags.c_contiguous for g in grads), "dQ, dK, dV in (B, T, H, D)"
    for got, expected in zip(results["fast"], results["reference"]):
        np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


def test_adamw_schedule_rows(emulated_gpu):
    """AdamW's kernels read (lr, lr / (1 - beta1^t), 1 / sqrt(1 - beta2^t)) per parameter from the schedule."""
    p = npgpt.nn.Parameter(np.ones(3))
    state, group = {"step": 2}, {"lr": 0.1, "betas": (0.9, 0.99)}
    schedule = cuda_ops.AdamWSchedule()
    schedule.updates = [(p, state, group)]
    np.testing.assert_allclose(schedule.host_rows(), [[0.1, 0.1 / (1 - 0.81), 1 / np.sqrt(1 - 0.99 ** 2)]])
