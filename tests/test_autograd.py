"""The engine's rules: reuse, accumulation, deep graphs, memory release, dtypes, errors."""

import gc
import weakref

import numpy as np
import pytest

import npgpt
import npgpt.functional as F
from npgpt import backend

pytestmark = pytest.mark.textbook      # run again with NPGPT_FAST=0 in CI


def arr(values, dtype=np.float64):
    return backend.current().asarray(np.asarray(values, dtype=dtype))


def test_reused_node_receives_the_sum_of_its_gradients(device):
    x = npgpt.Tensor(arr([2.0, 3.0]), requires_grad=True)
    y = x * x                      # y is used three times below
    z = (y + y * 3.0 + y.exp()).sum()
    z.backward()
    expected = (1 + 3 + np.exp([4.0, 9.0])) * 2 * np.array([2.0, 3.0])
    np.testing.assert_allclose(backend.to_numpy(x.grad), expected, rtol=1e-12)


def test_two_backward_calls_accumulate(device):
    x = npgpt.Tensor(arr([1.0, -2.0]), requires_grad=True)
    (x * 3.0).sum().backward()
    (x * x).sum().backward()
    np.testing.assert_allclose(backend.to_numpy(x.grad), [3 + 2 * 1.0, 3 + 2 * -2.0])


def test_a_gradient_that_flows_two_ways_is_never_shared_by_two_grads(device):
    """a + b hands the same gradient array to both; each .grad kept must still be an array of its own."""
    x, y = (npgpt.Tensor(arr([1.0, 2.0]), requires_grad=True) for _ in range(2))
    z = (x + y).retain_grad()
    w = z + 0.0                    # the pass-through reaches z, then x and y, as one array
    w.backward(arr([1.0, 1.0]))
    grads = [x.grad, y.grad, z.grad]
    for i in range(3):
        for j in range(i + 1, 3):
            assert not backend.get_array_module(grads[i]).shares_memory(grads[i], grads[j]), (i, j)
    (x * 2.0).sum().backward()     # accumulating into x.grad leaves y.grad and z.grad alone
    np.testing.assert_allclose(backend.to_numpy(x.grad), [3.0, 3.0])
    np.testing.assert_allclose(backend.to_numpy(y.grad), [1.0, 1.0])
    np.testing.assert_allclose(backend.to_numpy(z.grad), [1.0, 1.0])


def test_a_100k_op_chain_backpropagates(device):
    x = npgpt.Tensor(arr([1.0]), requires_grad=True)
    y = x
    for _ in range(100_000):
        y = y + 1e-5
    (y * 2.0).sum().backward()
    np.testing.assert_allclose(backend.to_numpy(x.grad), [2.0])


def test_graph_is_released_after_backward(device):
    x = npgpt.Tensor(arr(np.ones((4, 4))), requires_grad=True)
    hidden = (x * 2.0).tanh()
    probe = weakref.ref(hidden)
    loss = (hidden * hidden).sum()
    del hidden
    gc.collect()
    assert probe() is not None, "the graph keeps the intermediate alive until backward"
    loss.backward()
    gc.collect()
    assert probe() is None, "after backward the intermediate must be freed"
    grad_after_one = backend.to_numpy(x.grad).copy()
    with pytest.raises(RuntimeError, match="already freed.*retain_graph=True"):
        loss.backward()                         # a freed graph is not silently skipped
    np.testing.assert_array_equal(backend.to_numpy(x.grad), grad_after_one)


def test_retain_graph_allows_a_second_backward(device):
    x = npgpt.Tensor(arr([1.0, 2.0]), requires_grad=True)
    loss = (x * x).sum()
    loss.backward(retain_graph=True)
    loss.backward()
    np.testing.assert_allclose(backend.to_numpy(x.grad), [4.0, 8.0])


def test_float32_in_gives_float32_out_and_grads(device):
    xp = backend.current()
    x = npgpt.Tensor(arr(np.random.default_rng(0).standard_normal((2, 3, 8)), np.float32), requires_grad=True)
    w = npgpt.Tensor(arr(np.random.default_rng(1).standard_normal((5, 8)), np.float32), requires_grad=True)
    g = npgpt.Tensor(arr(np.ones(8), np.float32), requires_grad=True)
    ids = xp.asarray([[0, 1, 2], [4, 3, 2]])
    h = F.layer_norm(x, 8, g, None) * 0.5 + 1.0       # Python scalars must not upcast
    h = F.gelu(F.linear(h, w)) ** 2 / 3.0 - 2
    h = F.scaled_dot_product_attention(h, h, h, is_causal=True, dropout_p=0.1)
    h = F.dropout(h.tanh(), 0.2) + (h * h + 1.0).sqrt().log().exp()
    logits = F.log_softmax(h, -1) + F.softmax(h, -1) + F.embedding(ids, npgpt.Tensor(arr(np.ones((5, 5)), np.float32)))
    loss = F.cross_entropy(logits.reshape(-1, 5), ids.reshape(-1))
    assert loss.dtype == np.float32
    loss.backward()
    for t in (x, w, g):
        assert t.grad.dtype == np.float32
    assert npgpt.tensor([1.0, 2.0]).dtype == np.float32       # Python floats default to float32
    assert (npgpt.tensor([1.0]) * np.float64(2.0)).dtype == np.float32


def test_no_grad_and_detach(device):
    x = npgpt.Tensor(arr([1.0]), requires_grad=True)
    with npgpt.no_grad():
        y = x * 2.0
    assert not y.requires_grad and y.is_leaf
    assert npgpt.is_grad_enabled()
    z = (x * 2.0).detach()
    assert not z.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        z.sum().backward()

    @npgpt.no_grad()
    def double(t):
        return t * 2.0
    assert not double(x).requires_grad


def test_backward_on_non_scalar_needs_a_gradient(device):
    x = npgpt.Tensor(arr([1.0, 2.0]), requires_grad=True)
    y = x * 3.0
    with pytest.raises(RuntimeError, match="non-scalar.*explicit gradient"):
        y.backward()
    y.backward(arr([1.0, 10.0]))
    np.testing.assert_allclose(backend.to_numpy(x.grad), [3.0, 30.0])
    with pytest.raises(ValueError, match="grad has shape"):
        (x * 3.0).backward(arr([1.0, 2.0, 3.0]))


def test_mismatched_shapes_raise_clear_errors(device):
    a = npgpt.Tensor(arr(np.ones((2, 3))), requires_grad=True)
    b = npgpt.Tensor(arr(np.ones((4, 3))), requires_grad=True)
    for op, name in ((lambda: a + b, "add"), (lambda: a - b, "sub"), (lambda: a * b, "mul"),
                     (lambda: a / b, "div")):
        with pytest.raises(ValueError, match=rf"^{name}: shapes \(2, 3\) and \(4, 3\) do not broadcast"):
            op()
    with pytest.raises(ValueError, match=r"^matmul: \(2, 3\) @ \(4, 3\) needs the last dimension"):
        a @ b
    with pytest.raises(ValueError, match="features"):
        F.linear(a, b.transpose(0, 1))


def test_gradcheck_catches_a_wrong_gradient():
    from npgpt.engine import _make

    def wrong_square(t):
        def backward(grad):
            return (grad * t.data,)          # should be 2 * t
        return _make(t.data ** 2, (t,), backward, "wrong_square")

    x = npgpt.Tensor(np.array([[1.0, 2.0], [3.0, 4.0]]), requires_grad=True)
    # the worst element is named with both values: d(x^2)/dx at x = 4 is 8, the wrong backward says 4
    with pytest.raises(npgpt.GradcheckError, match=r"index \(1, 1\): analytic 4 vs numeric (8|7\.99999)"):
        npgpt.gradcheck(lambda t: wrong_square(t).sum(), [x])
    with pytest.raises(TypeError, match="float64"):
        npgpt.gradcheck(lambda t: t * 2, [npgpt.Tensor(np.ones(2, np.float32), requires_grad=True)])
