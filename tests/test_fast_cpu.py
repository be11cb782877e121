"""Every CPU fast path equals its reference in npgpt/functional.py and optim.py: values and gradients."""

import numpy as np
import pytest

import npgpt
import npgpt.functional as F
from npgpt import engine, optim
from npgpt.fast.cpu import ops as cpu_ops
from npgpt.fast.cpu import threads

pytestmark = pytest.mark.textbook


def leaf(rng, *shape, dtype=np.float64):
    return npgpt.Tensor(rng.standard_normal(shape).astype(dtype), requires_grad=True)


def values_and_grads(fn, inputs, cotangent):
    """fn(*inputs) and the gradients of sum(fn(*inputs) * cotangent) with respect to every input."""
    for t in inputs:
        t.grad = None
    out = fn(*inputs)
    (out * npgpt.Tensor(cotangent)).sum().backward()
    return [out.data.copy()] + [t.grad.copy() for t in inputs]


def assert_same(fast, reference, rtol=1e-12, atol=1e-12):
    assert len(fast) == len(reference)
    for got, expected in zip(fast, reference):
        np.testing.assert_allclose(got, expected, rtol=rtol, atol=atol)


def test_the_dispatcher_picks_the_cpu_fast_paths():
    x = np.zeros((2, 3, 8, 4))
    assert engine.fast_path_for("scaled_dot_product_attention", (x, x, x), {}) is cpu_ops.scaled_dot_product_attention
    assert engine.fast_path_for("cross_entropy", (np.zeros((4, 5)), np.zeros(4, int)), {}) is cpu_ops.cross_entropy
    previous = engine.set_fast_paths_enabled(False)       # what NPGPT_FAST=0 and npgpt.fast.disable() do
    try:
        assert engine.fast_path_for("cross_entropy", (np.zeros((4, 5)), np.zeros(4, int)), {}) is None
    finally:
        engine.set_fast_paths_enabled(previous)
    float16 = np.zeros((2, 3), np.float16)
    with pytest.raises(TypeError, match="float16 is not supported"):
        F.gelu(float16)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_blocked_cross_entropy_equals_the_reference(reduction, monkeypatch):
    monkeypatch.setattr(cpu_ops, "CACHE_BLOCK_BYTES", 64 * 8 * 3)   # 3 rows a block: several blocks, a ragged end
    rng = np.random.default_rng(0)
    logits = leaf(rng, 11, 64)
    target = rng.integers(0, 64, 11)
    target[[2, 7]] = -100                                           # ignored rows
    cot = rng.standard_normal(11) if reduction == "none" else np.array(1.7)
    fast = values_and_grads(lambda z: cpu_ops.cross_entropy(z, target, reduction=reduction), [logits], cot)
    reference = values_and_grads(lambda z: F.cross_entropy.reference(z, target, reduction=reduction), [logits], cot)
    assert_same(fast, reference)
    # (N, C, d) logits take the same path
    logits3 = leaf(rng, 2, 5, 3)
    target3 = rng.integers(0, 5, (2, 3))
    assert_same(values_and_grads(lambda z: cpu_ops.cross_entropy(z, target3), [logits3], np.array(1.0)),
                values_and_grads(lambda z: F.cross_entropy.reference(z, target3), [logits3], np.array(1.0)))


def test_16_bit_dropout_keeps_its_masks_and_mean():
    rng = np.random.default_rng(1)
    x = leaf(rng, 300, 400)
    out = cpu_ops.dropout(x, 0.3, generator=np.random.default_rng(7))
    draws = np.random.default_rng(7).integers(0, 65536, size=x.shape, dtype=np.uint16)  # the same random draw
    keep = draws >= round(0.3 * 65536)
    scale = 65536 / (65536 - round(0.3 * 65536))
    np.testing.assert_array_equal(out.data, x.data * keep * scale)
    out.backward(np.ones(x.shape))
    np.testing.assert_array_equal(x.grad, keep * scale)
    assert abs(keep.mean() - 0.7) < 0.005
    assert abs(keep.mean() * scale - 1.0) < 0.01               # inverted dropout keeps the mean


@pytest.mark.parametrize("length", [6, 127, 128, 300])
@pytest.mark.parametrize("masked", ["causal", "bool", "float", "none"])
def test_cpu_attention_equals_the_reference(length, masked):
    """Short sequences: the softmax in place on the scores; causal ones from 128 on: block by block."""
    rng = np.random.default_rng(length)
    q, k, v = (leaf(rng, 2, 3, length, 8) for _ in range(3))
    cot = rng.standard_normal((2, 3, length, 8))
    kwargs = {"causal": dict(is_causal=True), "none": {},
              "bool": dict(attn_mask=(rng.random((length, length)) > 0.3) | np.eye(length, dtype=bool)),
              "float": dict(attn_mask=rng.standard_normal((length, length)))}[masked]
    fast = values_and_grads(lambda a, b, c: cpu_ops.scaled_dot_product_attention(a, b, c, scale=0.7, **kwargs),
                            [q, k, v], cot)
    reference = values_and_grads(lambda a, b, c: F.scaled_dot_product_attention.reference(a, b, c, scale=0.7,
                                                                                         **kwargs), [q, k, v], cot)
    assert_same(fast, reference, rtol=1e-10)


def test_blocked_attention_with_dropout_passes_gradcheck():
    rng = np.random.default_rng(3)
    q, k, v = (leaf(rng, 1, 1, 130, 4) for _ in range(3))
    npgpt.gradcheck(lambda a, b, c: cpu_ops.scaled_dot_product_attention(
        a, b, c, is_causal=True, dropout_p=0.2, generator=np.random.default_rng(3)), [q, k, v], max_probes=40)


def test_the_causal_mask_cache_is_bounded():
    cache = cpu_ops.MaskCache(max_bytes=8 * 2**20)
    for length in range(1, 1025):                      # generation with a growing context: 1..1024, float32
        cache.get(length, length, 0, np.dtype(np.float32))
    assert cache.bytes <= 8 * 2**20
    assert cache.bytes == sum(m.nbytes for m in cache.masks.values())
    mask = cache.get(3, 5, 1, np.dtype(np.float64))
    np.testing.assert_array_equal(mask, [[0, 0, -np.inf, -np.inf, -np.inf], [0, 0, 0, -np.inf, -np.inf],
                                         [0, 0, 0, 0, -np.inf]])
    assert cpu_ops.causal_masks.max_bytes <= 16 * 2**20


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_threaded_adamw_equals_the_reference_update(workers, monkeypatch):
    monkeypatch.setattr(cpu_ops, "ADAMW_PIECE", 1000)                # pieces of every parameter
    rng = np.random.default_rng(4)
    shapes = [(50, 70), (70,), (3, 4, 5)]
    params = {name: [npgpt.nn.Parameter(rng.standard_normal(s)) for s in shapes] for name in ("fast", "ref")}
    for a, b in zip(params["fast"], params["ref"]):
        b.data[...] = a.data
    previous = threads.set_workers(workers)
    try:
        opts = {name: optim.AdamW(ps, lr=0.01, weight_decay=0.1) for name, ps in params.items()}
        for step in range(3):
            grads = [rng.standard_normal(s) for s in shapes]
            for name in ("fast", "ref"):
                for p, g in zip(params[name], grads):
                    p.grad = g.copy()
            opts["fast"].step()
            with_fast = engine.set_fast_paths_enabled(False)
            opts["ref"].step()
            engine.set_fast_paths_enabled(with_fast)
    finally:
        threads.set_workers(previous)
    for a, b in zip(params["fast"], params["ref"]):
        np.testing.assert_array_equal(a.data, b.data)       # elementwise: the same operations, bit for bit
