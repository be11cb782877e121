"""Autotuned float32 GEMMs: cuBLASLt's candidate algorithms for a product, each timed once, the fastest kept.

cuBLAS picks one algorithm per call from a heuristic, and the pick is not always the fastest. On GPT-2
small, the output layer's input gradient (8192, 50304) @ (50304, 768) takes 12.9 ms with cuBLAS's pick and
12.0 ms with another algorithm (H200). cuBLASLt, the library under cuBLAS, lists several candidate
algorithms for the same call (tile shapes, how the K axis is split across the multiprocessors). The first
time npgpt meets a float32 problem (its shapes, transposes, leading dimensions and batch strides), it runs
plain cuBLAS and each candidate a few times on the real operands, checks that every candidate computes the
same product, and keeps the fastest for the rest of the process. Later calls of that problem, and the CUDA
graph that records them, use the choice.

Tuning waits for the GPU, so it happens in eager steps only: the first eager step of a GraphStep meets
every problem the graph then records. A problem first met while a graph records (nothing may wait then),
a small product (not worth the timing), or float64 takes plain cuBLAS.

``cublas.py`` plans each call (which operand goes first, the op flags, the leading dimensions) and
asks ``runner`` for the function that runs it.
"""

import ctypes

import numpy as np

from .capture import capturing

MIN_TUNED_FLOPS = 2**28        # smaller products run plain cuBLAS: timing them would cost more than it saves
_CANDIDATES = 8                # algorithms asked of cuBLASLt's heuristic per problem
_TIMED_RUNS = 3

# cuBLASLt enumerations (cublasLt.h, cublas_api.h, library_types.h)
_CUDA_R_32F, _COMPUTE_32F = 0, 68
_DESC_TRANSA, _DESC_TRANSB = 3, 4
_LAYOUT_BATCH_COUNT, _LAYOUT_BATCH_STRIDE = 5, 6
_PREF_MAX_WORKSPACE = 1


class _HeuristicResult(ctypes.Structure):
    """cublasLtMatmulHeuristicResult_t: the opaque algorithm (8 words) and what it needs."""
    _fields_ = [("algo", ctypes.c_uint64 * 8), ("workspace_size", ctypes.c_size_t), ("state", ctypes.c_int),
                ("waves", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


# (device's cuBLAS, dtype, problem) -> (runner, choice, its ms, plain cuBLAS's ms, candidates that ran)
_tuned = {}
_lt = {}                       # device id -> _Lt
disabled_reason = None         # set when cuBLASLt could not be loaded: every product then runs plain cuBLAS


def choices():
    """{problem: (choice, its ms, plain cuBLAS's ms, cuBLASLt candidates that ran)} for every problem met so
    far (the ms are None where nothing was timed: small, float64 or broadcast products)."""
    return {key: value[1:] for key, value in _tuned.items()}


def runner(cp, blas, dtype, problem, workspace, operands):
    """The function that runs one planned GEMM: run(alpha_ptr, b_ptr, a_ptr, beta_ptr, c_ptr) -> status.

    problem = (op_b, op_a, m, n, k, ld_b, ld_a, ldc, batch, stride_b, stride_a, stride_c) in cuBLAS's
    column-major terms, as cublas.py plans it; blas holds the plain cuBLAS functions and handle;
    operands = (b_ptr, a_ptr), the call's inputs, which a first meeting times the candidates on.
    """
    key = (id(blas), np.dtype(dtype).str) + problem            # blas: one cuBLAS handle per device
    if key in _tuned:
        return _tuned[key][0]
    plain = _plain_runner(blas, dtype, problem)
    m, n, k, batch, stride_b, stride_a = problem[2], problem[3], problem[4], problem[8], problem[9], problem[10]
    worth = 2.0 * m * n * k * batch >= MIN_TUNED_FLOPS and np.dtype(dtype) == np.float32
    broadcast = batch > 1 and 0 in (stride_b, stride_a)          # one operand shared by the whole batch
    if not worth or broadcast:                                     # never tuned: remembered as plain cuBLAS
        _tuned[key] = (plain, "cuBLAS", None, None, 0)
    elif capturing() or disabled_reason is not None:      # not now: a later eager call may tune it
        return plain
    else:
        _tuned[key] = _tune(cp, problem, plain, workspace, operands)
    return _tuned[key][0]


def _plain_runner(blas, dtype, problem):
    op_b, op_a, m, n, k, ld_b, ld_a, ldc, batch, stride_b, stride_a, stride_c = problem
    gemm, batched, _ = blas.functions[np.dtype(dtype)]
    if batch == 1:
        return lambda alpha, b, a, beta, c: gemm(blas.handle, op_b, op_a, m, n, k, alpha, b, ld_b, a, ld_a,
                                                 beta, c, ldc)
    return lambda alpha, b, a, beta, c: batched(blas.handle, op_b, op_a, m, n, k, alpha, b, ld_b, stride_b,
                                                a, ld_a, stride_a, beta, c, ldc, stride_c, batch)


def _tune(cp, problem, plain, workspace, operands):
    """(fastest runner, its name, its ms, plain cuBLAS's ms, candidates timed) for this problem, timed on its
    operands (only read); the outputs go to scratch arrays, so the call's own output is untouched."""
    global disabled_reason
    try:
        lt = _library(cp)
    except (OSError, AttributeError, RuntimeError) as exc:      # no usable cuBLASLt: plain cuBLAS from now on
        disabled_reason = str(exc)
        return plain, "cuBLAS", None, None, 0
    try:
        candidates = lt.candidates(problem, workspace)
    except RuntimeError:                                        # cuBLASLt declines this one problem
        candidates = []
    m, n, ldc, batch, stride_c = problem[2], problem[3], problem[7], problem[8], problem[11]
    extent = (batch - 1) * stride_c + (n - 1) * ldc + m               # elements of C that cuBLAS writes
    reference, scratch = cp.zeros(extent, dtype=cp.float32), cp.zeros(extent, dtype=cp.float32)
    one, zero = ctypes.c_float(1.0), ctypes.c_float(0.0)
    alpha, beta = ctypes.addressof(one), ctypes.addressof(zero)
    timings = []
    for name, run in [("cuBLAS", plain)] + candidates:
        out = reference if name == "cuBLAS" else scratch
        out.fill(0)
        if run(alpha, *operands, beta, out.data.ptr) != 0:
            continue
        if name != "cuBLAS":                                       # a candidate must compute the same product
            error = float(cp.abs(scratch - reference).max())
            if not error <= 1e-4 * float(cp.abs(reference).max()) + 1e-6:
                continue
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        for _ in range(_TIMED_RUNS):
            run(alpha, *operands, beta, out.data.ptr)
        end.record()
        end.synchronize()
        timings.append((cp.cuda.get_elapsed_time(start, end) / _TIMED_RUNS, name, run))
    del reference, scratch
    cp.get_default_memory_pool().free_all_blocks()        # the scratch outputs can be large: give them back
    if not timings or timings[0][1] != "cuBLAS":
        return plain, "cuBLAS", None, None, len(candidates)
    ms, name, run = min(timings, key=lambda timing: timing[0])
    return run, name, ms, timings[0][0], len(timings) - 1


class _Lt:
    """cuBLASLt's library and handle on one device."""

    def __init__(self, cp):
        path = _library_path()
        self.lib = lib = ctypes.CDLL(path)
        P, i, u64, i64, size = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64, ctypes.c_int64, ctypes.c_size_t
        lib.cublasLtCreate.argtypes = [ctypes.POINTER(P)]
        lib.cublasLtMatmulDescCreate.argtypes = [ctypes.POINTER(P), i, i]
        lib.cublasLtMatmulDescSetAttribute.argtypes = [P, i, P, size]
        lib.cublasLtMatrixLayoutCreate.argtypes = [ctypes.POINTER(P), i, u64, u64, i64]
        lib.cublasLtMatrixLayoutSetAttribute.argtypes = [P, i, P, size]
        lib.cublasLtMatmulPreferenceCreate.argtypes = [ctypes.POINTER(P)]
        lib.cublasLtMatmulPreferenceSetAttribute.argtypes = [P, i, P, size]
        lib.cublasLtMatmulAlgoGetHeuristic.argtypes = [P, P, P, P, P, P, P, i, ctypes.POINTER(_HeuristicResult),
                                                       ctypes.POINTER(i)]
        lib.cublasLtMatmul.argtypes = [P, P, P, P, P, P, P, P, P, P, P, P, P, P, size, P]
        handle = P()
        _check(lib.cublasLtCreate(ctypes.byref(handle)), "cublasLtCreate")
        self.handle = handle.value
        self.cp = cp

    def _layout(self, rows, cols, ld, batch, stride):
        layout = ctypes.c_void_p()
        _check(self.lib.cublasLtMatrixLayoutCreate(ctypes.byref(layout), _CUDA_R_32F, rows, cols, ld),
               "cublasLtMatrixLayoutCreate")
        if batch > 1:
            count, offset = ctypes.c_int32(batch), ctypes.c_int64(stride)
            _check(self.lib.cublasLtMatrixLayoutSetAttribute(layout, _LAYOUT_BATCH_COUNT, ctypes.byref(count), 4),
                   "batch count")
            _check(self.lib.cublasLtMatrixLayoutSetAttribute(layout, _LAYOUT_BATCH_STRIDE, ctypes.byref(offset),
                                                              8), "batch stride")
        return layout

    def candidates(self, problem, workspace):
        """[(name, run)] for cuBLASLt's candidate algorithms for this problem."""
        op_b, op_a, m, n, k, ld_b, ld_a, ldc, batch, stride_b, stride_a, stride_c = problem
        lib = self.lib
        desc = ctypes.c_void_p()
        _check(lib.cublasLtMatmulDescCreate(ctypes.byref(desc), _COMPUTE_32F, _CUDA_R_32F), "MatmulDescCreate")
        for attribute, op in ((_DESC_TRANSA, op_b), (_DESC_TRANSB, op_a)):
            value = ctypes.c_int32(op)
            _check(lib.cublasLtMatmulDescSetAttribute(desc, attribute, ctypes.byref(value), 4), "transpose")
        # stored shapes, column-major: op N stores (rows, cols) of op(X), op T stores its transpose
        first = self._layout(*((m, k) if op_b == 0 else (k, m)), ld_b, batch, stride_b)
        second = self._layout(*((k, n) if op_a == 0 else (n, k)), ld_a, batch, stride_a)
        result = self._layout(m, n, ldc, batch, stride_c)
        preference = ctypes.c_void_p()
        _check(lib.cublasLtMatmulPreferenceCreate(ctypes.byref(preference)), "PreferenceCreate")
        limit = ctypes.c_uint64(workspace.nbytes)
        _check(lib.cublasLtMatmulPreferenceSetAttribute(preference, _PREF_MAX_WORKSPACE, ctypes.byref(limit), 8),
               "workspace limit")
        found = (_HeuristicResult * _CANDIDATES)()
        count = ctypes.c_int(0)
        _check(lib.cublasLtMatmulAlgoGetHeuristic(self.handle, desc, first, second, result, result, preference,
                                                  _CANDIDATES, found, ctypes.byref(count)), "AlgoGetHeuristic")
        keep = (desc, first, second, result, preference)       # descriptors live as long as the runners
        runners = []
        for index in range(count.value):
            if found[index].state != 0 or found[index].workspace_size > workspace.nbytes:
                continue
            algo = (ctypes.c_uint64 * 8)(*found[index].algo)
            runners.append((f"cuBLASLt #{index}", self._runner(keep, algo, workspace)))
        return runners

    def _runner(self, keep, algo, workspace):
        desc, first, second, result, _ = keep
        matmul, handle, cp = self.lib.cublasLtMatmul, self.handle, self.cp

        def run(alpha, b, a, beta, c):          # D = C = alpha op(B) op(A) + beta C, with this algorithm
            return matmul(handle, desc, alpha, b, first, a, second, beta, c, result, c, result,
                          ctypes.addressof(algo), workspace.data.ptr, workspace.nbytes,
                          cp.cuda.get_current_stream().ptr)
        run.descriptors = keep                  # the descriptors (the preference too) live as long as run
        return run


def _library_path():
    """The cuBLASLt library that cuBLAS loaded into this process."""
    with open("/proc/self/maps", encoding="utf-8") as f:
        paths = sorted({line.split()[-1] for line in f if "libcublasLt.so" in line})
    if not paths:
        raise OSError("cuBLASLt is not loaded in this process")
    return paths[0]


def _library(cp):
    device = cp.cuda.runtime.getDevice()
    if device not in _lt:
        _lt[device] = _Lt(cp)
    return _lt[device]


def _check(status, name):
    if status != 0:
        raise RuntimeError(f"cuBLASLt {name} failed with status {status}")
