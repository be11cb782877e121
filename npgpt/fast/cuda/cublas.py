"""Matrix products of CuPy arrays through cuBLAS, called directly: products a CUDA graph can record.

CuPy's own ``a @ b`` refuses to run while a stream is being captured into a CUDA graph (its cuBLAS wrapper
raises NotImplementedError), although cuBLAS itself supports capture. So on the GPU every product of the
training step comes here instead (``ops.py``'s ``matmul``): this module loads the cuBLAS library CuPy already
loaded, keeps a handle of its own, and calls the float32/float64 GEMM (strided-batched for stacks of
matrices) with ctypes. Eager code takes the same path, so a graph replays exactly the kernels eager
training runs.

cuBLAS is column-major and NumPy row-major. A row-major (M, K) matrix with row stride ld is, read
column-major, its transpose (K, M) with leading dimension ld. So C = A B (row-major, all contiguous) is
computed as C^T = B^T A^T: cuBLAS gets B first and A second, with m = N, n = M, k = K, and writes C^T
column-major, which is C row-major. An operand that is itself a transposed view (``W.T``,
``k.swapaxes(-1, -2)``) is passed with the transpose flag instead of being copied.

Shapes: a (..., M, K) @ b (..., K, N) -> (..., M, N), batch axes broadcast as in NumPy. The result can go
straight into a slice of a larger array (``out=``), scaled (cuBLAS's alpha) or added to it (beta = 1): the
blocked causal attention writes and accumulates its per-block products that way, with no extra pass.

A stack of matrices is walked with one batch stride when it can be (strided-batched GEMM). The attention's
heads cannot: q viewed as (B, H, T, D) inside a (B, T, H, D) array steps D elements from head to head but
T * H * D from batch to batch. Such stacks are not copied; cuBLAS's pointer-array GEMM takes one address per
matrix, which a small kernel computes on the device from the batch axes' strides (so a graph records it).

Which GEMM algorithm runs a float32 product is chosen by timing, once per problem: ``gemm_tuning.py``.

Next to read: ``graph.py``, which records the training step.
"""

import ctypes
import ctypes.util
import math

import numpy as np

from ... import backend
from . import gemm_tuning, kernels

_OP_N, _OP_T = 0, 1
_WORKSPACE_BYTES = 32 * 2**20     # cuBLAS's recommended workspace on Hopper; fixed, so a graph can keep it
_state = {}                       # device id -> _Blas
_kernels = {}
_MAX_BATCH_AXES = 4               # batch axes the pointer kernel walks; stacks with more are copied


class CublasError(RuntimeError):
    """cuBLAS could not be loaded or returned an error status."""


def _library_path():
    """The cuBLAS shared library CuPy loaded into this process (not cuBLASLt), else a name dlopen can find."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as f:
            paths = sorted({line.split()[-1] for line in f
                            if "libcublas.so" in line and "libcublasLt" not in line})
        if paths:
            return paths[0]
    except OSError:
        pass
    return ctypes.util.find_library("cublas") or "libcublas.so"


class _Blas:
    """The cuBLAS functions npgpt calls, one handle, and the stream and workspace last given to it."""

    def __init__(self, cp):
        cp.cuda.device.get_cublas_handle()       # makes CuPy load cuBLAS, so the library below is its own
        path = _library_path()
        try:
            lib = ctypes.CDLL(path)
        except OSError as exc:
            raise CublasError(f"cannot load cuBLAS ({path}): {exc}") from exc
        P, i, ll = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong
        self.functions = {}      # dtype -> (gemm, strided-batched gemm, the ctypes type of alpha and beta)
        self.pointer_batched = {}    # dtype -> pointer-array batched gemm
        for dtype, prefix, scalar in ((np.float32, "S", ctypes.c_float), (np.float64, "D", ctypes.c_double)):
            gemm = getattr(lib, f"cublas{prefix}gemm_v2")
            gemm.argtypes = [P, i, i, i, i, i, P, P, i, P, i, P, P, i]
            batched = getattr(lib, f"cublas{prefix}gemmStridedBatched")
            batched.argtypes = [P, i, i, i, i, i, P, P, i, ll, P, i, ll, P, P, i, ll, i]
            pointers = getattr(lib, f"cublas{prefix}gemmBatched")
            pointers.argtypes = [P, i, i, i, i, i, P, P, i, P, i, P, P, i, i]
            self.functions[np.dtype(dtype)] = (gemm, batched, scalar)
            self.pointer_batched[np.dtype(dtype)] = pointers
        lib.cublasCreate_v2.argtypes = [ctypes.POINTER(P)]
        lib.cublasSetStream_v2.argtypes = [P, P]
        self.set_stream = lib.cublasSetStream_v2
        self.set_workspace = getattr(lib, "cublasSetWorkspace_v2", None)
        if self.set_workspace is not None:
            self.set_workspace.argtypes = [P, P, ctypes.c_size_t]
        self.workspace = cp.empty(_WORKSPACE_BYTES, dtype=cp.uint8)    # cuBLAS's, and cuBLASLt's (same stream)
        handle = P()
        _check(lib.cublasCreate_v2(ctypes.byref(handle)), "cublasCreate")
        self.handle = handle.value
        self.stream = None

    def use_stream(self, stream_ptr):
        """Point the handle at the current stream (and our fixed workspace, which setStream resets)."""
        if stream_ptr == self.stream:
            return
        _check(self.set_stream(self.handle, stream_ptr), "cublasSetStream")
        if self.set_workspace is not None:
            _check(self.set_workspace(self.handle, self.workspace.data.ptr, _WORKSPACE_BYTES),
                   "cublasSetWorkspace")
        self.stream = stream_ptr


def _check(status, name):
    if status != 0:
        raise CublasError(f"{name} failed with cuBLAS status {status}")


def _blas(cp):
    device = cp.cuda.runtime.getDevice()
    if device not in _state:
        _state[device] = _Blas(cp)
    return _state[device]


def _layout(x):
    """(op, ld) for the last two axes of x as the row-major matrix they are: op N for a row-major matrix
    with row stride ld, op T for a transposed view of one (column stride ld); None when neither fits."""
    rows, cols = x.shape[-2], x.shape[-1]
    s_row, s_col = x.strides[-2], x.strides[-1]
    size = x.itemsize
    if (cols == 1 or s_col == size) and (rows == 1 or (s_row % size == 0 and s_row >= cols * size)):
        return _OP_N, (s_row // size if rows > 1 else cols)
    if (rows == 1 or s_row == size) and (cols == 1 or (s_col % size == 0 and s_col >= rows * size)):
        return _OP_T, (s_col // size if cols > 1 else rows)
    return None


def _batch_strides(x, batch_shape):
    """x's stride (elements) along each batch axis, 0 where x is broadcast over it; None when x's axes do not
    broadcast to batch_shape or a stride is negative or not a whole number of elements."""
    lead = x.shape[:-2]
    if len(lead) > len(batch_shape):
        return None
    pad = len(batch_shape) - len(lead)
    strides = [0] * pad
    for n, s, want in zip(lead, x.strides[:-2], batch_shape[pad:]):
        if n == 1:
            strides.append(0)
        elif n != want or s < 0 or s % x.itemsize:
            return None
        else:
            strides.append(s // x.itemsize)
    return tuple(strides)


def _batch_walk(x, batch_shape):
    """How cuBLAS steps from matrix to matrix of x over the flattened batch: one stride (0 when x is one matrix
    for the whole batch) when the batch axes allow it, else the per-axis strides (a pointer-array call), or
    None when x's batch axes cannot be walked at all (then x is copied)."""
    strides = _batch_strides(x, batch_shape)
    if strides is None:
        return None
    axes = [(n, s) for n, s in zip(batch_shape, strides) if n != 1]
    if not axes or all(s == 0 for _, s in axes):
        return 0
    if all(s != 0 for _, s in axes) and all(outer == inner_n * inner_s
                                            for (_, outer), (inner_n, inner_s) in zip(axes, axes[1:])):
        return axes[-1][1]
    return strides if len(strides) <= _MAX_BATCH_AXES else None


def _prepare(cp, x, batch_shape):
    """x as cuBLAS takes it: (array, op, ld, batch walk), copied to a contiguous stack only if needed."""
    layout, walk = _layout(x), _batch_walk(x, batch_shape)
    if layout is None or walk is None:
        x = cp.ascontiguousarray(cp.broadcast_to(x, tuple(batch_shape) + x.shape[-2:]))
        layout, walk = _layout(x), _batch_walk(x, batch_shape)
    return x, layout[0], layout[1], walk


def supports(a, b):
    """True when matmul below takes a @ b: two float32 or two float64 arrays of 2 or more axes."""
    return (a.dtype == b.dtype and a.dtype in (np.float32, np.float64) and a.ndim >= 2 and b.ndim >= 2
            and a.shape[-1] == b.shape[-2] and min(a.shape[-2], a.shape[-1], b.shape[-1]) > 0
            and max(a.shape[-2], a.shape[-1], b.shape[-1]) < 2**31)


def _batch_shape(a, b):
    """The broadcast batch axes of a and b (the common cases without NumPy's general rule)."""
    if b.ndim == 2 or a.shape[:-2] == b.shape[:-2]:
        return tuple(a.shape[:-2])
    if a.ndim == 2:
        return tuple(b.shape[:-2])
    return tuple(np.broadcast_shapes(a.shape[:-2], b.shape[:-2]))


def _target(out, batch_shape, M, N):
    """(out as the (batch, M, N) result cuBLAS writes, ldc, batch stride), or None when out's layout does not
    let cuBLAS write into it directly (then the product goes to a fresh array first)."""
    if batch_shape == () and out.ndim > 2:           # the (... * M, K) @ (K, N) case: one (... * M, N) matrix
        if not out.flags.c_contiguous:
            return None
        out = out.reshape(-1, N)
    layout, walk = _layout(out), _batch_walk(out, batch_shape)
    if (layout is None or layout[0] != _OP_N or walk is None or out.shape[-2:] != (M, N)
            or (walk == 0 and math.prod(batch_shape) > 1)):     # every product into one matrix: no
        return None
    return out, layout[1], walk


def plan(xp, a, b, out=None):
    """The GEMM call for a @ b: {m, n, k, batch, batch_shape, out_shape, first, second, target}, first and
    second each (array, op, ld, batch walk) in cuBLAS's order (B, then A); target is (out, ldc, batch walk)
    when the result can be written straight into `out`, else None. A batch walk is one stride, or a tuple of
    strides per batch axis (see _batch_walk). Pure bookkeeping on shapes and strides, so the tests check it
    with NumPy arrays on any machine (tests/test_cublas.py)."""
    K, N = a.shape[-1], b.shape[-1]
    batch_shape = _batch_shape(a, b)
    if b.ndim == 2 and a.ndim > 2 and a.flags.c_contiguous:   # (..., M, K) @ (K, N): one (... * M, K) GEMM
        a, batch_shape = a.reshape(-1, K), ()
    M = a.shape[-2]
    # C^T (N, M) = op(B) op(A), column-major: B is the first operand, A the second (see the docstring)
    return dict(m=N, n=M, k=K, batch=math.prod(batch_shape), batch_shape=batch_shape,
                out_shape=batch_shape + (M, N),
                first=_prepare(xp, b, batch_shape), second=_prepare(xp, a, batch_shape),
                target=None if out is None else _target(out, batch_shape, M, N))


def matmul(a, b, out=None, alpha=1.0, accumulate=False):
    """alpha * (a @ b) for CuPy arrays (..., M, K) and (..., K, N), on the current stream, as a fresh array,
    or written into `out` (added to it when accumulate): cuBLAS's alpha and beta, with no extra pass when
    out's matrices are row-major slices. Other cases go to CuPy."""
    cp = backend.module_for("gpu")
    if not supports(a, b):
        return _store(cp.matmul(a, b), out, alpha, accumulate)
    shape = _batch_shape(a, b) + (a.shape[-2], b.shape[-1])
    if out is not None and out.shape != shape:
        raise ValueError(f"matmul: out has shape {out.shape}, the product {shape}")
    if 0 in shape:
        return _store(cp.zeros(shape, dtype=a.dtype), out, alpha, accumulate)
    call = plan(cp, a, b, out)
    if call["target"] is None:                       # C = alpha A B into a fresh array
        result, ldc, stride_c = cp.empty(call["out_shape"], dtype=a.dtype), call["m"], call["m"] * call["n"]
        beta = 0.0
    else:                                            # C = alpha A B + beta C, in out itself
        result, ldc, stride_c = call["target"]
        beta = 1.0 if accumulate else 0.0
    blas = _blas(cp)
    blas.use_stream(cp.cuda.get_current_stream().ptr)
    scalar = blas.functions[np.dtype(a.dtype)][2]
    # host scalars: cuBLAS reads them during the call (a graph being recorded keeps their values)
    alpha_host, beta_host = scalar(alpha), scalar(beta)
    (B, op_b, ld_b, walk_b), (A, op_a, ld_a, walk_a) = call["first"], call["second"]
    if any(isinstance(walk, tuple) for walk in (walk_b, walk_a, stride_c)):
        pointers = _matrix_pointers(cp, call["batch_shape"], ((B, walk_b), (A, walk_a), (result, stride_c)))
        gemm = blas.pointer_batched[np.dtype(a.dtype)]
        step = pointers.itemsize * call["batch"]
        _check(gemm(blas.handle, op_b, op_a, call["m"], call["n"], call["k"], ctypes.addressof(alpha_host),
                    pointers.data.ptr, ld_b, pointers.data.ptr + step, ld_a, ctypes.addressof(beta_host),
                    pointers.data.ptr + 2 * step, ldc, call["batch"]), "gemmBatched")
    else:
        problem = (op_b, op_a, call["m"], call["n"], call["k"], ld_b, ld_a, ldc, call["batch"], walk_b, walk_a,
                   stride_c)
        run = gemm_tuning.runner(cp, blas, a.dtype, problem, blas.workspace, (B.data.ptr, A.data.ptr))
        _check(run(ctypes.addressof(alpha_host), B.data.ptr, A.data.ptr, ctypes.addressof(beta_host),
                   result.data.ptr), "gemm")
    if call["target"] is not None:
        return out
    # a fresh array, not a view: the engine keeps a gradient it owns instead of copying it
    return _store(result if result.shape == shape else result.reshape(shape), out, 1.0, accumulate)


def axis_strides(batch_shape, walk):
    """A batch walk as per-axis strides: one stride steps along the flattened batch."""
    if isinstance(walk, tuple):
        return walk
    inner = np.cumprod((1,) + tuple(batch_shape[:0:-1]))[::-1]     # matrices per step of each axis
    return tuple(int(walk * n) for n in inner)


def matrix_offsets(batch_shape, walk):
    """The element offset of each matrix of a stack over the flattened batch, from its batch walk: what the
    pointer kernel below computes on the device (the tests emulate cuBLAS with it)."""
    index = np.indices(batch_shape).reshape(len(batch_shape), -1)          # (axes, batch)
    return (np.asarray(axis_strides(batch_shape, walk), dtype=np.int64)[:, None] * index).sum(axis=0)


def _matrix_pointers(cp, batch_shape, operands):
    """(3 * batch,) uint64 device addresses of every matrix of B, A and C for a pointer-array GEMM, computed by
    one kernel from the base addresses and batch strides (no host-to-device copy, so a graph can record it)."""
    key = "pointers"
    if key not in _kernels:
        module = cp.RawModule(code=kernels.source("pointers.cu"), options=kernels.compile_options())
        _kernels[key] = module.get_function("matrix_pointers")
    pad = _MAX_BATCH_AXES - len(batch_shape)
    dims = (1,) * pad + tuple(batch_shape)
    args = [np.uint64(array.data.ptr) for array, _ in operands]
    batch = math.prod(batch_shape)
    args += [np.int64(batch), np.int64(operands[0][0].itemsize)] + [np.int64(n) for n in dims]
    for _, walk in operands:
        args += [np.int64(s) for s in (0,) * pad + axis_strides(batch_shape, walk)]
    pointers = cp.empty(3 * batch, dtype=cp.uint64)
    threads = kernels.THREADS_PER_BLOCK
    _kernels[key](((3 * batch + threads - 1) // threads,), (threads,), tuple(args) + (pointers,))
    return pointers


def _store(product, out, alpha, accumulate):
    """The product as matmul returns it, when cuBLAS could not apply alpha or write into out itself."""
    if alpha != 1.0:
        product *= product.dtype.type(alpha)
    if out is None:
        return product
    if accumulate:
        out += product
    else:
        out[...] = product
    return out
