"""Forward values and gradients equal PyTorch's in float64 (1e-9 relative), and AdamW equals torch's AdamW."""

import numpy as np
import pytest
from hypothesis import given, strategies as st

import npgpt
import npgpt.functional as F
from npgpt import backend
from strategies import seeds

pytestmark = pytest.mark.textbook      # run again with NPGPT_FAST=0 in CI

RTOL = 1e-9


def assert_close(ours, theirs, what):
    ours, theirs = backend.to_numpy(ours), theirs.detach().numpy()
    assert ours.shape == theirs.shape, what
    if not theirs.size:
        return
    # relative to the tensor's magnitude; a 1e-13 floor for tensors that are exactly zero in exact arithmetic
    scale = np.abs(theirs).max()
    err = np.abs(ours - theirs).max()
    assert err <= RTOL * scale + 1e-13, f"{what}: max error {err:.3g} against magnitude {scale:.3g}"


def compare(torch, np_fn, torch_fn, arrays, seed=0):
    """Run both on the same float64 inputs with the same random output cotangent; compare out and grads."""
    xp = backend.current()
    ours = [npgpt.Tensor(xp.asarray(a), requires_grad=True) for a in arrays]
    theirs = [torch.tensor(a, requires_grad=True) for a in arrays]
    out_ours, out_theirs = np_fn(*ours), torch_fn(*theirs)
    assert_close(out_ours.data, out_theirs, "forward")
    cot = np.random.default_rng(seed).standard_normal(out_theirs.shape)
    (out_ours * npgpt.Tensor(xp.asarray(cot))).sum().backward()
    (out_theirs * torch.tensor(cot)).sum().backward()
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert_close(a.grad, b.grad, f"gradient of input {i}")


def randn(seed, *shape):
    return np.random.default_rng(seed).standard_normal(shape)


def test_tensor_ops_match_torch(device, torch):
    a, b, pos = randn(0, 3, 4), randn(1, 4), np.abs(randn(2, 3, 4)) + 0.5
    compare(torch, lambda x, y: (x + y) * (x - y) / (y * y + 1), lambda x, y: (x + y) * (x - y) / (y * y + 1),
            [a, b])
    compare(torch, lambda x: x.exp() + x.tanh() + x.log() + x.sqrt() + x ** 1.7 + 2.0 ** x,
            lambda x: x.exp() + x.tanh() + x.log() + x.sqrt() + x ** 1.7 + 2.0 ** x, [pos])
    compare(torch, lambda x, y: x @ y, lambda x, y: x @ y, [randn(3, 2, 3, 4), randn(4, 4, 5)])
    compare(torch, lambda x: x.sum(axis=1) + x.mean(axis=1) + x.max(axis=1),
            lambda x: x.sum(dim=1) + x.mean(dim=1) + x.amax(dim=1), [randn(5, 3, 4, 2)])
    compare(torch, lambda x: x.reshape(4, 6).transpose(0, 1).permute(1, 0)[1:3, ::2],
            lambda x: x.reshape(4, 6).transpose(0, 1).permute(1, 0)[1:3, ::2], [randn(6, 2, 3, 4)])


@given(seed=seeds, rows=st.integers(1, 5), d_in=st.integers(2, 6), d_out=st.integers(1, 6))
def test_layer_ops_match_torch(device, torch, seed, rows, d_in, d_out):
    tF = torch.nn.functional
    x, w, b = randn(seed, 2, rows, d_in), randn(seed + 1, d_out, d_in), randn(seed + 2, d_out)
    compare(torch, F.linear, tF.linear, [x, w, b], seed)
    g, h = randn(seed + 3, d_in), randn(seed + 4, d_in)
    compare(torch, lambda a, s, t: F.layer_norm(a, (d_in,), s, t), lambda a, s, t: tF.layer_norm(a, (d_in,), s, t),
            [x, g, h], seed)
    compare(torch, F.gelu, tF.gelu, [3 * x], seed)
    compare(torch, lambda a: F.gelu(a, approximate="tanh"), lambda a: tF.gelu(a, approximate="tanh"), [3 * x], seed)
    compare(torch, lambda a: F.softmax(a, -1), lambda a: tF.softmax(a, dim=-1), [x], seed)
    compare(torch, lambda a: F.log_softmax(a, 1), lambda a: tF.log_softmax(a, dim=1), [x], seed)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_matches_torch(device, torch, reduction):
    xp = backend.current()
    target = np.random.default_rng(0).integers(0, 7, size=9)
    target[3] = -100
    compare(torch, lambda z: F.cross_entropy(z, xp.asarray(target), reduction=reduction),
            lambda z: torch.nn.functional.cross_entropy(z, torch.tensor(target), reduction=reduction),
            [randn(1, 9, 7) * 4])
    target3 = np.random.default_rng(1).integers(0, 5, size=(2, 3))
    compare(torch, lambda z: F.cross_entropy(z, xp.asarray(target3), reduction=reduction),
            lambda z: torch.nn.functional.cross_entropy(z, torch.tensor(target3), reduction=reduction),
            [randn(2, 2, 5, 3)])


def test_embedding_matches_torch(device, torch):
    xp = backend.current()
    ids = np.random.default_rng(0).integers(0, 6, size=(3, 5))
    compare(torch, lambda w: F.embedding(xp.asarray(ids), w),
            lambda w: torch.nn.functional.embedding(torch.tensor(ids), w), [randn(1, 6, 4)])


@pytest.mark.parametrize("mask_kind", ["none", "causal", "bool", "float"])
def test_attention_matches_torch(device, torch, mask_kind):
    xp = backend.current()
    q, k, v = randn(0, 2, 3, 5, 4), randn(1, 2, 3, 7, 4), randn(2, 2, 3, 7, 6)
    if mask_kind == "causal":
        q, k, v = q, k[:, :, :5], v[:, :, :5]
    kwargs_np, kwargs_t = {}, {}
    if mask_kind == "causal":
        kwargs_np = kwargs_t = {"is_causal": True}
    elif mask_kind == "bool":
        m = np.random.default_rng(3).random((5, 7)) > 0.4
        m[:, 0] = True
        kwargs_np, kwargs_t = {"attn_mask": xp.asarray(m)}, {"attn_mask": torch.tensor(m)}
    elif mask_kind == "float":
        m = randn(4, 5, 7)
        kwargs_np, kwargs_t = {"attn_mask": xp.asarray(m)}, {"attn_mask": torch.tensor(m)}
    compare(torch, lambda a, b, c: F.scaled_dot_product_attention(a, b, c, **kwargs_np),
            lambda a, b, c: torch.nn.functional.scaled_dot_product_attention(a, b, c, **kwargs_t), [q, k, v])


def test_adamw_matches_torch(device, torch):
    xp = backend.current()
    rng = np.random.default_rng(0)
    shapes = [(4, 3), (3,), (2, 2, 2)]
    start = [rng.standard_normal(s) for s in shapes]
    ours = [npgpt.nn.Parameter(xp.asarray(a.copy())) for a in start]
    theirs = [torch.nn.Parameter(torch.tensor(a.copy())) for a in start]
    settings = dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-7, weight_decay=0.1)
    opt_ours = npgpt.optim.AdamW(ours, **settings)
    opt_theirs = torch.optim.AdamW(theirs, **settings)
    for step in range(8):
        grads = [rng.standard_normal(s) for s in shapes]
        for p, q, g in zip(ours, theirs, grads):
            p.grad = xp.asarray(g)
            q.grad = torch.tensor(g)
        if step == 5:   # a parameter without a gradient is left alone by both
            ours[1].grad, theirs[1].grad = None, None
        opt_ours.step()
        opt_theirs.step()
        for p, q in zip(ours, theirs):
            assert_close(p.data, q, f"parameter after step {step}")


@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_clip_grad_norm_matches_torch(device, torch, max_norm):
    xp = backend.current()
    rng = np.random.default_rng(1)
    shapes = [(40, 30), (30,), (2, 3, 4)]
    grads = [rng.standard_normal(s) for s in shapes]
    ours = [npgpt.nn.Parameter(xp.zeros(s)) for s in shapes]
    theirs = [torch.nn.Parameter(torch.zeros(s, dtype=torch.float64)) for s in shapes]
    for p, q, g in zip(ours, theirs, grads):
        p.grad, q.grad = xp.asarray(g.copy()), torch.tensor(g.copy())
    norm_ours = npgpt.optim.clip_grad_norm_(ours, max_norm)
    norm_theirs = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
    assert_close(xp.asarray(norm_ours), norm_theirs, "the norm before clipping")
    for i, (p, q) in enumerate(zip(ours, theirs)):
        assert_close(p.grad, q.grad, f"gradient {i} after clipping")
    # one parameter alone, not in a list, as torch takes it
    ours[0].grad, theirs[0].grad = xp.asarray(grads[0].copy()), torch.tensor(grads[0].copy())
    assert_close(xp.asarray(npgpt.optim.clip_grad_norm_(ours[0], max_norm)),
                 torch.nn.utils.clip_grad_norm_(theirs[0], max_norm), "one parameter's norm")
    assert_close(ours[0].grad, theirs[0].grad, "one parameter's gradient after clipping")


def test_cosine_schedule_matches_definition():
    lr = [npgpt.optim.cosine_lr(s, 1e-3, 1e-4, 10, 110) for s in range(120)]
    assert lr[0] == pytest.approx(1e-4) and lr[9] == pytest.approx(1e-3)
    assert lr[60] == pytest.approx(1e-4 + 0.5 * 9e-4)       # halfway through the decay
    assert lr[110] == lr[119] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lr[10:110], lr[11:111]))
