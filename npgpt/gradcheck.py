"""gradcheck: compare backprop's gradients with central finite differences, in float64.

For a function f of tensors, the analytic gradient of L = sum(f(x) * r) (r a fixed random cotangent, so a
non-scalar output is checked in every direction at once) is compared element by element with

    dL/dx_i  ~=  (L(x + eps e_i) - L(x - eps e_i)) / (2 eps)       error O(eps^2)

Every element is probed, or a seeded random sample of `max_probes` of them for large inputs.

Shapes: any; every input that requires a gradient is probed element by element.

The table of every op's check is ``python -m npgpt.proof`` (``npgpt/program/proof.py``).

Next to read: ``npgpt/nn.py``, the modules that hold parameters.
"""

import numpy as np

from . import backend
from .engine import Tensor, no_grad


class GradcheckError(AssertionError):
    """Raised when an analytic gradient disagrees with the finite-difference one."""


def _scalar_objective(fn, inputs, cotangent_rng):
    out = fn(*inputs)
    if not isinstance(out, Tensor):
        raise TypeError(f"gradcheck: the function must return a Tensor, got {type(out).__name__}")
    xp = backend.get_array_module(out.data)
    if out.data.size == 1:
        return out.sum(), out
    cotangent = xp.asarray(cotangent_rng(out.shape))
    return (out * Tensor(cotangent)).sum(), out


def gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5, max_probes=300, seed=0):
    """Check fn's backward against finite differences for every input that requires a gradient.

    inputs: a sequence of Tensors (float64 where they require a gradient); other arguments pass through.
    Passes when |analytic - numeric| <= atol + rtol * |numeric| for every probed element; otherwise raises
    GradcheckError naming the input, the worst element's index, and both values. Returns a list of
    (input position, max absolute error, max relative error) on success.
    """
    inputs = list(inputs)
    checked = [i for i, x in enumerate(inputs) if isinstance(x, Tensor) and x.requires_grad]
    if not checked:
        raise ValueError("gradcheck: no input requires a gradient; pass tensors with requires_grad=True")
    for i in checked:
        if inputs[i].dtype != np.float64:
            raise TypeError(f"gradcheck: input {i} is {inputs[i].dtype}; finite differences need float64 "
                            "(create it with dtype=numpy.float64)")

    def cotangent(shape):
        return np.random.default_rng(seed + 1).standard_normal(shape)

    for i in checked:
        inputs[i].grad = None
    loss, _ = _scalar_objective(fn, inputs, cotangent)
    loss.backward()
    results = []
    for i in checked:
        x = inputs[i]
        analytic = backend.to_numpy(x.grad) if x.grad is not None else np.zeros(x.shape)
        count = x.data.size
        if count > max_probes:
            probes = np.random.default_rng(seed).choice(count, size=max_probes, replace=False)
        else:
            probes = np.arange(count)
        worst = (0.0, 0.0, None, 0.0, 0.0)   # (excess over tolerance, abs error, index, analytic, numeric)
        max_abs = max_rel = 0.0
        for j in probes:
            # the element itself, by its index: a reshaped view of a transposed array would be a copy
            element = tuple(int(k) for k in np.unravel_index(j, x.shape))
            original = float(x.data[element])
            with no_grad():
                x.data[element] = original + eps
                plus = float(_scalar_objective(fn, inputs, cotangent)[0].item())
                x.data[element] = original - eps
                minus = float(_scalar_objective(fn, inputs, cotangent)[0].item())
                x.data[element] = original
            numeric = (plus - minus) / (2 * eps)
            exact = float(analytic.reshape(-1)[j])
            error = abs(exact - numeric)
            max_abs = max(max_abs, error)
            max_rel = max(max_rel, error / max(abs(numeric), 1e-12))
            excess = error - (atol + rtol * abs(numeric))
            if not np.isfinite(error):   # a NaN or infinite gradient never passes
                excess = np.inf
            if excess > worst[0]:
                worst = (excess, error, j, exact, numeric)
        if worst[2] is not None:
            _, error, j, exact, numeric = worst
            index = tuple(int(k) for k in np.unravel_index(j, x.shape))
            raise GradcheckError(f"gradcheck: input {i} (shape {x.shape}) at index {index}: analytic "
                                 f"{exact:.10g} vs numeric {numeric:.10g} (abs error {error:.3g}, "
                                 f"atol {atol}, rtol {rtol})")
        results.append((i, max_abs, max_rel))
    return results


if __name__ == "__main__":
    raise SystemExit("npgpt.gradcheck is the function; the table of every op's check is: python -m npgpt.proof")
