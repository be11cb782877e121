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
    if _device != "cpu":
        raise DeviceError(f"NPGPT_DEVICE={_device!r} is not a device: set it to cpu, gpu or auto")
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


def host_rng():
    """A NumPy generator on the host, seeded by manual_seed with the others: for plain numbers (seeds)."""
    return _seed_source


_thread_rng = threading.local()


@contextmanager
def using_rng(rng):
    """Within the block, this thread's global_rng() is `rng`: threads that run ops side by side each draw
    from a generator of their own."""
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


def _device_from_environment(name):
    """The device NPGPT_DEVICE names. An unusable one is reported by the first array made, not at import."""
    global _device
    try:
        set_device(name)
    except DeviceError:
        _device = "gpu"         # as asked: current() raises the DeviceError, where it can be reported
    except ValueError:
        _device = name          # not a device: current() raises, naming the variable and the choices


if os.environ.get("NPGPT_DEVICE"):
    _device_from_environment(os.environ["NPGPT_DEVICE"])
