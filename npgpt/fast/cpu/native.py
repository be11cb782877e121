"""The C kernels (``kernels.c``): built once with the machine's C compiler, cached, loaded with ctypes.

    kernels(dtype)     the loaded library for float32 or float64 arrays, or None where it cannot be built
    status()           what was built, where, and, if nothing was, why
    set_enabled(flag)  False: never use them (the NumPy fast paths run); True again: the default
    set_call_observer(fn)
                       profiling: fn(name, seconds) hears the time of each kernel call (None: off)

The first call builds ``kernels.c`` twice (``-DREAL=float`` and ``-DREAL=double``) with ``$CC`` (default
``cc``; it may hold arguments) for this machine's CPU (``-march=native``, and on x86 512-bit vectors where
the CPU has them) and keeps the libraries in ``$NPGPT_CACHE_DIR`` (default ``~/.cache/npgpt``; a private
directory of the temporary one where that cannot be used), under a name that hashes the source, the flags
and the CPU, so a changed source or another machine builds afresh. A directory others may write in is
refused: a library there would be loaded and run. A build takes about a second; a cached one loads in
milliseconds. Each library is written under a temporary name and renamed into place, so processes building at
once (MPI ranks, test workers) never load a half-written file.
A new build deletes the directory's builds that no process has loaded for 30 days.

Without a C compiler, or with ``NPGPT_CPU_KERNELS=0``, ``kernels()`` returns None and the NumPy fast paths
(``ops.py``) run instead: the same maths, a few passes more over memory.

ctypes releases the GIL during each call, so chunks of one op run on the worker threads at once.
"""

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
import warnings

import numpy as np

from ... import backend

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels.c")
FLAGS = ["-O3", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math", "-fPIC", "-shared", "-pthread"]
NATIVE_FLAGS = ["-march=native"]        # dropped if the compiler refuses it
# On x86, 512-bit registers for the loops the compiler vectorises itself (the explicit vectors of the
# attention and the products are sized by kernels.c). GCC's tuning for Intel's AVX-512 CPUs keeps such loops
# at 256 bits; on a Xeon, 512 made the exp of cross-entropy's rows 23-25% faster and GELU 10-17%, changed
# nothing that is bound by memory, and took 1-3% off the tutorial GPT's step at (8, 128) (the small model's
# within the noise). Without AVX-512 the flag does nothing; dropped if the compiler refuses it.
WIDE_VECTOR_FLAGS = ["-mprefer-vector-width=512"] if platform.machine() in ("x86_64", "AMD64") else []
REALS = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}

_lock = threading.Lock()
_state = {"libraries": None, "reason": None, "paths": {}, "enabled": True}

_P, _I64, _I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32


RESULT_TYPES = {"parallel_chunks": _I64, "attention_forward_parallel": ctypes.c_int,
                "attention_backward_parallel": ctypes.c_int, "attention_cached_parallel": ctypes.c_int,
                "block_with_cache": ctypes.c_int, "vector_bytes": ctypes.c_int,
                "gemm_parallel": ctypes.c_int, "gemm_pair_parallel": ctypes.c_int,
                "own_product_available": ctypes.c_int}  # the others: nothing


def _signatures(real):
    """Each kernel's argument types, in kernels.c's order."""
    return {
        "vector_bytes": [],     # the SIMD register width the attention's blocks were built for
        "own_product_available": [],
        # called whole by ops.py's NumPy attention (and its tests)
        "softmax_rows_in_place": [_P, _I64, _I64, _I64, _I64],
        "softmax_backward_rows_in_place": [_P, _P, _I64, _I64],
        "dropout_hashed": [_P, _P, _I64, _I64, ctypes.c_uint64, _I32, real],
        # one op each, cut into chunks on the kernels' thread pool: (..., threads, the smallest chunk)
        "parallel_chunks": [_I64, _I64, ctypes.c_int],
        "gelu_forward_parallel": [_P, _P, _I64, ctypes.c_int, ctypes.c_int, _I64],
        "gelu_backward_parallel": [_P, _P, _P, _I64, ctypes.c_int, ctypes.c_int, _I64],
        "layer_norm_forward_parallel": [_P, _P, _P, _P, _P, _P, _I64, _I64, real, ctypes.c_int, _I64],
        "layer_norm_backward_parallel": [_P, _P, _P, _P, _P, _P, _P, _P, _I64, _I64, ctypes.c_int, _I64],
        "logsumexp_rows_parallel": [_P, _P, _I64, _I64, ctypes.c_int, _I64],
        "softmax_scaled_rows_parallel": [_P, _P, _P, _P, _I64, _I64, ctypes.c_int, _I64],
        "dropout_hashed_parallel": [_P, _P, _I64, ctypes.c_uint64, _I32, real, ctypes.c_int, _I64],
        "attention_forward_parallel": [_P, _P, _P, _P, _P, _P, _I64, real, ctypes.c_int, ctypes.c_uint64, _I32,
                                       real, ctypes.c_int, _I64],
        "attention_backward_parallel": [_P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _I64, real, ctypes.c_int,
                                        ctypes.c_uint64, _I32, real, ctypes.c_int, _I64],
        "embedding_backward_parallel": [_P, _P, _P, _I64, _I64, _I64, ctypes.c_int, _I64, _I64],
        "add_parallel": [_P, _P, _P, _I64, ctypes.c_int, _I64],
        "column_sums_parallel": [_P, _P, _I64, _I64, ctypes.c_int, _I64],
        "adamw_update_many": [_P, _P, _P, _I64, ctypes.c_int, _I64],
        "sum_of_squares_many": [_P, _P, _I64, _P, ctypes.c_int, _I64],
        "scale_many": [_P, _P, _I64, real, ctypes.c_int, _I64],
        "gemm_parallel": [_P, ctypes.c_int, ctypes.c_int, ctypes.c_int, _I64, _I64, _I64, _P, _I64, _P, _I64, _P,
                          _I64, _P, ctypes.c_int, _I64],
        "gemm_pair_parallel": [_P, ctypes.c_int, _P, ctypes.c_int, _I64],
        "few_rows_product_parallel": [_P, _I64, _P, _I64, _P, _P, _I64, _I64, _I64, _I64, ctypes.c_int, _I64],
        "attention_cached_parallel": [_P, _P, _P, _P, _P, _I64, real, ctypes.c_int, _I64],
        "block_with_cache": [_P, _P, _P, _P, _P, _P, real, real, real, ctypes.c_int, ctypes.c_int, _I64],
    }


def cache_dirs():
    """Where the libraries may be kept, in order: $NPGPT_CACHE_DIR, else ~/.cache/npgpt; then a directory of
    the system's temporary one, private to this user."""
    default = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "npgpt")
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return [os.environ.get("NPGPT_CACHE_DIR") or default, os.path.join(tempfile.gettempdir(), f"npgpt-{uid}")]


def _private_directory(directory):
    """Make `directory` (mode 0o700) and return True if it is this user's and nobody else may write in it: a
    library found there is loaded and run, so one another user could have planted is refused."""
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        info = os.stat(directory)
    except OSError:
        return False
    ours = not hasattr(os, "getuid") or info.st_uid == os.getuid()
    return ours and not info.st_mode & 0o022 and os.access(directory, os.W_OK)


def _cpu_description():
    """What the CPU can run, for the cache key: the flags line of /proc/cpuinfo where there is one."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build(compiler, real, flags, directory):
    """The path of kernels.c built for `real` with `flags` in `directory` (built now unless there already)."""
    with open(SOURCE, "rb") as f:
        source = f.read()
    key = hashlib.sha256(b"\0".join([source, " ".join(compiler).encode(), real.encode(), " ".join(flags).encode(),
                                     platform.machine().encode(), _cpu_description().encode()])).hexdigest()
    path = os.path.join(directory, f"kernels-{real}-{key[:16]}.so")
    if os.path.exists(path):
        try:
            os.utime(path)              # its time is its last use, which _remove_unused_builds goes by
        except OSError:
            pass
        return path
    fd, partial = tempfile.mkstemp(prefix=f".kernels-{real}-", suffix=".so", dir=directory)
    os.close(fd)
    try:
        result = subprocess.run([*compiler, *flags, f"-DREAL={real}", SOURCE, "-o", partial, "-lm"],
                                capture_output=True, text=True, errors="replace", timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler[0]} failed: {result.stderr.strip().splitlines()[-1:] or ['?']}")
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    _remove_unused_builds(directory, real, path)
    return path


UNUSED_BUILD_DAYS = 30      # a build of another source, flags or CPU not loaded for this long is deleted


def _remove_unused_builds(directory, real, keep):
    """Delete the builds of kernels.c for `real` in `directory`, other than `keep`, that no process has
    loaded for UNUSED_BUILD_DAYS (each load touches its file), so that old versions of the source do not pile
    up in the cache. One another checkout still uses stays; one deleted is rebuilt when next needed."""
    cutoff = time.time() - UNUSED_BUILD_DAYS * 86400
    prefix = f"kernels-{real}-"
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        path = os.path.join(directory, name)
        if not (name.startswith(prefix) and name.endswith(".so")) or path == keep:
            continue
        try:
            if os.path.getmtime(path) < cutoff:
                os.remove(path)
        except OSError:
            pass


def _compiler():
    """The compiler command as a list ($CC may hold arguments: "ccache gcc"), or None."""
    if os.environ.get("CC"):
        words = shlex.split(os.environ["CC"])
        found = shutil.which(words[0]) if words else None
        return [found, *words[1:]] if found else None
    found = shutil.which("cc") or shutil.which("gcc")
    return [found] if found else None


def _flag_sets():
    """The flag sets a build tries, the fullest first, each once (off x86 the first two are one)."""
    sets = []
    for flags in (FLAGS + NATIVE_FLAGS + WIDE_VECTOR_FLAGS, FLAGS + NATIVE_FLAGS, FLAGS):
        if flags not in sets:
            sets.append(flags)
    return sets


def _load_library(compiler, real):
    """(library, path) of kernels.c for `real`, from the first cache directory where it builds and loads."""
    last_error = None
    for directory in cache_dirs():
        if not _private_directory(directory):
            last_error = OSError(f"{directory} cannot be written, or others may write in it")
            continue
        for flags in _flag_sets():
            try:
                path = _build(compiler, real, flags, directory)
                return ctypes.CDLL(path), path
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                last_error = exc
    raise RuntimeError(f"the kernels could not be built: {last_error}")


def _load():
    """({dtype: library}, None), or (None, the reason there are none)."""
    if os.environ.get("NPGPT_CPU_KERNELS", "1") == "0":
        return None, "turned off by NPGPT_CPU_KERNELS=0"
    compiler = _compiler()
    if compiler is None and os.environ.get("CC"):
        reason = f"CC={os.environ['CC']!r} is not a command found on PATH"
        warnings.warn(f"npgpt: {reason}; the NumPy fast paths run instead", RuntimeWarning, stacklevel=3)
        return None, reason
    if compiler is None:
        return None, "no C compiler found (set CC, or install one): the NumPy fast paths run instead"
    libraries, paths = {}, {}
    try:
        for dtype, real in REALS.items():
            library, paths[real] = _load_library(compiler, real)
            for name, argtypes in _signatures(ctypes.c_float if real == "float" else ctypes.c_double).items():
                fn = getattr(library, name)
                fn.argtypes, fn.restype = argtypes, RESULT_TYPES.get(name)
            library.own_product = bool(library.own_product_available())
            libraries[dtype] = library
    except Exception as exc:        # whatever went wrong, the NumPy fast paths still run
        reason = str(exc) if isinstance(exc, RuntimeError) else f"the kernels could not be loaded: {exc!r}"
        warnings.warn(f"npgpt: {reason}; the NumPy fast paths run instead", RuntimeWarning, stacklevel=3)
        return None, reason
    _state["paths"].update(paths)
    return libraries, None


def set_enabled(enabled):
    """Use the kernels where they are built (True, the default) or never (False: the NumPy fast paths run).
    Returns the previous setting."""
    previous, _state["enabled"] = _state["enabled"], bool(enabled)
    return previous


def kernels(dtype):
    """The kernels library for arrays of `dtype` (float32 or float64), or None (not built, or turned off)."""
    if not _state["enabled"]:
        return None
    libraries = _state["libraries"]         # (asked hundreds of times a step: the loaded case stays one lookup)
    return (libraries if libraries is not None else _libraries()).get(dtype)


def _libraries():
    """{dtype: library} of the built libraries (built and loaded at the first call), {} where they cannot be."""
    if _state["libraries"] is None:
        with _lock:
            if _state["libraries"] is None:
                loaded, reason = _load()
                _state["libraries"], _state["reason"] = loaded or {}, reason
    return _state["libraries"]


def status():
    """{"built": bool, "paths": {real: path}, "vector_bytes": the SIMD register width built for (64 with
    AVX-512, 32 with AVX2, 16 otherwise; None unbuilt), "own_product": whether float32's matrix products are
    the kernels' own (built for 512-bit vectors) rather than the BLAS's, "reason": why not built (or None)};
    builds if not yet tried."""
    kernels(np.dtype(np.float32))
    library = (_state["libraries"] or {}).get(np.dtype(np.float32))
    return {"built": bool(_state["libraries"]), "paths": dict(_state["paths"]),
            "vector_bytes": library.vector_bytes() if library is not None else None,
            "own_product": library is not None and library.own_product, "reason": _state["reason"]}


_call_observer = {"fn": None, "unwrapped": {}}    # the observer, and each wrapped function's original


def set_call_observer(observer):
    """Profiling: observer(name, seconds) is told the wall time of each kernel call as it returns, on the
    thread that made the call (a call's chunks on the pool threads are inside that time, and so is ctypes'
    conversion of its arguments); None turns it off. Returns the previous observer. While one is set, every
    kernel call costs one Python call more."""
    previous, _call_observer["fn"] = _call_observer["fn"], observer
    unwrapped = _call_observer["unwrapped"]
    for library in _libraries().values():       # loaded now even while turned off, so none escapes
        for name in _signatures(ctypes.c_float):
            fn = unwrapped.setdefault((id(library), name), getattr(library, name))
            setattr(library, name, fn if observer is None else _observed_call(name, fn, observer))
    if observer is None:
        unwrapped.clear()
    return previous


def _observed_call(name, fn, observer):
    def call(*args):
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:
            observer(name, time.perf_counter() - start)
    return call


def address(array, offset=0):
    """The address of element `offset` of a C-contiguous array (what a kernel's pointer argument takes).
    Through the buffer protocol where the array is writable (a third of the time of `array.ctypes.data`,
    which builds an object per call: a small model makes thousands of these calls a step)."""
    try:
        base = ctypes.addressof(ctypes.c_char.from_buffer(array))
    except (TypeError, ValueError, BufferError):      # read-only, or empty
        base = array.ctypes.data
    return base + offset * array.itemsize


# ========================================================================================================
# attention's row softmax, for ops.scaled_dot_product_attention

def softmax_rows_in_place(scores, causal=False, offset=0):
    """scores (..., L, S), C-contiguous, becomes its softmax along the last axis. causal: query i of each
    (L, S) block sits at position offset + i and gets probability 0 on the keys after it. Returns scores, or
    None where the kernels are not built (the caller then does it with NumPy)."""
    k = kernels(scores.dtype)
    if k is None or not scores.flags.c_contiguous or scores.ndim < 2:
        return None
    S = scores.shape[-1]
    k.softmax_rows_in_place(address(scores), scores.size // max(1, S), S, scores.shape[-2] if causal else 0,
                            offset)
    return scores


def softmax_backward_rows_in_place(grad, probs):
    """dP (..., L, S) becomes dS = P (dP - sum_j dP_j P_j) in place; None where the kernels are not built."""
    k = kernels(grad.dtype)
    if k is None or not (grad.flags.c_contiguous and probs.flags.c_contiguous) or grad.shape != probs.shape \
            or grad.dtype != probs.dtype:
        return None
    S = grad.shape[-1]
    k.softmax_backward_rows_in_place(address(grad), address(probs), grad.size // max(1, S), S)
    return grad


# ========================================================================================================
# dropout's mask, for native_ops.dropout and the attention's dropout in ops.py

def dropout_seed(generator):
    """The seed of one dropout mask, drawn from `generator` (the global one if None)."""
    rng = generator if generator is not None else backend.global_rng()
    return int(rng.integers(0, 2**63 - 1))


def dropout_hashed(values, out, seed, threshold, scale, start=0):
    """out = values * scale where the hashed 16-bit bits of (index, seed) are >= threshold, else 0; values and
    out C-contiguous of one shape and dtype (out may be values). Returns out, or None without the kernels."""
    k = kernels(values.dtype)
    if k is None or not (values.flags.c_contiguous and out.flags.c_contiguous) or values.shape != out.shape \
            or values.dtype != out.dtype:
        return None
    k.dropout_hashed(address(values), address(out), start, values.size, seed, threshold, scale)
    return out
