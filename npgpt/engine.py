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

Shape legend used across npgpt: B batch, T time, C channels, H heads, D head size, V vocabulary.

Next to read: ``npgpt/functional.py``, the transformer's layer ops and their hand-written gradients.
"""

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
    """Context manager (and decorator): ops inside record no graph, as in ``torch.no_grad()``."""

    def __enter__(self):
        self._previous = is_grad_enabled()
        _state.grad_enabled = False

    def __exit__(self, *exc):
        _state.grad_enabled = self._previous
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
        self.data = data            # the array: numpy.ndarray or cupy.ndarray
        self.grad = None            # dL/d(self), same shape and dtype as data; filled by backward()
        self.requires_grad = requires_grad
        self._parents = ()          # the tensors this one was computed from
        self._backward = None       # grad_out -> tuple of grads, one per parent (None: no gradient)
        self._op = ""               # name of the op, for printing and graph pictures
        self._retain_grad = False

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
        return not self._parents

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

        into: a dict that receives {id(leaf): gradient} instead of .grad being touched (data-parallel
        workers use it, so two threads never add into the same .grad).
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

        pending = {id(self): grad}      # node id -> dL/d(node), summed over its uses so far
        # Backward functions never write into the gradient they are given, so one array may flow to several
        # nodes (a + b hands grad to both). Only a kept .grad must be its own array, or adding into one
        # leaf's .grad later would change another's: arrays seen going two ways are copied there, not before.
        shared = set()
        for node in reversed(_topological_order(self)):
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
                pending[key] = parent_grad if key not in pending else backend.add(pending[key], parent_grad)
            if not retain_graph:  # release the graph: intermediates can now be freed
                node._parents, node._backward = (), None

    # ----------------------------------------------------------------------------------------------------
    # Elementwise arithmetic. Gradients are of the broadcast shape; the engine sums them back.
    def __add__(self, other):
        other = _lift(other, self)

        # d(a + b)/da = 1, d(a + b)/db = 1
        def backward(grad):
            return grad, grad
        return _make(backend.add(self.data, other.data), (self, other), backward, "add")

    def __sub__(self, other):
        other = _lift(other, self)

        # d(a - b)/da = 1, d(a - b)/db = -1
        def backward(grad):
            return grad, -grad
        return _make(self.data - other.data, (self, other), backward, "sub")

    def __mul__(self, other):
        other = _lift(other, self)
        a, b = self.data, other.data

        # d(a * b)/da = b, d(a * b)/db = a   (only the gradients some input needs are computed)
        def backward(grad):
            return (grad * b if self.requires_grad else None), (grad * a if other.requires_grad else None)
        return _make(a * b, (self, other), backward, "mul")

    def __truediv__(self, other):
        other = _lift(other, self)
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
# Ops that need a function of their own

def matmul(a, b):
    """a @ b with NumPy's rules (batch broadcasting, 1-D operands promoted)."""
    x, w = a.data, b.data

    # C = A B  =>  dA = dC B^T,  dB = A^T dC  (batch dims summed back by the engine)
    def backward(grad):
        a2 = x[None, :] if x.ndim == 1 else x
        b2 = w[:, None] if w.ndim == 1 else w
        g2 = grad                      # restore the axes that 1-D operands dropped from the output
        if w.ndim == 1:
            g2 = g2[..., None]
        if x.ndim == 1:
            g2 = g2[..., None, :]
        grad_a = backend.matmul(g2, b2.swapaxes(-1, -2))
        grad_b = backend.matmul(a2.swapaxes(-1, -2), g2)
        if x.ndim == 1:
            grad_a = grad_a[..., 0, :]
        if w.ndim == 1:
            grad_b = grad_b[..., 0]
        return grad_a, grad_b
    return _make(backend.matmul(x, w), (a, b), backward, "matmul")


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
    """Wrap an op's result; record the graph only if grad mode is on and some parent needs a gradient."""
    needs_grad = is_grad_enabled() and any(p.requires_grad for p in parents)
    out = Tensor(data, requires_grad=needs_grad)
    if needs_grad:
        out._parents, out._backward, out._op = parents, backward, op
    return out


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
    if extra > 0 and grad.shape[extra:] == shape:       # only leading axes were added: a bias, a LN weight
        return backend.sum_leading(grad, extra)
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


def _lift(value, like):
    """A Tensor from an operand: Python and NumPy scalars take `like`'s dtype, so float32 stays float32."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (Number, np.generic)):
        return Tensor(_scalar_like(value, like.data))
    xp = backend.get_array_module(like.data)
    return Tensor(xp.asarray(value))


def _scalar_like(value, array):
    """`value` as a NumPy scalar of `array`'s float dtype: a float never upcasts float32, and on the GPU a
    scalar travels as a kernel argument rather than as a copy to device memory."""
    if array.dtype.kind == "f":
        return array.dtype.type(value)
    return np.asarray(value)[()]


def _normalize_axes(axis, ndim):
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, int):
        axis = (axis,)
    return tuple(sorted(a % ndim for a in axis))


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
