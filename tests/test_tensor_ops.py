"""Every Tensor operation passes gradcheck in float64, over hypothesis-generated shapes and values."""

import numpy as np
import pytest
from hypothesis import given, strategies as st

import npgpt
from npgpt import backend
from strategies import broadcast_pairs, nonscalar_shapes, rand, seeds, shapes

pytestmark = pytest.mark.textbook      # run again with NPGPT_FAST=0 in CI

BINARY = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "div": lambda a, b: a / b,
    "pow": lambda a, b: a ** b,
}


@pytest.mark.parametrize("op", sorted(BINARY))
@given(pair=broadcast_pairs, seed=seeds)
def test_binary_ops_broadcast(device, op, pair, seed):
    shape_a, shape_b = pair.input_shapes
    a = rand(shape_a, seed)
    b = rand(shape_b, seed + 1)
    if op in ("div", "pow"):   # keep away from 0 (div) and negative bases (pow)
        b = rand(shape_b, seed + 1, 0.5, 2.0)
    if op == "pow":
        a = rand(shape_a, seed, 0.5, 2.0)
    npgpt.gradcheck(BINARY[op], [a, b])


@given(shape=shapes, seed=seeds, scalar=st.sampled_from([-1.5, 0.5, 2.0, 3]))
def test_scalar_operands_both_sides(device, shape, seed, scalar):
    a = rand(shape, seed, 0.5, 2.0)
    npgpt.gradcheck(lambda x: (scalar + x) * (x - scalar) / scalar + scalar / x - (scalar - x) * scalar, [a])
    npgpt.gradcheck(lambda x: x ** scalar + (-x), [a])
    npgpt.gradcheck(lambda x: abs(scalar) ** x, [a])


UNARY = {
    "exp": (lambda x: x.exp(), None),
    "log": (lambda x: x.log(), (0.5, 3.0)),
    "tanh": (lambda x: x.tanh(), None),
    "sqrt": (lambda x: x.sqrt(), (0.5, 3.0)),
    "neg": (lambda x: -x, None),
}


@pytest.mark.parametrize("op", sorted(UNARY))
@given(shape=shapes, seed=seeds)
def test_unary_ops(device, op, shape, seed):
    fn, bounds = UNARY[op]
    x = rand(shape, seed) if bounds is None else rand(shape, seed, *bounds)
    npgpt.gradcheck(fn, [x])


@given(shape=nonscalar_shapes, seed=seeds, keepdims=st.booleans(), data=st.data())
def test_reductions(device, shape, seed, keepdims, data):
    axis = data.draw(st.one_of(st.none(), st.integers(-len(shape), len(shape) - 1),
                               st.just(tuple(range(len(shape))))))
    x = rand(shape, seed)
    npgpt.gradcheck(lambda t: t.sum(axis=axis, keepdims=keepdims), [x])
    npgpt.gradcheck(lambda t: t.mean(axis=axis, keepdims=keepdims), [x])
    npgpt.gradcheck(lambda t: t.max(axis=axis, keepdims=keepdims), [x])


def test_max_splits_gradient_between_ties(device):
    x = npgpt.Tensor(backend.current().asarray([1.0, 3.0, 3.0, 2.0]), requires_grad=True)
    x.max().backward()
    np.testing.assert_array_equal(backend.to_numpy(x.grad), [0.0, 0.5, 0.5, 0.0])


@given(shape=nonscalar_shapes, seed=seeds, data=st.data())
def test_shape_ops(device, shape, seed, data):
    x = rand(shape, seed)
    ndim = len(shape)
    perm = data.draw(st.permutations(range(ndim)))
    a, b = data.draw(st.integers(0, ndim - 1)), data.draw(st.integers(0, ndim - 1))
    npgpt.gradcheck(lambda t: t.reshape(-1) * t.reshape(-1), [x])
    npgpt.gradcheck(lambda t: t.view(*shape[::-1]).exp() if ndim > 1 else t.view(-1).exp(), [x])
    npgpt.gradcheck(lambda t: t.permute(*perm).tanh(), [x])
    npgpt.gradcheck(lambda t: t.transpose(a, b).tanh(), [x])


@given(seed=seeds, data=st.data())
def test_matmul_shapes(device, seed, data):
    m, k, n = (data.draw(st.integers(1, 4)) for _ in range(3))
    batch_a = data.draw(st.sampled_from([(), (1,), (3,), (2, 1)]))
    batch_b = data.draw(st.sampled_from([(), (1,), (3,), (2, 3)])) if batch_a != (2, 1) else (3,)
    a = rand(batch_a + (m, k), seed)
    b = rand(batch_b + (k, n), seed + 1)
    npgpt.gradcheck(lambda x, y: x @ y, [a, b])
    vec = rand((k,), seed + 2)
    npgpt.gradcheck(lambda x, v: x @ v, [a, vec])                 # matrix @ vector
    npgpt.gradcheck(lambda v, y: v @ y, [vec, b])                 # vector @ matrix
    npgpt.gradcheck(lambda v, w: v @ w, [vec, rand((k,), seed + 3)])   # dot product


def test_indexing_and_slicing(device):
    x = rand((4, 5, 3), 0)
    xp = backend.current()
    npgpt.gradcheck(lambda t: t[1], [x])
    npgpt.gradcheck(lambda t: t[:, 1:4, ::2], [x])
    npgpt.gradcheck(lambda t: t[..., -1], [x])
    npgpt.gradcheck(lambda t: t[None, 2, :, 0], [x])
    repeated = xp.asarray([0, 2, 2, 3, 0])        # repeated indices: gradients must add up
    npgpt.gradcheck(lambda t: t[repeated] * t[repeated], [x])
    npgpt.gradcheck(lambda t: t[xp.asarray([1, 1]), :, xp.asarray([0, 2])], [x])


def test_indexing_repeat_sums_gradient(device):
    x = npgpt.Tensor(backend.current().zeros(3), requires_grad=True)
    x[backend.current().asarray([0, 0, 2])].sum().backward()
    np.testing.assert_array_equal(backend.to_numpy(x.grad), [2.0, 0.0, 1.0])


def test_composite_expression(device):
    a, b = rand((3, 4), 1), rand((4,), 2)
    npgpt.gradcheck(lambda x, y: ((x * y + 1.0).tanh() @ (y.exp() / 2.0)).log(), [rand((3, 4), 1, 1.0, 2.0), b])
    npgpt.gradcheck(lambda x, y: ((x - x.mean(axis=-1, keepdims=True)) ** 2 + y).sqrt(),
                    [a, rand((4,), 3, 0.5, 1.0)])
