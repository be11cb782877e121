"""Modules: objects that hold Parameters and call the ops of ``npgpt.functional``.

``Module`` mirrors ``torch.nn.Module``: assigning a Parameter or a Module to an attribute registers it, so
``named_parameters()`` yields PyTorch-style dotted names (``blocks.0.attention.W_q.weight``) and
``state_dict()`` / ``load_state_dict()`` use the same keys as the PyTorch model.

Shapes: Linear maps (..., in) to (..., out); LayerNorm keeps (..., C); Embedding maps ids (B, T) to
(B, T, C).

Next to read: ``npgpt/optim.py`` (AdamW), then ``npgpt/model.py`` (the GPT built from these modules).
"""

import math

import numpy as np

from . import backend
from . import functional as F
from .engine import SUPPORTED_DTYPES, Tensor

DEFAULT_DTYPE = np.float32


class Parameter(Tensor):
    """A Tensor that a Module owns and an optimizer updates: it always requires a gradient."""

    def __init__(self, data):
        super().__init__(data, requires_grad=True)

    def __repr__(self):
        return f"Parameter(shape={self.shape}, dtype={self.dtype})"


class Module:
    """Base class: registers Parameters and sub-Modules assigned as attributes."""

    def __init__(self):
        object.__setattr__(self, "_parameters", {})
        object.__setattr__(self, "_modules", {})
        object.__setattr__(self, "training", True)

    def __setattr__(self, name, value):
        if "_parameters" not in self.__dict__:
            raise AttributeError(f"{type(self).__name__}.__init__ must call super().__init__() "
                                 "before assigning attributes")
        self._parameters.pop(name, None)
        self._modules.pop(name, None)
        if isinstance(value, Parameter):
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        object.__setattr__(self, name, value)

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} must define forward()")

    # ---- traversal --------------------------------------------------------------------------------------
    def named_modules(self, prefix=""):
        """(name, module) for this module and every sub-module, depth first, each once."""
        seen, stack = set(), [(prefix, self)]
        while stack:
            name, module = stack.pop()
            if id(module) in seen:
                continue
            seen.add(id(module))
            yield name, module
            children = [(f"{name}.{n}" if name else n, m) for n, m in module._modules.items()]
            stack.extend(reversed(children))

    def modules(self):
        return (m for _, m in self.named_modules())

    def _all_named_parameters(self):
        """Every (dotted name, Parameter), shared ones under each of their names."""
        for module_name, module in self.named_modules():
            for name, param in module._parameters.items():
                yield (f"{module_name}.{name}" if module_name else name), param

    def named_parameters(self):
        """(dotted name, Parameter), a shared (tied) Parameter only under its first name."""
        seen = set()
        for name, param in self._all_named_parameters():
            if id(param) not in seen:
                seen.add(id(param))
                yield name, param

    def parameters(self):
        """Every Parameter once, even when tied to two attributes."""
        return [p for _, p in self.named_parameters()]

    def num_parameters(self):
        return sum(p.size for p in self.parameters())

    # ---- modes and gradients ------------------------------------------------------------------------------
    def train(self, mode=True):
        for module in self.modules():
            object.__setattr__(module, "training", mode)
        return self

    def eval(self):
        return self.train(False)

    def zero_grad(self):
        """Drop every gradient (set to None, as PyTorch does by default)."""
        for p in self.parameters():
            p.grad = None

    # ---- state --------------------------------------------------------------------------------------------
    def state_dict(self):
        """{dotted name: array}, tied Parameters under each name (as PyTorch). The arrays are shared."""
        return {name: p.data for name, p in self._all_named_parameters()}

    def load_state_dict(self, state_dict, strict=True):
        """Copy arrays into the Parameters, checking names and shapes; keeps each Parameter's dtype."""
        own = dict(self._all_named_parameters())
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        if strict and (missing or unexpected):
            raise KeyError(f"load_state_dict: missing keys {missing}, unexpected keys {unexpected}; "
                           "the state dict comes from a different model")
        for name, value in state_dict.items():
            if name not in own:
                continue
            param = own[name]
            if tuple(value.shape) != param.shape:
                raise ValueError(f"load_state_dict: {name} has shape {tuple(value.shape)} in the state dict "
                                 f"but {param.shape} in the model; the configurations differ")
            xp = backend.get_array_module(param.data)
            param.data[...] = xp.asarray(backend.to_device(value, param.device), dtype=param.dtype)
        return self

    def to(self, target):
        """Convert every Parameter in place: a dtype (np.float32, np.float64) or a device ('cpu' / 'gpu')."""
        if target not in ("cpu", "gpu") and np.dtype(target) not in SUPPORTED_DTYPES:
            raise TypeError(f"Module.to: parameters can be float32 or float64, not {np.dtype(target)}")
        for p in self.parameters():
            if target in ("cpu", "gpu"):
                p.data = backend.to_device(p.data, target)
            else:
                p.data = p.data.astype(target)
            p.grad = None
        return self

    def __repr__(self):
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        for name, module in self._modules.items():
            child = repr(module).replace("\n", "\n  ")
            lines.append(f"  ({name}): {child}")
        return lines[0] + ")" if len(lines) == 1 else "\n".join(lines) + "\n)"

    def extra_repr(self):
        return ""


class Linear(Module):
    """y = x W^T + b with W (out_features, in_features); PyTorch's default init U(-1/sqrt(in), 1/sqrt(in))."""

    def __init__(self, in_features, out_features, bias=True, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        bound = 1.0 / math.sqrt(in_features)
        self.weight = Parameter(_uniform((out_features, in_features), bound, dtype))
        self.bias = Parameter(_uniform((out_features,), bound, dtype)) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class LayerNorm(Module):
    """Normalize over the last dimension(s); weight starts at 1, bias at 0."""

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True, dtype=None):
        super().__init__()
        if isinstance(normalized_shape, int):
            normalized_shape = (normalized_shape,)
        self.normalized_shape, self.eps = tuple(normalized_shape), eps
        xp = backend.current()
        dtype = dtype or DEFAULT_DTYPE
        self.weight = Parameter(xp.ones(self.normalized_shape, dtype=dtype)) if elementwise_affine else None
        self.bias = Parameter(xp.zeros(self.normalized_shape, dtype=dtype)) if elementwise_affine and bias else None

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def extra_repr(self):
        return f"{self.normalized_shape}, eps={self.eps}"


class Embedding(Module):
    """A (num_embeddings, embedding_dim) table of rows looked up by integer id; init N(0, 1) as PyTorch."""

    def __init__(self, num_embeddings, embedding_dim, dtype=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = Parameter(_normal((num_embeddings, embedding_dim), 1.0, dtype))

    def forward(self, ids):
        return F.embedding(ids, self.weight)

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}"


class Dropout(Module):
    """Inverted dropout in training mode, the identity in eval mode."""

    def __init__(self, p=0.5):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"Dropout: p must lie in [0, 1], got {p}")
        self.p = p

    def forward(self, x):
        # the identity in eval mode or at p = 0: nothing to draw, nothing to record (a bad p: F.dropout's error)
        if (not self.training or self.p == 0.0) and 0.0 <= self.p <= 1.0:
            return x if isinstance(x, Tensor) else Tensor(x)
        return F.dropout(x, self.p, self.training)

    def extra_repr(self):
        return f"p={self.p}"


class ModuleList(Module):
    """A list of Modules registered under the names '0', '1', ..."""

    def __init__(self, modules=()):
        super().__init__()
        for module in modules:
            self.append(module)

    def append(self, module):
        setattr(self, str(len(self._modules)), module)
        return self

    def __getitem__(self, index):
        return list(self._modules.values())[index]

    def __iter__(self):
        return iter(self._modules.values())

    def __len__(self):
        return len(self._modules)


# ---- initialisation helpers (the global generator; seed it with npgpt.manual_seed) ---------------------------

def _uniform(shape, bound, dtype=None):
    rng = backend.global_rng()
    return (rng.random(shape) * (2 * bound) - bound).astype(dtype or DEFAULT_DTYPE)


def _normal(shape, std, dtype=None):
    rng = backend.global_rng()
    return (rng.standard_normal(shape) * std).astype(dtype or DEFAULT_DTYPE)


def init_normal_(param, mean=0.0, std=1.0):
    """Fill a Parameter in place from N(mean, std^2), as torch.nn.init.normal_."""
    param.data[...] = _normal(param.shape, std, param.dtype) + param.dtype.type(mean)
    return param


def init_zeros_(param):
    param.data[...] = 0
    return param
