"""Every Tensor operation passes gradcheck in float64, over hypothesis-generated shapes and values."""

import numpy as np
import pytest
from hypothesis import given, strategies as st

import npgpt
from npgpt import backend
from optional import need
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


# ---- split and cat: an op with several results, and its inverse -------------------------------------------

@given(shape=nonscalar_shapes, seed=seeds, data=st.data())
def test_split_and_cat_pass_gradcheck(device, shape, seed, data):
    ndim = len(shape)
    dim = data.draw(st.integers(-ndim, ndim - 1))
    length = shape[dim]
    size = data.draw(st.integers(1, length))                    # the last piece is shorter where it must be
    cut = data.draw(st.integers(0, length))
    x = rand(shape, seed)
    # every piece used, each in its own way, so that a piece's gradient landing in another's slot would show
    npgpt.gradcheck(lambda t: sum((p * (i + 1.0)).tanh().sum() for i, p in enumerate(t.split(size, dim=dim))), [x])
    npgpt.gradcheck(lambda t: t.split([cut, length - cut], dim=dim)[0].exp(), [x])       # one piece unused
    other = rand(shape[:dim % ndim] + (5,) + shape[dim % ndim + 1:], seed + 1)      # longer than any of x's
    npgpt.gradcheck(lambda a, b: npgpt.cat([a.tanh(), b, a], dim=dim) ** 2 * 0.5 + npgpt.cat([b, a, a.exp()], dim=dim),
                    [x, other])


def test_split_pieces_are_views_and_cat_undoes_split(device):
    xp = backend.current()
    x = npgpt.Tensor(xp.arange(24.0).reshape(2, 12), requires_grad=True)
    q, k, v, rest = x.split([3, 3, 3, 3], dim=1)
    assert all(p.shape == (2, 3) for p in (q, k, v, rest))
    np.testing.assert_array_equal(backend.to_numpy(k.data), [[3, 4, 5], [15, 16, 17]])
    assert xp.shares_memory(k.data, x.data)                     # a view, as torch.split's pieces are
    assert [p.shape[1] for p in x.split(5, dim=-1)] == [5, 5, 2]
    assert [p.shape for p in x.split(1)] == [(1, 12), (1, 12)]          # dim 0 unless told, as in PyTorch
    np.testing.assert_array_equal(backend.to_numpy(npgpt.cat(x.split(5, dim=1), dim=1).data),
                                  backend.to_numpy(x.data))


def test_split_gradients_land_in_their_own_slots_and_a_missing_one_is_zero(device):
    xp = backend.current()
    x = npgpt.Tensor(xp.zeros((2, 6)), requires_grad=True)
    a, b, c = x.split(2, dim=1)
    (a.sum() * 1.0 + c.sum() * 3.0 + (c * 2.0).sum()).backward()      # b unused; c used twice
    np.testing.assert_array_equal(backend.to_numpy(x.grad), [[1, 1, 0, 0, 5, 5]] * 2)
    y = npgpt.Tensor(xp.zeros((4,)), requires_grad=True)
    first, second = y.split(2)
    second.retain_grad()
    (second * 7.0).sum().backward()                               # backward from one piece alone
    np.testing.assert_array_equal(backend.to_numpy(y.grad), [0, 0, 7, 7])
    np.testing.assert_array_equal(backend.to_numpy(second.grad), [7, 7])


def test_split_and_cat_refuse_bad_arguments_with_the_fix(device):
    x = rand((2, 6), 0)
    with pytest.raises(ValueError, match="add up to 6"):
        x.split([2, 2], dim=1)
    with pytest.raises(ValueError, match="must be positive"):
        x.split(0)
    with pytest.raises(TypeError, match="whole numbers"):
        x.split([2.5, 3.5], dim=1)
    with pytest.raises(TypeError, match="whole numbers"):
        x.split(True)
    with pytest.raises(ValueError, match="out of range"):
        x.split(2, dim=2)
    with pytest.raises(ValueError, match="differ outside dim 0"):
        npgpt.cat([x, rand((2, 5), 1)])
    with pytest.raises(TypeError, match=r"dtypes differ.*astype"):
        npgpt.cat([x, rand((2, 6), 1, dtype=np.float32)])
    with pytest.raises(ValueError, match="at least one tensor"):
        npgpt.cat([])


def test_split_and_cat_equal_torch(device):
    torch = need("torch", "torch")
    rng = np.random.default_rng(0)
    x_np, y_np, g_np = rng.standard_normal((3, 7)), rng.standard_normal((2, 7)), rng.standard_normal((5, 7))
    x, y = rand((3, 7), 0), rand((2, 7), 0)
    x.data[...], y.data[...] = backend.current().asarray(x_np), backend.current().asarray(y_np)
    xt, yt = (torch.tensor(a, requires_grad=True) for a in (x_np, y_np))
    pieces, pieces_t = x.split([1, 4, 2], dim=1), xt.split([1, 4, 2], dim=1)
    out = npgpt.cat([npgpt.cat([pieces[2], pieces[0], pieces[1]], dim=1), y], dim=0)
    out_t = torch.cat([torch.cat([pieces_t[2], pieces_t[0], pieces_t[1]], dim=1), yt], dim=0)
    np.testing.assert_allclose(backend.to_numpy(out.data), out_t.detach().numpy(), rtol=0, atol=0)
    (out * npgpt.Tensor(backend.current().asarray(g_np))).sum().backward()
    (out_t * torch.tensor(g_np)).sum().backward()
    np.testing.assert_allclose(backend.to_numpy(x.grad), xt.grad.numpy(), rtol=0, atol=0)
    np.testing.assert_allclose(backend.to_numpy(y.grad), yt.grad.numpy(), rtol=0, atol=0)
