"""The Tensor and its reverse-mode autograd engine.

A Tensor wraps an array (``.data``, NumPy or CuPy) and, when it was made by an op from tensors that require
gradients, remembers its parents and a small ``backward`` closure. That closure maps the gradient of the
output, dL/d(out), to the gradients of the inputs, dL/d(input), and lives right beside the forward code.

``loss.backward()`` then visits every node once, in reverse topological order (found iteratively, so a
100,000-op chain works), calls each closure, and adds the results into the parents. Broadcasting is undone in
exactly one place, ``_sum_to_shape``: an op may return a gradient of its broadcast output shape, and the
engine sums it back to the input's shape. Afterwards the graph is released, so memory does not grow from one
training step to the next.

Rules for closures: a backward never writes into the incoming gradient, and returns fresh arrays or views of
that gradient, never an array saved from the forward pass, so the engine may add into what it receives.

Dispatch (the end of this file): every op has one reference body, the plain maths you read here and in
``functional.py``. A faster implementation of an op (``npgpt/fast/``) registers beside it for the arrays it
handles; ``@dispatchable`` asks that one registry before running the reference. ``NPGPT_FAST=0`` (or
``npgpt.fast.disable()``) runs the reference alone.

Shape legend used across npgpt: B batch, T time, C channels, H heads, D head size, V vocabulary.

Next to read: ``npgpt/functional.py``, the transformer's layer ops and their hand-written gradients.
"""

import functools
import os
import threading
from contextlib import contextmanager
from numbers import Number

import numpy as np

from . import backend

_state = threading.local()  # grad mode is per thread, like PyTorch's


def is_grad_enabled():
    return getattr(_state, "grad_enabled", True)


@contextmanager
def _grad_mode(enabled):
    previous = is_grad_enabled()
    _state.grad_enabled = enabled
    try:
        yield
    finally:
        _state.grad_enabled = previous


class no_grad:
    """Context manager (and decorator): ops inside record no graph, as in ``torch.no_grad()``.

    One instance may be entered again while it is active, and from several threads: the mode to restore is
    kept on the entering thread's own stack, not on the instance.
    """

    def __enter__(self):
        if not hasattr(_state, "saved_modes"):
            _state.saved_modes = []
        _state.saved_modes.append(is_grad_enabled())
        _state.grad_enabled = False

    def __exit__(self, *exc):
        _state.grad_enabled = _state.saved_modes.pop()
        return False

    def __call__(self, fn):
        def wrapper(*args, **kwargs):
            with _grad_mode(False):
                return fn(*args, **kwargs)
        wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
        return wrapper


class Tensor:
    """An array with an optional gradient and the op that made it."""

    __array_ufunc__ = None  # NumPy defers `ndarray op Tensor` to the Tensor's reflected operator

    def __init__(self, data, requires_grad=False):
        if requires_grad and data.dtype.kind != "f":
            raise TypeError(f"only floating-point tensors can require gradients, not {data.dtype}; "
                            "convert the data with .astype(numpy.float32) first")
        self.data = data            # the array: numpy.ndarray or cupy.ndarray
        self.grad = None            # dL/d(self), same shape and dtype as data; filled by backward()
        self.requires_grad = requires_grad
        self._parents = ()          # the tensors this one was computed from
        self._backward = None       # grad_out -> tuple of grads, one per parent (None: no gradient)
        self._op = ""               # name of the op, for printing and graph pictures
        self._retain_grad = False
        self._released = False      # True once backward() has freed the op that made this tensor

    # ----------------------------------------------------------------------------------------------------
    # Plumbing
    @property
    def shape(self):
        return self.data.shape

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def ndim(self):
        return self.data.ndim

    @property
    def size(self):
        return self.data.size

    @property
    def device(self):
        return backend.device_of(self.data)

    @property
    def is_leaf(self):
        return not self._parents and not self._released

    def numel(self):
        return self.data.size

    def __len__(self):
        return len(self.data)

    def item(self):
        return self.data.item()

    def numpy(self):
        """The data as a NumPy array (copied off the GPU if it lives there)."""
        return backend.to_numpy(self.data)

    def detach(self):
        """The same data, cut from the graph."""
        return Tensor(self.data)

    def retain_grad(self):
        """Keep .grad on this non-leaf tensor after backward (leaves always keep theirs)."""
        self._retain_grad = True
        return self

    def astype(self, dtype):
        """A copy in another dtype; gradients flow back in the input's dtype."""
        source_dtype = self.dtype

        def backward(grad):
            return (grad.astype(source_dtype),)
        return _make(self.data.astype(dtype), (self,), backward, "astype")

    def __repr__(self):
        grad = ", requires_grad=True" if self.requires_grad else ""
        return f"tensor({self.data!r}{grad})"

    # ----------------------------------------------------------------------------------------------------
    # Backward: reverse topological order, each node once
    def backward(self, grad=None, retain_graph=False, into=None):
        """Add d(self)/d(leaf) * grad into the .grad of every leaf that requires a gradient.

        into: a dict that receives {id(leaf): gradient} instead of .grad being touched, so that several
        backward passes over the same leaves can be summed afterwards in an order of the caller's choosing.
        """
        if not self.requires_grad:
            raise RuntimeError("backward() called on a tensor that does not require grad: "
                               "no input of the computation had requires_grad=True")
        xp = backend.get_array_module(self.data)
        if grad is None:
            if self.data.size != 1:
                raise RuntimeError(f"backward() on a non-scalar tensor of shape {self.shape} needs an explicit "
                                   "gradient: call .backward(grad) with an array of that shape, or reduce first")
            grad = xp.ones_like(self.data)
        else:
            grad = grad.data if isinstance(grad, Tensor) else grad
            grad = xp.array(grad, dtype=self.dtype, copy=True)
            if grad.shape != self.shape:
                raise ValueError(f"backward(grad): grad has shape {grad.shape}, but the tensor has shape "
                                 f"{self.shape}; pass a gradient of the tensor's shape")

        order = _topological_order(self)
        if any(node._released for node in order):
            raise RuntimeError("backward() through a graph that an earlier backward() already freed: pass "
                               "retain_graph=True to the first backward() to run it twice")
        pending = {id(self): grad}      # node id -> dL/d(node), summed over its uses so far
        # Backward functions never write into the gradient they are given, so one array may flow to several
        # nodes (a + b hands grad to both). Only a kept .grad must be its own array, or adding into one
        # leaf's .grad later would change another's: arrays seen going two ways are copied there, not before.
        shared = set()
        for node in reversed(order):
            node_grad = pending.pop(id(node), None)
            if node_grad is None:
                continue
            if (node.is_leaf or node._retain_grad) and id(node_grad) in shared:
                node_grad = node_grad.copy()
            if node.is_leaf and into is not None:
                into[id(node)] = node_grad
                continue
            if node.is_leaf or node._retain_grad:
                accumulate_grad(node, node_grad)
                shared.add(id(node_grad))       # now node.grad: whatever it flows on to must not alias it
            if node.is_leaf:
                continue
            parent_grads = node._backward(node_grad)
            seen = set()
            for parent, parent_grad in zip(node._parents, parent_grads):
                if parent_grad is None or not parent.requires_grad:
                    continue
                if id(parent_grad) in seen:  # the same array handed to two parents (e.g. a + b)
                    shared.add(id(parent_grad))
                seen.add(id(parent_grad))
                parent_grad = _sum_to_shape(parent_grad, parent.shape)
                key = id(parent)
                pending[key] = parent_grad if key not in pending else add_arrays(pending[key], parent_grad)
            if not retain_graph:  # release the graph: intermediates can now be freed
                node._parents, node._backward, node._released = (), None, True

    # ----------------------------------------------------------------------------------------------------
    # Elementwise arithmetic. Gradients are of the broadcast shape; the engine sums them back.
    def __add__(self, other):
        other = _lift(other, self, "add")

        # d(a + b)/da = 1, d(a + b)/db = 1
        def backward(grad):
            return grad, grad
        return _make(add_arrays(self.data, other.data), (self, other), backward, "add")

    def __sub__(self, other):
        other = _lift(other, self, "sub")

        # d(a - b)/da = 1, d(a - b)/db = -1
        def backward(grad):
            return grad, -grad
        return _make(self.data - other.data, (self, other), backward, "sub")

    def __mul__(self, other):
        other = _lift(other, self, "mul")
        a, b = self.data, other.data

        # d(a * b)/da = b, d(a * b)/db = a   (only the gradients some input needs are computed)
        def backward(grad):
            return (grad * b if self.requires_grad else None), (grad * a if other.requires_grad else None)
        return _make(a * b, (self, other), backward, "mul")

    def __truediv__(self, other):
        other = _lift(other, self, "div")
        a, b = self.data, other.data

        # d(a / b)/da = 1/b, d(a / b)/db = -a/b^2
        def backward(grad):
            grad_a = grad / b
            return grad_a, (-grad_a * (a / b) if other.requires_grad else None)
        return _make(a / b, (self, other), backward, "div")

    def __pow__(self, exponent):
        if isinstance(exponent, Tensor):
            return _pow_tensor(self, exponent)
        a = self.data
        exponent = _scalar_like(exponent, a)
        out = a ** exponent

        # d(a^n)/da = n a^(n-1)
        def backward(grad):
            return (grad * exponent * a ** (exponent - 1),)
        return _make(out, (self,), backward, "pow")

    def __neg__(self):
        def backward(grad):
            return (-grad,)
        return _make(-self.data, (self,), backward, "neg")

    def __radd__(self, other):
        return _lift(other, self) + self

    def __rsub__(self, other):
        return _lift(other, self) - self

    def __rmul__(self, other):
        return _lift(other, self) * self

    def __rtruediv__(self, other):
        return _lift(other, self) / self

    def __rpow__(self, other):
        return _lift(other, self) ** self

    def __matmul__(self, other):
        return matmul(self, _lift(other, self))

    def __rmatmul__(self, other):
        return matmul(_lift(other, self), self)

    # ----------------------------------------------------------------------------------------------------
    # Elementwise functions
    def exp(self):
        out = backend.get_array_module(self.data).exp(self.data)

        # d(e^x)/dx = e^x
        def backward(grad):
            return (grad * out,)
        return _make(out, (self,), backward, "exp")

    def log(self):
        x = self.data

        # d(ln x)/dx = 1/x
        def backward(grad):
            return (grad / x,)
        return _make(backend.get_array_module(x).log(x), (self,), backward, "log")

    def tanh(self):
        out = backend.get_array_module(self.data).tanh(self.data)

        # d(tanh x)/dx = 1 - tanh(x)^2
        def backward(grad):
            return (grad * (1 - out * out),)
        return _make(out, (self,), backward, "tanh")

    def sqrt(self):
        out = backend.get_array_module(self.data).sqrt(self.data)

        # d(sqrt x)/dx = 1 / (2 sqrt x)
        def backward(grad):
            return (grad / (2 * out),)
        return _make(out, (self,), backward, "sqrt")

    # ----------------------------------------------------------------------------------------------------
    # Reductions
    def sum(self, axis=None, keepdims=False):
        shape = self.shape
        axes = _normalize_axes(axis, self.ndim)

        # d(sum x)/dx_i = 1: the gradient is copied (broadcast) back over the summed axes
        def backward(grad):
            xp = backend.get_array_module(grad)
            if not keepdims:
                grad = xp.expand_dims(grad, axes)
            return (xp.broadcast_to(grad, shape),)
        return _make(self.data.sum(axis=axes, keepdims=keepdims), (self,), backward, "sum")

    def mean(self, axis=None, keepdims=False):
        axes = _normalize_axes(axis, self.ndim)
        count = 1
        for a in axes:
            count *= self.shape[a]
        return self.sum(axis=axes, keepdims=keepdims) * (1.0 / count)

    def max(self, axis=None, keepdims=False):
        """The largest value along `axis` (like torch.amax): ties share the gradient equally."""
        x = self.data
        axes = _normalize_axes(axis, self.ndim)
        peak = x.max(axis=axes, keepdims=True)

        # d(max x)/dx_i = 1/k for the k elements equal to the max, 0 elsewhere
        def backward(grad):
            xp = backend.get_array_module(grad)
            if not keepdims:
                grad = xp.expand_dims(grad, axes)
            is_max = (x == peak)
            share = is_max / is_max.sum(axis=axes, keepdims=True)
            return (grad * share.astype(x.dtype),)
        out = peak if keepdims else peak.squeeze(axis=axes)
        return _make(out, (self,), backward, "max")

    # ----------------------------------------------------------------------------------------------------
    # Shape ops: the gradient takes the inverse reshuffle
    def reshape(self, *shape):
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        source_shape = self.shape

        def backward(grad):
            return (grad.reshape(source_shape),)
        return _make(self.data.reshape(shape), (self,), backward, "reshape")

    view = reshape

    def permute(self, *axes):
        axes = axes[0] if len(axes) == 1 and isinstance(axes[0], (tuple, list)) else axes
        if len(axes) != self.ndim or _normalize_axes(axes, self.ndim) != tuple(range(self.ndim)):
            raise ValueError(f"permute{tuple(axes)}: give each of the tensor's {self.ndim} axes exactly once")
        axes = tuple(a % self.ndim for a in axes)
        inverse = tuple(int(i) for i in np.argsort(axes))

        def backward(grad):
            return (grad.transpose(inverse),)
        return _make(self.data.transpose(axes), (self,), backward, "permute")

    def transpose(self, dim0, dim1):
        """Swap two axes, as torch.Tensor.transpose(dim0, dim1)."""
        def backward(grad):
            return (grad.swapaxes(dim0, dim1),)
        return _make(self.data.swapaxes(dim0, dim1), (self,), backward, "transpose")

    def __getitem__(self, index):
        index = _raw_index(index)
        shape, dtype = self.shape, self.dtype

        # the gradient flows back to the selected elements (summed where an index repeats)
        def backward(grad):
            xp = backend.get_array_module(grad)
            full = xp.zeros(shape, dtype=dtype)
            if _is_basic_index(index):
                full[index] = grad
            else:
                backend.scatter_add(full, index, grad)
            return (full,)
        return _make(self.data[index], (self,), backward, "getitem")


# --------------------------------------------------------------------------------------------------------
# Dispatch: one reference body per op, faster implementations registered beside it
#
# An op decorated with @dispatchable("name") first asks the registry whether a fast path (npgpt/fast/)
# handles its arguments: one registered for their device ('cpu' / 'gpu'), their float dtype, and whose rule
# `applies(*args, **kwargs)` accepts them. If none does, or fast paths are off, the reference body runs.
# The reference stays callable as `op.reference`, which is what the tests hold each fast path equal to.

SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

_fast_paths = {}    # op name -> [(impl, device, dtypes, applies)]
_fast = {"enabled": os.environ.get("NPGPT_FAST", "1") != "0"}


def fast_paths_enabled():
    return _fast["enabled"]


def set_fast_paths_enabled(enabled):
    """Turn every fast path on or off (off: each op runs its reference body). Returns the previous setting."""
    previous, _fast["enabled"] = _fast["enabled"], bool(enabled)
    return previous


def register_fast_path(op, impl, device, dtypes=SUPPORTED_DTYPES, applies=None):
    """Let `impl` run op `op` for arrays on `device` of one of `dtypes` (all float operands alike), when
    `applies(*args, **kwargs)` (if given) is true. Registered later means asked first."""
    _fast_paths.setdefault(op, []).insert(0, (impl, device, tuple(np.dtype(d) for d in dtypes), applies))


def fast_path_for(op, args, kwargs, found=None):
    """The registered implementation that would run op(*args, **kwargs), or None for the reference.
    found: the arguments' Tensors and arrays, if the caller has collected them already."""
    paths = _fast_paths.get(op)
    if not paths or not _fast["enabled"]:
        return None
    found = _array_arguments(args, kwargs) if found is None else found
    dtype = None
    for a in found:
        if a.dtype.kind == "f":
            if dtype is None:
                dtype = a.dtype
            elif a.dtype != dtype:  # mixed float dtypes: the reference promotes them as NumPy does
                return None
    if dtype is None:
        return None
    first = found[0]
    device = backend.device_of(first.data if isinstance(first, Tensor) else first)
    for impl, path_device, path_dtypes, applies in paths:
        if path_device == device and dtype in path_dtypes and (applies is None or applies(*args, **kwargs)):
            return impl
    return None


def dispatchable(op, float_dtypes=SUPPORTED_DTYPES):
    """Decorator for a reference op: run a registered fast path where one applies, else the body itself.

    float_dtypes: the float dtypes the op computes in; another (float16) is refused with a clear error
    rather than computed with too little precision for its formulas.
    """
    def decorate(reference):
        @functools.wraps(reference)
        def run(*args, **kwargs):
            found = _array_arguments(args, kwargs)
            if float_dtypes is not None:
                _check_float_dtypes(op, found, float_dtypes)
            impl = fast_path_for(op, args, kwargs, found)
            return (impl or reference)(*args, **kwargs)
        run.reference = reference
        return run
    return decorate


def _array_arguments(args, kwargs):
    """The Tensors and arrays among the arguments, in order, also inside lists and tuples (AdamW's step takes
    a list of (param, state, group) tuples)."""
    found = []
    _collect_arrays(args, found)
    _collect_arrays(kwargs.values(), found)
    return found


# an op's options, and AdamW's state and group dicts: skipped at once
_NEVER_ARRAYS = frozenset((int, float, bool, str, slice, dict, type(None)))


def _collect_arrays(values, found):
    for value in values:
        if type(value) in _NEVER_ARRAYS:
            continue
        if isinstance(value, (Tensor, np.ndarray)):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            _collect_arrays(value, found)
        elif backend.is_gpu_array(value):
            found.append(value)


def _check_float_dtypes(op, found, allowed):
    for a in found:
        dtype = a.dtype
        if dtype.kind == "f" and dtype not in allowed:
            raise TypeError(f"{op}: {dtype} is not supported (its formulas need float32 or float64 "
                            "precision); convert with .astype(numpy.float32)")


@dispatchable("add_arrays", float_dtypes=None)
def add_arrays(a, b):
    """a + b on raw arrays: the residual stream's sums, and gradients meeting where a tensor is used twice."""
    return a + b


# --------------------------------------------------------------------------------------------------------
# Ops that need a function of their own

@dispatchable("matmul")
def matmul(a, b):
    """a @ b with NumPy's rules (batch broadcasting, 1-D operands promoted)."""
    x, w = a.data, b.data
    if x.ndim == 0 or w.ndim == 0 or x.shape[-1] != w.shape[0 if w.ndim == 1 else -2]:
        raise ValueError(f"matmul: {a.shape} @ {b.shape} needs the last dimension of the left operand to "
                         "equal the second-to-last of the right one; transpose or reshape an operand")

    # C = A B  =>  dA = dC B^T,  dB = A^T dC  (batch dims summed back by the engine)
    def backward(grad):
        a2 = x[None, :] if x.ndim == 1 else x
        b2 = w[:, None] if w.ndim == 1 else w
        g2 = grad                      # restore the axes that 1-D operands dropped from the output
        if w.ndim == 1:
            g2 = g2[..., None]
        if x.ndim == 1:
            g2 = g2[..., None, :]
        grad_a = g2 @ b2.swapaxes(-1, -2)
        grad_b = a2.swapaxes(-1, -2) @ g2
        if x.ndim == 1:
            grad_a = grad_a[..., 0, :]
        if w.ndim == 1:
            grad_b = grad_b[..., 0]
        return grad_a, grad_b
    return _make(x @ w, (a, b), backward, "matmul")


def _pow_tensor(a, b):
    xp = backend.get_array_module(a.data)
    out = a.data ** b.data

    # d(a^b)/da = b a^(b-1),  d(a^b)/db = a^b ln a
    def backward(grad):
        return grad * b.data * a.data ** (b.data - 1), grad * out * xp.log(a.data)
    return _make(out, (a, b), backward, "pow")


def tensor(data, requires_grad=False, dtype=None):
    """A new leaf Tensor on the current device. Python floats become float32 (as in torch.tensor)."""
    if isinstance(data, Tensor):
        data = data.data
    xp = backend.current()
    if dtype is None and not hasattr(data, "dtype"):
        probe = np.asarray(data)
        dtype = np.float32 if probe.dtype.kind == "f" else probe.dtype
    array = xp.array(backend.to_numpy(data) if xp is np else data, dtype=dtype, copy=True)
    if requires_grad and array.dtype.kind != "f":
        raise TypeError(f"only floating-point tensors can require gradients, not {array.dtype}; "
                        "pass float data or dtype=numpy.float32")
    return Tensor(array, requires_grad=requires_grad)


# --------------------------------------------------------------------------------------------------------
# Engine helpers

def _make(data, parents, backward, op):
    """Wrap an op's result; record the graph only if grad mode is on and some parent needs a gradient.
    (No gradient flows through an integer or boolean result.)"""
    if _observer["fn"] is not None:
        backward = _observer["fn"](op, backward)
    needs_grad = data.dtype.kind == "f" and records_graph(parents)
    out = Tensor(data, requires_grad=needs_grad)
    if needs_grad:
        out._parents, out._backward, out._op = parents, backward, op
    return out


def records_graph(parents):
    """Whether an op on these parents is recorded for backward: grad mode is on and some parent needs a
    gradient. (An op may skip saving what only its backward would use when it is not.)"""
    return is_grad_enabled() and any(p.requires_grad for p in parents)


_observer = {"fn": None}


def set_op_observer(observer):
    """Profiling: observer(op_name, backward) is called as each op's result is made, and returns the backward
    closure to keep (the same, or a timed wrapper). None turns it off. Returns the previous observer."""
    previous, _observer["fn"] = _observer["fn"], observer
    return previous


def _topological_order(root):
    """Nodes that lead to `root`, each once, every node after all of its parents. Iterative DFS."""
    order, visited = [], set()
    stack = [(root, False)]
    while stack:
        node, parents_done = stack.pop()
        if parents_done:
            order.append(node)
            continue
        if id(node) in visited:
            continue
        visited.add(id(node))
        stack.append((node, True))
        for parent in node._parents:
            if parent.requires_grad and id(parent) not in visited:
                stack.append((parent, False))
    return order


def _sum_to_shape(grad, shape):
    """Undo broadcasting: sum `grad` over the axes along which an input of `shape` was stretched."""
    if grad.shape == shape:
        return grad
    extra = grad.ndim - len(shape)
    stretched = tuple(range(extra)) + tuple(
        extra + i for i, n in enumerate(shape) if n == 1 and grad.shape[extra + i] != 1)
    return grad.sum(axis=stretched, keepdims=True).reshape(shape)


def accumulate_grad(node, grad):
    """node.grad += grad, as PyTorch accumulates into leaves across backward calls."""
    if node.grad is None:
        owned = (grad.base is None and getattr(grad.flags, "writeable", True)
                 and grad.dtype == node.dtype)
        node.grad = grad if owned else grad.astype(node.dtype, copy=True)
    else:
        node.grad += grad


def _lift(value, like, op=None):
    """A Tensor from an operand: Python and NumPy scalars take `like`'s dtype, so float32 stays float32.
    For a binary op, the two shapes must broadcast (checked here, so the error names the op and shapes)."""
    if not isinstance(value, Tensor):
        if isinstance(value, (Number, np.generic)):
            return Tensor(_scalar_like(value, like.data))
        value = Tensor(backend.get_array_module(like.data).asarray(value))
    if op is not None and value.shape != like.shape:
        try:
            np.broadcast_shapes(like.shape, value.shape)
        except ValueError:
            raise ValueError(f"{op}: shapes {like.shape} and {value.shape} do not broadcast (each dimension "
                             "must be equal, or 1 in one of them); reshape an operand") from None
    return value


def _scalar_like(value, array):
    """`value` as a NumPy scalar of `array`'s float dtype, so that a Python float never upcasts float32."""
    if array.dtype.kind == "f":
        return array.dtype.type(value)
    return np.asarray(value)[()]


def _normalize_axes(axis, ndim):
    """Axes as a sorted tuple of non-negative ints; -1 is the last. An axis outside [-ndim, ndim) is an error,
    not wrapped around."""
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, (int, np.integer)):
        axis = (axis,)
    for a in axis:
        if not -ndim <= a < ndim:
            raise ValueError(f"axis {a} is out of range for a tensor of {ndim} dimensions: use an axis in "
                             f"[{-ndim}, {ndim})")
    return tuple(sorted(int(a) % ndim for a in axis))


def _raw_index(index):
    """Replace Tensors inside an index by their arrays."""
    if isinstance(index, Tensor):
        return index.data
    if isinstance(index, tuple):
        return tuple(i.data if isinstance(i, Tensor) else i for i in index)
    return index


def _is_basic_index(index):
    """True for ints, slices, None and Ellipsis only: each element is selected at most once."""
    parts = index if isinstance(index, tuple) else (index,)
    return all(isinstance(p, (int, slice, type(None), type(Ellipsis))) and not isinstance(p, bool)
               for p in parts)
