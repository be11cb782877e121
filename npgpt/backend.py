"""The array backend: the one module that knows whether arrays are NumPy or CuPy.

Every other module asks for its array module with ``xp = get_array_module(x)`` (the array module of an
existing array) or ``xp = current()`` (the module new arrays are made with), so one code path serves the CPU
and the GPU. NumPy is the default; CuPy is chosen with the environment variable ``NPGPT_DEVICE=gpu`` or with
``npgpt.backend.set_device("gpu")``.

Shapes: this module is shape-agnostic; the rest of npgpt uses B batch, T time, C channels, H heads,
D head size, V vocabulary.

Next to read: ``npgpt/engine.py``, the Tensor and its autograd engine.
"""

import os
import threading
from contextlib import contextmanager

import numpy as np

_DEVICES = ("cpu", "gpu")
_device = "cpu"
_cupy = None  # the cupy module, imported on first use of the GPU


class DeviceError(RuntimeError):
    """The requested device cannot be used (CuPy missing, or no CUDA GPU)."""


def _import_cupy():
    """Import CuPy and check that a CUDA GPU answers; raise DeviceError with the fix otherwise."""
    global _cupy
    if _cupy is not None:
        return _cupy
    try:
        import cupy
    except ImportError as exc:
        raise DeviceError(
            "device 'gpu' needs CuPy, which is not installed: pip install 'npgpt[gpu]' "
            "(or cupy-cuda12x), or use device 'cpu'") from exc
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDA driver missing or broken
        raise DeviceError(f"device 'gpu' found no usable CUDA GPU ({exc}); use device 'cpu'") from exc
    if count < 1:
        raise DeviceError("device 'gpu' found no CUDA GPU; use device 'cpu'")
    _cupy = cupy
    return cupy


def gpu_unavailable_reason():
    """None when the GPU backend works here, else the reason it does not (for skips and messages)."""
    try:
        _import_cupy()
    except DeviceError as exc:
        return str(exc)
    return None


def set_device(name):
    """Choose where new arrays live: 'cpu' (NumPy), 'gpu' (CuPy) or 'auto' (the GPU if one answers)."""
    global _device
    if name == "auto":
        try:
            _import_cupy()
            name = "gpu"
        except DeviceError:
            name = "cpu"
    if name not in _DEVICES:
        raise ValueError(f"unknown device {name!r}: use 'cpu', 'gpu' or 'auto'")
    if name == "gpu":
        _import_cupy()
    _device = name
    return name


def get_device():
    """The device new arrays are created on: 'cpu' or 'gpu'."""
    return _device


def current():
    """The array module new arrays are made with: numpy, or cupy on the GPU."""
    if _device == "gpu":
        return _cupy if _cupy is not None else _import_cupy()
    return np


def module_for(device):
    """The array module of a device name."""
    if device == "gpu":
        return _import_cupy()
    if device == "cpu":
        return np
    raise ValueError(f"unknown device {device!r}: use 'cpu' or 'gpu'")


def is_gpu_array(array):
    return type(array).__module__.startswith("cupy")


def get_array_module(*arrays):
    """numpy or cupy, whichever the first array-like argument belongs to (numpy for scalars)."""
    for a in arrays:
        if is_gpu_array(a):
            return _cupy if _cupy is not None else _import_cupy()
    return np


def device_of(array):
    return "gpu" if is_gpu_array(array) else "cpu"


def to_numpy(array):
    """A NumPy copy (or view) of any array: the only way data leaves the GPU."""
    if is_gpu_array(array):
        return array.get()
    return np.asarray(array)


def to_device(array, device):
    """The array on `device` ('cpu' or 'gpu'), copied only if it lives elsewhere."""
    if device == "cpu":
        return to_numpy(array)
    xp = module_for(device)
    return xp.asarray(array)


def scatter_add(target, indices, values):
    """target[indices] += values, adding repeated indices up (ufunc.at, on the CPU and the GPU alike)."""
    get_array_module(target).add.at(target, indices, values)



def default_rng(seed=None, device=None):
    """A random generator for the given (or current) device; NumPy's PCG64 on the CPU."""
    xp = module_for(device or _device)
    return xp.random.default_rng(seed)


_global_rngs = {}  # device -> the generator used by init and dropout when none is passed


def manual_seed(seed):
    """Seed the global generators (parameter init, dropout) on every device, as torch.manual_seed."""
    global _seed_source
    _global_rngs.clear()
    _global_rngs["seed"] = seed
    _seed_source = np.random.default_rng(seed)
    return seed


_seed_source = np.random.default_rng()


def next_seed():
    """A fresh 63-bit seed, drawn on the host (seeded by manual_seed). GPU dropout kernels hash it with each
    element's index, so their random numbers need no device generator and no copy back to the host."""
    return int(_seed_source.integers(0, 2**63 - 1))


_thread_rng = threading.local()


@contextmanager
def using_rng(rng):
    """Within the block, this thread's global_rng() is `rng` (data-parallel workers draw their own)."""
    previous = getattr(_thread_rng, "rng", None)
    _thread_rng.rng = rng
    try:
        yield rng
    finally:
        _thread_rng.rng = previous


def global_rng():
    """The generator used by init and dropout: this thread's (see using_rng), else the device's global one."""
    local = getattr(_thread_rng, "rng", None)
    if local is not None:
        return local
    if _device not in _global_rngs:
        _global_rngs[_device] = default_rng(_global_rngs.get("seed"))
    return _global_rngs[_device]


def keep_mask(rng, shape, p):
    """(bool mask keeping each element with probability ~1-p, the scale that makes its mean exactly 1).

    On the CPU the mask comes from 16-bit random integers (2 bytes an element instead of 4), so p is
    rounded to a multiple of 1/65536, and the scale 65536 / (65536 - threshold) matches that rounding.
    """
    if isinstance(rng, np.random.Generator):
        threshold = int(round(p * 65536))
        keep = rng.integers(0, 65536, size=shape, dtype=np.uint16) >= threshold
        return keep, 65536.0 / (65536 - threshold)
    keep = rng.random(shape, dtype=np.float32) >= p
    return keep, 1.0 / (1.0 - p)


def rows_per_block(array, block_bytes=512 * 1024):
    """Rows of a 2-D array to process at a time: an L2-cache-sized block on the CPU, all rows on the GPU
    (where one large launch beats many small ones)."""
    if is_gpu_array(array):
        return max(1, array.shape[0])
    return max(1, block_bytes // max(1, array.shape[-1] * array.itemsize))


def matmul(a, b, out=None, alpha=1.0, accumulate=False):
    """alpha * (a @ b), returned, or written into `out` (added to it when accumulate).

    On the GPU through npgpt.cublas, which calls cuBLAS itself so that a CUDA graph can record the product
    (CuPy's own @ refuses to run during capture), and which scales and accumulates inside the GEMM. On the
    CPU, NumPy's matmul and then the scaling or the sum.
    """
    if accumulate and out is None:
        raise ValueError("matmul: accumulate=True adds the product to out; pass out")
    if is_gpu_array(a) or is_gpu_array(b):
        from .fast.cuda import cublas
        return cublas.matmul(a, b, out=out, alpha=alpha, accumulate=accumulate)
    product = np.matmul(a, b, out=None if accumulate else out)
    if alpha != 1.0:
        product *= product.dtype.type(alpha)
    if accumulate:
        out += product
        return out
    return product


def add(a, b):
    """a + b. On the GPU, two contiguous float arrays of one shape take npgpt's add kernel, which keeps several
    loads in flight per thread (CuPy's generic one reaches about half the memory bandwidth)."""
    if (is_gpu_array(a) and is_gpu_array(b) and a.shape == b.shape and a.dtype == b.dtype
            and a.dtype in (np.float32, np.float64) and a.flags.c_contiguous and b.flags.c_contiguous):
        from .fast.cuda import kernels
        return kernels.add(a, b)
    return a + b


def products_in_place(array):
    """True when matmul on `array` runs through cuBLAS (the GPU): it reads and writes strided views (the
    attention's heads) where they lie, and its alpha and accumulate cost nothing. NumPy's matmul copies such
    views and scales in a second pass, so CPU code lays its operands out and scales the smaller array first."""
    return is_gpu_array(array)


def sum_leading(array, count):
    """Sum over the first `count` axes (a bias or LayerNorm gradient summed over every position).

    On the GPU as a (1, N) @ (N, C) product, whose reads are coalesced; a reduction over leading axes
    reads with a stride there. On the CPU, NumPy's sum over axis 0 adds whole rows.
    """
    rest = array.shape[count:]
    flat = array.reshape(-1, int(np.prod(rest, dtype=np.int64)))
    if not is_gpu_array(array):
        return flat.sum(axis=0).reshape(rest)
    summed = get_array_module(array).empty(rest, dtype=array.dtype)     # its own array: a .grad keeps it
    matmul(_ones_row(array, flat.shape[0]), flat, out=summed.reshape(1, -1))
    return summed


_ones = {}


def _ones_row(like, n):
    """A (1, n) row of ones on like's device, kept for reuse (not while a graph records: the fill would only
    run at replay)."""
    key = (get_array_module(like).cuda.runtime.getDevice(), n, like.dtype.str)
    if key in _ones:
        return _ones[key]
    ones = get_array_module(like).ones((1, n), dtype=like.dtype)
    if not capturing():
        _ones[key] = ones
    return ones


def copy_into(target, source):
    """target[...] = source, a host array; on the GPU an asynchronous copy in the current stream's order."""
    if is_gpu_array(target):
        target.set(np.ascontiguousarray(source, dtype=target.dtype),
                   stream=_cupy.cuda.get_current_stream())
    else:
        target[...] = source


def capturing():
    """True while this thread's current GPU stream is being recorded into a CUDA graph (npgpt/graph.py):
    then nothing may wait for the device or copy from the host, so checks that read device values skip."""
    return _cupy is not None and _cupy.cuda.get_current_stream().is_capturing()


def rng_state(rng):
    """A JSON-able snapshot of a NumPy generator's state (CuPy generators are not saved)."""
    if isinstance(rng, np.random.Generator):
        return rng.bit_generator.state
    return None


def set_rng_state(rng, state):
    if state is not None and isinstance(rng, np.random.Generator):
        rng.bit_generator.state = state


def synchronize():
    """Wait for all queued GPU work, on every stream (a no-op on the CPU): timings on the GPU need it."""
    if _cupy is not None:
        _cupy.cuda.Device().synchronize()


if os.environ.get("NPGPT_DEVICE"):
    try:
        set_device(os.environ["NPGPT_DEVICE"])
    except DeviceError:
        _device = "gpu"   # as asked; the first array made raises the DeviceError, where it can be reported
