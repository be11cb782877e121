"""The GPU's matrix products (npgpt/fast/cuda/cublas.py): the GEMM calls planned for every operand layout the model
uses compute a @ b.

cuBLAS reads column-major matrices through (op, leading dimension, batch stride). The plan is checked on
any machine by emulating exactly that reading on the operands' memory with NumPy; on a GPU the real calls
are checked against CuPy's matmul as well.
"""

import numpy as np
import pytest
from numpy.lib.stride_tricks import as_strided

from npgpt import backend
from npgpt.fast.cuda import cublas, gemm_tuning


def matrices(array, batch_shape, walk, stored, ld):
    """The (batch, rows, cols) column-major matrices cuBLAS reads from (or writes to) array's memory: each at
    its offset (one batch stride, or a pointer per matrix), with leading dimension ld."""
    size = array.itemsize
    offsets = cublas.matrix_offsets(batch_shape, walk) if batch_shape else np.zeros(1, np.int64)
    extent = int(offsets.max()) + (stored[1] - 1) * ld + stored[0]
    memory = as_strided(array, shape=(extent,), strides=(size,))      # array's memory from its first element
    return [as_strided(memory[offset:], shape=stored, strides=(size, ld * size)) for offset in offsets]


def emulate(call):
    """Run a planned call the way cuBLAS reads memory: column-major, op N or T, leading dimension, batch walk."""
    m, n, k = call["m"], call["n"], call["k"]

    def operand(array, op, ld, walk, rows, cols):     # op(X) is rows x cols
        stored = (rows, cols) if op == cublas._OP_N else (cols, rows)
        assert ld >= max(1, stored[0]), "cuBLAS needs the leading dimension >= the stored matrix's rows"
        view = np.stack(matrices(array, call["batch_shape"], walk, stored, ld))
        return view if op == cublas._OP_N else view.swapaxes(-1, -2)

    first = operand(*call["first"], m, k)       # op(B^T-as-stored): (m, k) = (N, K)
    second = operand(*call["second"], k, n)     # (k, n) = (K, M)
    product = first @ second                    # column-major C^T: (batch, N, M)
    return product.swapaxes(-1, -2).reshape(call["out_shape"])


def emulate_into(call, alpha, accumulate):
    """Run a call planned with out= as cuBLAS would: C = alpha A B + beta C, written through (ldc, stride)."""
    target, ldc, walk = call["target"]
    assert ldc >= call["m"], "cuBLAS needs ldc >= the rows of C^T"
    written = matrices(target, call["batch_shape"], walk, (call["m"], call["n"]), ldc)   # C^T, column-major
    product = emulate(call).reshape(call["batch"], call["n"], call["m"]).swapaxes(-1, -2)
    for c, p in zip(written, product):
        c[...] = alpha * p + (c if accumulate else 0)


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


@pytest.mark.parametrize("accumulate", [False, True])
def test_products_are_written_into_slices_of_out(accumulate):
    """The blocked attention's writes: a block's rows of O, and dK, dV summed over blocks, in place."""
    rng = np.random.default_rng(3)
    k = rng.standard_normal((2, 3, 8, 4))
    attn, g = rng.standard_normal((2, 3, 3, 6)), rng.standard_normal((2, 3, 3, 4))
    W, X = rng.standard_normal((5, 4)), rng.standard_normal((2, 6, 4))
    cases = [(attn, k[..., :6, :], rng.standard_normal((2, 3, 8, 4)), (Ellipsis, slice(2, 5), slice(None))),
             (attn.swapaxes(-1, -2), g, rng.standard_normal((2, 3, 8, 4)), (Ellipsis, slice(0, 6), slice(None))),
             (X, W.T, rng.standard_normal((2, 6, 5)), (Ellipsis,)),
             (g, k.swapaxes(-1, -2), rng.standard_normal((2, 3, 3, 9)), (Ellipsis, slice(0, 8))),
             # into the rows of a (B, H, T, D) view of a (B, T, H, D) array: a pointer per matrix
             (attn, k[..., :6, :], rng.standard_normal((2, 8, 3, 4)).swapaxes(1, 2),
              (Ellipsis, slice(2, 5), slice(None)))]
    for a, b, big, where in cases:
        expected = big.copy()
        expected[where] = 0.5 * (a @ b) + (expected[where] if accumulate else 0)
        call = cublas.plan(np, a, b, out=big[where])
        assert call["target"] is not None, "a row-major slice is written in place, not copied"
        emulate_into(call, 0.5, accumulate)
        np.testing.assert_allclose(big, expected, rtol=1e-12, err_msg=str(where))


def test_out_of_another_layout_is_not_written_directly():
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((3, 4)), rng.standard_normal((4, 5))
    assert cublas.plan(np, a, b, out=np.empty((5, 3)).T)["target"] is None      # column-major out
    assert cublas.plan(np, a, b, out=np.empty((3, 10))[:, ::2])["target"] is None   # strided columns


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
    # heads: (B, H, T, D) views of (B, T, H, D) arrays step D from head to head, T * H * D from batch to batch
    projection = rng.standard_normal((2, 6, 3, 4))
    heads = projection.swapaxes(1, 2)
    call = cublas.plan(np, rng.standard_normal((2, 3, 5, 6)), heads, out=np.empty((2, 5, 3, 4)).swapaxes(1, 2))
    assert call["first"][0].base is projection, "the heads are read where they lie, not copied"
    assert call["first"][3] == (6 * 3 * 4, 4) and call["target"][2] == (5 * 3 * 4, 4)   # per-axis strides


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


@gpu
@pytest.mark.parametrize("accumulate", [False, True])
def test_cublas_matmul_writes_into_out_slices(accumulate):
    cp = backend.module_for("gpu")
    rng = np.random.default_rng(6)
    attn, k = rng.standard_normal((2, 3, 3, 6)), rng.standard_normal((2, 3, 8, 4))
    big = rng.standard_normal((2, 3, 8, 4))
    expected = big.copy()
    expected[..., 2:5, :] = 0.5 * (attn @ k[..., :6, :]) + (expected[..., 2:5, :] if accumulate else 0)
    out = cp.asarray(big)
    cublas.matmul(cp.asarray(attn), cp.asarray(k)[..., :6, :], out=out[..., 2:5, :], alpha=0.5,
                  accumulate=accumulate)
    np.testing.assert_allclose(backend.to_numpy(out), expected, rtol=1e-12)
    heads = cp.asarray(big).swapaxes(1, 2).copy().swapaxes(1, 2)     # (B, H, T, D) view of (B, T, H, D)
    cublas.matmul(cp.asarray(attn), _like(cp, k.swapaxes(1, 2).copy().swapaxes(1, 2), cp.asarray(k))[..., :6, :],
                  out=heads[..., 2:5, :], alpha=0.5, accumulate=accumulate)         # a pointer per matrix
    np.testing.assert_allclose(backend.to_numpy(heads), expected, rtol=1e-12)
    column_major = cp.zeros((4, 3)).T                  # not writable in place: the product goes through a copy
    cublas.matmul(cp.asarray(attn[0, 0, :, :4]), cp.asarray(k[0, 0, :4]), out=column_major)
    np.testing.assert_allclose(backend.to_numpy(column_major), attn[0, 0, :, :4] @ k[0, 0, :4], rtol=1e-12)


def _like(cp, host, device):
    """A device array with host's strides pattern (so views stay views): transposed views are rebuilt."""
    if host.flags.c_contiguous:
        return device
    order = np.argsort(host.strides)[::-1]          # axes from the largest stride to the smallest
    base = cp.ascontiguousarray(device.transpose(order))
    return base.transpose(np.argsort(order))


@gpu
def test_tuned_products_equal_the_product(monkeypatch):
    """Every layout tuned (the size threshold lowered to 0): whichever algorithm wins computes a @ b, and on
    a large product cuBLASLt's candidates really ran against plain cuBLAS."""
    cp = backend.module_for("gpu")
    monkeypatch.setattr(gemm_tuning, "MIN_TUNED_FLOPS", 0)
    monkeypatch.setattr(gemm_tuning, "_tuned", {})
    rng = np.random.default_rng(7)
    for name, a, b in layouts(rng, np.float32) + [("large", rng.standard_normal((512, 384), np.float32),
                                                    rng.standard_normal((384, 640), np.float32))]:
        ga, gb = _like(cp, a, cp.asarray(np.ascontiguousarray(a))), _like(cp, b, cp.asarray(np.ascontiguousarray(b)))
        for _ in range(2):                              # the first call tunes, the second uses the choice
            got = cublas.matmul(ga, gb)
            np.testing.assert_allclose(backend.to_numpy(got), a @ b, rtol=1e-4, atol=1e-4, err_msg=name)
    assert gemm_tuning.disabled_reason is None
    large = [c for key, c in gemm_tuning.choices().items() if key[4:7] == (640, 512, 384)]   # m, n, k
    assert large and large[0][3] > 0 and large[0][2] is not None, large
