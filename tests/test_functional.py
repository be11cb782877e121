"""Every layer op of npgpt.functional passes gradcheck in float64 over generated shapes, and errors are clear."""

import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

import npgpt
import npgpt.functional as F
from npgpt import backend
from strategies import rand, seeds

pytestmark = pytest.mark.textbook      # run again with NPGPT_FAST=0 in CI

lead_shapes = st.sampled_from([(), (1,), (3,), (2, 3), (2, 1, 2)])


@given(lead=lead_shapes, d_in=st.integers(1, 5), d_out=st.integers(1, 5), bias=st.booleans(), seed=seeds)
def test_linear(device, lead, d_in, d_out, bias, seed):
    x, w = rand(lead + (d_in,), seed), rand((d_out, d_in), seed + 1)
    if bias:
        npgpt.gradcheck(lambda a, b, c: F.linear(a, b, c), [x, w, rand((d_out,), seed + 2)])
    else:
        npgpt.gradcheck(lambda a, b: F.linear(a, b), [x, w])


@given(lead=lead_shapes, c=st.integers(2, 6), affine=st.booleans(), two_dims=st.booleans(), seed=seeds)
def test_layer_norm(device, lead, c, affine, two_dims, seed):
    normalized = (2, c) if two_dims else (c,)
    x = rand(lead + normalized, seed)
    if affine:
        w, b = rand(normalized, seed + 1), rand(normalized, seed + 2)
        npgpt.gradcheck(lambda a, g, h: F.layer_norm(a, normalized, g, h), [x, w, b])
    else:
        npgpt.gradcheck(lambda a: F.layer_norm(a, normalized), [x])


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@given(lead=lead_shapes, seed=seeds)
def test_gelu(device, approximate, lead, seed):
    x = rand(lead + (4,), seed)
    x.data *= 3    # reach the tails as well as the middle
    npgpt.gradcheck(lambda a: F.gelu(a, approximate), [x])


def test_erf_matches_math_erf_to_float64_precision():
    grid = np.concatenate([np.linspace(-10, 10, 20001), np.geomspace(1e-300, 1e-3, 50),
                           -np.geomspace(1e-300, 1e-3, 50), [0.0, 0.5, 1.0, 1.0 + 1e-15, 8.0, 27.0, -27.0]])
    exact = np.array([math.erf(v) for v in grid])
    got = F.erf(grid)
    rel = np.abs(got - exact) / np.maximum(np.abs(exact), 1e-300)
    assert rel.max() < 4e-16, (grid[rel.argmax()], rel.max())


def test_gelu_left_tail_keeps_relative_precision():
    x = np.array([-5.0, -8.0, -12.0])
    exact = np.array([v * 0.5 * math.erfc(-v / math.sqrt(2)) for v in x])
    got = F.gelu(npgpt.Tensor(x)).data
    np.testing.assert_allclose(got, exact, rtol=1e-13)


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
@given(shape=st.sampled_from([(5,), (3, 4), (2, 3, 4), (1, 1, 3)]), seed=seeds, data=st.data())
def test_softmax_family(device, op, shape, seed, data):
    dim = data.draw(st.integers(-len(shape), len(shape) - 1))
    fn = getattr(F, op)
    npgpt.gradcheck(lambda a: fn(a, dim), [rand(shape, seed)])


def test_softmax_is_stable_for_large_logits(device):
    xp = backend.current()
    out = F.softmax(npgpt.Tensor(xp.asarray([1000.0, 1000.0, -1000.0])), -1)
    np.testing.assert_allclose(backend.to_numpy(out.data), [0.5, 0.5, 0.0])
    out = F.log_softmax(npgpt.Tensor(xp.asarray([1000.0, 0.0])), -1)
    np.testing.assert_allclose(backend.to_numpy(out.data), [0.0, -1000.0])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@given(n=st.integers(1, 6), c=st.integers(2, 5), seed=seeds, ignore=st.booleans())
def test_cross_entropy(device, reduction, n, c, seed, ignore):
    xp = backend.current()
    target = np.random.default_rng(seed).integers(0, c, size=n)
    if ignore and n > 1:
        target[0] = -100
    target = xp.asarray(target)
    npgpt.gradcheck(lambda z: F.cross_entropy(z, target, reduction=reduction), [rand((n, c), seed)])


def test_cross_entropy_shapes_and_values(device):
    xp = backend.current()
    logits = np.array([[2.0, 1.0, 0.1], [0.5, 2.5, 0.3]])
    target = np.array([0, 2])
    expected = [-math.log(math.exp(2) / (math.exp(2) + math.exp(1) + math.exp(0.1))),
                -math.log(math.exp(0.3) / (math.exp(0.5) + math.exp(2.5) + math.exp(0.3)))]
    out = F.cross_entropy(npgpt.Tensor(xp.asarray(logits)), xp.asarray(target), reduction="none")
    np.testing.assert_allclose(backend.to_numpy(out.data), expected, rtol=1e-12)
    # (N, C, d) layout: class axis 1, as in PyTorch
    z = rand((2, 3, 4), 0)
    t = xp.asarray(np.random.default_rng(0).integers(0, 3, (2, 4)))
    npgpt.gradcheck(lambda a: F.cross_entropy(a, t), [z])
    npgpt.gradcheck(lambda a: F.cross_entropy(a, xp.asarray(1)), [rand((3,), 1)])
    # huge logits stay finite
    big = F.cross_entropy(npgpt.Tensor(xp.asarray([[1e4, 0.0]])), xp.asarray([1]))
    assert float(big.item()) == pytest.approx(1e4)


def test_cross_entropy_errors(device):
    xp = backend.current()
    z = npgpt.Tensor(xp.zeros((2, 3)))
    with pytest.raises(IndexError, match=r"\[0, 3\)"):
        F.cross_entropy(z, xp.asarray([0, 3]))
    with pytest.raises(ValueError, match="target of shape"):
        F.cross_entropy(z, xp.asarray([0, 1, 2]))


@given(ids_shape=st.sampled_from([(3,), (2, 4), (1, 1)]), seed=seeds)
def test_embedding(device, ids_shape, seed):
    xp = backend.current()
    ids = xp.asarray(np.random.default_rng(seed).integers(0, 5, size=ids_shape))
    npgpt.gradcheck(lambda w: F.embedding(ids, w) * F.embedding(ids, w), [rand((5, 3), seed)])


def test_embedding_repeated_ids_accumulate(device):
    xp = backend.current()
    w = npgpt.Tensor(xp.zeros((4, 2)), requires_grad=True)
    F.embedding(xp.asarray([[1, 1], [3, 1]]), w).sum().backward()
    np.testing.assert_array_equal(backend.to_numpy(w.grad), [[0, 0], [3, 3], [0, 0], [1, 1]])


def test_embedding_refuses_out_of_range_ids(device):
    xp = backend.current()
    w = npgpt.Tensor(xp.zeros((4, 2)))
    with pytest.raises(IndexError, match=r"\[0, 4\)"):
        F.embedding(xp.asarray([0, -1]), w)      # NumPy alone would silently take row 3
    with pytest.raises(IndexError, match=r"\[0, 4\)"):
        F.embedding(xp.asarray([4]), w)
    with pytest.raises(TypeError, match="integers"):
        F.embedding(xp.asarray([0.0]), w)


def test_dropout_statistics_and_gradient(device):
    xp = backend.current()
    x = npgpt.Tensor(xp.ones((200, 500), dtype=np.float32), requires_grad=True)
    y = F.dropout(x, p=0.3, generator=backend.default_rng(0))
    values = backend.to_numpy(y.data)
    kept = values != 0
    assert abs(kept.mean() - 0.7) < 0.01
    # kept values are scaled by 1/(1-p) (p as rounded for 16-bit random numbers: within 1e-4)
    np.testing.assert_allclose(values[kept], 1 / 0.7, rtol=1e-4)
    assert len(np.unique(values[kept])) == 1
    assert abs(values.mean() - 1.0) < 0.01                 # inverted dropout keeps the mean
    assert y.dtype == np.float32
    y.sum().backward()
    np.testing.assert_array_equal(backend.to_numpy(x.grad), values)   # d(x*m/(1-p))/dx = m/(1-p)
    assert F.dropout(x, p=0.3, training=False) is x
    npgpt.gradcheck(lambda a: F.dropout(a, 0.4, generator=backend.default_rng(5)), [rand((3, 4), 0)])


@pytest.mark.parametrize("causal", [False, True])
@given(lead=st.sampled_from([(), (2,), (2, 3)]), length=st.integers(1, 4), d=st.integers(1, 3), seed=seeds)
def test_attention(device, causal, lead, length, d, seed):
    q, k, v = (rand(lead + (length, d), seed + i) for i in range(3))
    npgpt.gradcheck(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=causal), [q, k, v])


def test_attention_masks_dropout_and_cross_lengths(device):
    xp = backend.current()
    q, k, v = rand((2, 3, 4), 0), rand((2, 5, 4), 1), rand((2, 5, 2), 2)
    bool_mask = xp.asarray(np.random.default_rng(0).random((3, 5)) > 0.3)
    bool_mask[:, 0] = True                       # every query sees at least one key
    bool_mask[:, 4] = False                      # and no query sees key 4
    float_mask = xp.asarray(np.random.default_rng(1).standard_normal((3, 5)))
    sdpa = F.scaled_dot_product_attention
    npgpt.gradcheck(lambda a, b, c: sdpa(a, b, c, attn_mask=bool_mask), [q, k, v])
    npgpt.gradcheck(lambda a, b, c: sdpa(a, b, c, attn_mask=float_mask, scale=0.3), [q, k, v])
    npgpt.gradcheck(lambda a, b, c: sdpa(a, b, c, dropout_p=0.3, generator=backend.default_rng(7)), [q, k, v])
    # a masked key has no influence at all
    out = sdpa(q, k, v, attn_mask=bool_mask)
    never_seen = xp.asarray(~backend.to_numpy(bool_mask).any(axis=0))
    assert bool(never_seen.any())
    changed_v = v.data.copy()
    changed_v[:, never_seen] += 100.0
    np.testing.assert_allclose(backend.to_numpy(sdpa(q, k, changed_v, attn_mask=bool_mask).data),
                               backend.to_numpy(out.data), rtol=1e-12)
    causal = sdpa(rand((1, 4, 2), 3), rand((1, 4, 2), 4), v.data[:1, :4], is_causal=True)
    first_row_only_sees_first_key = backend.to_numpy(causal.data)[0, 0]
    np.testing.assert_allclose(first_row_only_sees_first_key, backend.to_numpy(v.data)[0, 0], rtol=1e-12)
    assert out.shape == (2, 3, 2)
    with pytest.raises(ValueError, match="not both"):
        sdpa(q, k, v, attn_mask=bool_mask, is_causal=True)


def test_float32_erf_and_gelu_are_float32_accurate():
    grid = np.linspace(-9, 9, 40001)
    exact = np.array([math.erf(v) for v in grid])
    got = F.erf(grid.astype(np.float32))
    assert got.dtype == np.float32
    assert np.abs(got - exact).max() < 4e-7                 # a few float32 ulp of 1
    x = np.random.default_rng(0).standard_normal(100000).astype(np.float32) * 3
    exact_gelu = np.array([v * 0.5 * math.erfc(-v / math.sqrt(2)) for v in x.astype(np.float64)])
    got_gelu = F.gelu(npgpt.Tensor(x)).data
    assert got_gelu.dtype == np.float32
    assert np.abs(got_gelu - exact_gelu).max() < 1e-6 * np.abs(exact_gelu).max()


def test_cross_entropy_backward_twice_with_retain_graph(device):
    xp = backend.current()
    z = rand((4, 5), 0)
    loss = F.cross_entropy(z, xp.asarray([0, 1, 2, 3]))
    loss.backward(retain_graph=True)
    first = backend.to_numpy(z.grad).copy()
    loss.backward()
    np.testing.assert_allclose(backend.to_numpy(z.grad), 2 * first, rtol=1e-12)
