"""The GPU's matrix products (npgpt/cublas.py): the GEMM calls planned for every operand layout the model
uses compute a @ b.

cuBLAS reads column-major matrices through (op, leading dimension, batch stride). The plan is checked on
any machine by emulating exactly that reading on the operands' memory with NumPy; on a GPU the real calls
are checked against CuPy's matmul as well.
"""

import numpy as np
import pytest
from numpy.lib.stride_tricks import as_strided

from npgpt import backend, cublas


def emulate(call):
    """Run a planned call the way cuBLAS reads memory: column-major, op N or T, leading dimension, stride."""
    m, n, k, batch = call["m"], call["n"], call["k"], call["batch"]

    def operand(array, op, ld, stride, rows, cols):   # op(X) is rows x cols
        stored = (rows, cols) if op == cublas._OP_N else (cols, rows)
        assert ld >= max(1, stored[0]), "cuBLAS needs the leading dimension >= the stored matrix's rows"
        size = array.itemsize
        view = as_strided(array, shape=(batch,) + stored, strides=(stride * size, size, ld * size))
        return view if op == cublas._OP_N else view.swapaxes(-1, -2)

    first = operand(*call["first"], m, k)       # op(B^T-as-stored): (m, k) = (N, K)
    second = operand(*call["second"], k, n)     # (k, n) = (K, M)
    product = first @ second                    # column-major C^T: (batch, N, M)
    return product.swapaxes(-1, -2).reshape(call["out_shape"])


def layouts(rng, dtype):
    """(name, a, b) for each layout the model's products take: views, not copies, where the model has views."""
    def r(*shape):
        return rng.standard_normal(shape).astype(dtype)
    W, G, X = r(3, 4), r(6, 3), r(6, 4)
    q, k, attn, g = r(2, 3, 5, 4), r(2, 3, 6, 4), r(2, 3, 5, 6), r(2, 3, 5, 4)
    heads_last = r(2, 5, 3, 4)                  # (B, T, H, D), viewed as (B, H, T, D)
    return [
        ("plain", r(5, 7), r(7, 3)),
        ("x W^T", X, W.T),
        ("dy^T x", G.T, X),
        ("sliced rows", r(5, 9)[:, 2:9], r(7, 3)),
        ("q k^T", q, k.swapaxes(-1, -2)),
        ("A^T dO", attn.swapaxes(-1, -2), g),
        ("dS K", attn, k),
        ("dS^T Q", attn.swapaxes(-1, -2), q),
        ("batched @ matrix", q, r(4, 6)),
        ("strided batch @ matrix", heads_last.swapaxes(1, 2), r(4, 6)),
        ("heads view @ heads view", heads_last.swapaxes(1, 2), k.swapaxes(-1, -2)[:, :, :, :5]),
        ("broadcast batch", r(3, 5, 4), r(2, 3, 4, 6)),
        ("row vector", r(1, 8), r(8, 5)),
        ("column times row", r(5, 1), r(1, 3)),
        ("ones @ rows (bias gradient)", np.ones((1, 6), dtype), X),
    ]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_planned_gemm_calls_compute_the_product(dtype):
    for name, a, b in layouts(np.random.default_rng(0), dtype):
        assert cublas.supports(a, b), name
        got = emulate(cublas.plan(np, a, b)).reshape(np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
                                                     + (a.shape[-2], b.shape[-1]))
        np.testing.assert_allclose(got, a @ b, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-6,
                                   err_msg=name)


def test_views_are_read_in_place_not_copied():
    rng = np.random.default_rng(1)
    W, X = rng.standard_normal((3, 4)), rng.standard_normal((6, 4))
    call = cublas.plan(np, X, W.T)
    (b, op_b, _, _), (_, op_a, _, _) = call["first"], call["second"]
    assert b.base is W.T.base or b.base is W, "W^T is read with the transpose flag"
    assert (op_b, op_a) == (cublas._OP_T, cublas._OP_N)
    k = rng.standard_normal((2, 3, 6, 4))
    call = cublas.plan(np, rng.standard_normal((2, 3, 5, 4)), k.swapaxes(-1, -2))
    assert call["first"][0].base is k and call["first"][3] == 6 * 4 and call["batch"] == 6


def test_unsupported_operands_are_refused():
    a = np.ones((3, 4), np.float32)
    assert not cublas.supports(a, np.ones((4, 2), np.float64))     # mixed precision
    assert not cublas.supports(a, np.ones(4, np.float32))          # a vector: CuPy's matmul takes it
    assert not cublas.supports(a.astype(np.int64), np.ones((4, 2), np.int64))


gpu = pytest.mark.skipif(backend.gpu_unavailable_reason() is not None,
                         reason=f"no GPU backend: {backend.gpu_unavailable_reason()}")


@gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cublas_matmul_equals_cupy_matmul(dtype):
    cp = backend.module_for("gpu")
    for name, a, b in layouts(np.random.default_rng(2), dtype):
        ga, gb = cp.asarray(np.ascontiguousarray(a)), cp.asarray(np.ascontiguousarray(b))
        # rebuild the same views on the device: transposes and slices as in the host layouts
        got = cublas.matmul(_like(cp, a, ga), _like(cp, b, gb))
        np.testing.assert_allclose(backend.to_numpy(got), a @ b, rtol=1e-4 if dtype == np.float32 else 1e-12,
                                   atol=1e-5, err_msg=name)
    empty = cublas.matmul(cp.ones((0, 3), dtype), cp.ones((3, 2), dtype))
    assert empty.shape == (0, 2)


def _like(cp, host, device):
    """A device array with host's strides pattern (so views stay views): transposed views are rebuilt."""
    if host.flags.c_contiguous:
        return device
    order = np.argsort(host.strides)[::-1]          # axes from the largest stride to the smallest
    base = cp.ascontiguousarray(device.transpose(order))
    return base.transpose(np.argsort(order))
