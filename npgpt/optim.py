"""AdamW (as torch.optim.AdamW) and the learning-rate schedule used for training.

Shapes: each moment has its parameter's shape; the update is elementwise.

Next to read: ``npgpt/model.py``, the GPT these update.
"""

import math

from . import backend
from .engine import Tensor, dispatchable


class AdamW:
    """Adam with decoupled weight decay (Loshchilov & Hutter), step for step as torch.optim.AdamW.

    For each parameter p with gradient g, at step t (counted from 1):
        p <- p * (1 - lr * weight_decay)                  decoupled decay: not mixed into the moments
        m <- beta1 * m + (1 - beta1) * g                  first moment (mean of g)
        v <- beta2 * v + (1 - beta2) * g^2                second moment (mean of g^2)
        p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)   bias-corrected step

    `params` is an iterable of Parameters, or of dicts {'params': [...], 'weight_decay': ...} (param groups
    with their own settings, as in PyTorch).
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        params = list(params)
        if not params:
            raise ValueError("AdamW: got an empty parameter list")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        groups = params if isinstance(params[0], dict) else [{"params": params}]
        self.param_groups = []
        for group in groups:
            full = dict(defaults)
            full.update(group)
            full["params"] = list(full["params"])
            _check_settings(full)
            self.param_groups.append(full)
        self.state = {}  # id(param) -> {"step": int, "exp_avg": array, "exp_avg_sq": array}

    def _params(self):
        for group in self.param_groups:
            for p in group["params"]:
                yield group, p

    def zero_grad(self):
        for _, p in self._params():
            p.grad = None

    def step(self):
        """Update every parameter that has a gradient."""
        updates = []    # (param, its state, its group) for every parameter with a gradient, its step counted
        for group, p in self._params():
            if p.grad is None:
                continue
            state = self.state.get(id(p))
            if state is None:
                xp = backend.get_array_module(p.data)
                state = {"step": 0, "exp_avg": xp.zeros_like(p.data), "exp_avg_sq": xp.zeros_like(p.data)}
                self.state[id(p)] = state
            state["step"] += 1
            updates.append((p, state, group))
        if updates:
            adamw_step(updates)

    # ---- checkpointing: arrays by parameter position, so the state outlives the objects ----------------------
    def state_dict(self):
        """{'step': [...], 'exp_avg': [...], 'exp_avg_sq': [...]} in parameter order (None if never stepped),
        and 'lr': each parameter group's current learning rate."""
        out = {"step": [], "exp_avg": [], "exp_avg_sq": [], "lr": [g["lr"] for g in self.param_groups]}
        for _, p in self._params():
            state = self.state.get(id(p))
            out["step"].append(state["step"] if state else 0)
            out["exp_avg"].append(state["exp_avg"] if state else None)
            out["exp_avg_sq"].append(state["exp_avg_sq"] if state else None)
        return out

    def load_state_dict(self, saved):
        params = [p for _, p in self._params()]
        if len(saved["step"]) != len(params):
            raise ValueError(f"AdamW.load_state_dict: the saved state has {len(saved['step'])} parameters, "
                             f"this optimizer {len(params)}; it comes from a different model")
        for p, step, m, v in zip(params, saved["step"], saved["exp_avg"], saved["exp_avg_sq"]):
            if step == 0 or m is None:
                self.state.pop(id(p), None)
                continue
            if tuple(m.shape) != p.shape:
                raise ValueError(f"AdamW.load_state_dict: saved moments of shape {tuple(m.shape)} for a "
                                 f"parameter of shape {p.shape}; it comes from a different model")
            xp = backend.get_array_module(p.data)
            self.state[id(p)] = {"step": int(step),
                                 "exp_avg": xp.asarray(backend.to_device(m, p.device), dtype=p.dtype),
                                 "exp_avg_sq": xp.asarray(backend.to_device(v, p.device), dtype=p.dtype)}
        for group, lr in zip(self.param_groups, saved.get("lr", [])):
            group["lr"] = float(lr)


def _check_settings(group):
    lr, betas, eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    finite = all(math.isfinite(x) for x in (lr, eps, decay))
    if not (finite and lr >= 0 and eps >= 0 and decay >= 0 and len(betas) == 2
            and all(0.0 <= b < 1.0 for b in betas)):
        raise ValueError(f"AdamW: invalid settings lr={lr}, betas={betas}, eps={eps}, weight_decay={decay}: "
                         "lr, eps and weight_decay must be finite and >= 0, each beta in [0, 1)")


def adamw_settings(state, group):
    """The numbers of one parameter's update: (lr, beta1, beta2, eps, weight_decay, step t)."""
    return (group["lr"], *group["betas"], group["eps"], group["weight_decay"], state["step"])


@dispatchable("adamw_step")
def adamw_step(updates):
    """One AdamW step for every (param, state, group) in `updates`, each parameter in turn."""
    for p, state, group in updates:
        adamw_update(p.data, p.grad, state["exp_avg"], state["exp_avg_sq"], adamw_settings(state, group))


def adamw_update(param, grad, m, v, settings):
    """One AdamW step, in place, on arrays (a whole parameter or a piece of one). See AdamW for the maths."""
    lr, beta1, beta2, eps, decay, t = settings
    xp = backend.get_array_module(param)
    scratch = xp.empty_like(param)
    if decay != 0:
        param *= 1 - lr * decay                             # decoupled weight decay
    m *= beta1                                              # m = beta1 m + (1 - beta1) g
    xp.multiply(grad, 1 - beta1, out=scratch)
    m += scratch
    v *= beta2                                              # v = beta2 v + (1 - beta2) g^2
    xp.multiply(grad, grad, out=scratch)
    scratch *= 1 - beta2
    v += scratch
    xp.sqrt(v, out=scratch)                                 # denominator: sqrt(v / (1 - beta2^t)) + eps
    scratch *= 1 / math.sqrt(1 - beta2 ** t)
    scratch += eps
    xp.divide(m, scratch, out=scratch)                      # step: lr / (1 - beta1^t) * m / denominator
    scratch *= lr / (1 - beta1 ** t)
    param -= scratch


def cosine_lr(step, max_lr, min_lr, warmup_iters, max_iters):
    """Linear warmup to max_lr over the first warmup_iters steps (step s, counted from 0, gets
    max_lr (s + 1) / warmup_iters), then cosine decay to min_lr at max_iters."""
    if step < warmup_iters:
        return max_lr * (step + 1) / warmup_iters
    if step >= max_iters:
        return min_lr
    progress = (step - warmup_iters) / max(1, max_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


@dispatchable("clip_grad_norm")
def clip_grad_norm_(params, max_norm):
    """Scale all gradients so their global L2 norm is at most max_norm; return the norm before clipping.

        norm = sqrt(sum of g^2 over every element of every gradient)
        g <- g * min(1, max_norm / (norm + 1e-6))          for every gradient, as torch's clip_grad_norm_

    max_norm <= 0 clips nothing (the training program's grad_clip 0): the norm is only measured, where
    torch's would scale every gradient to zero.

    The norm is returned in the gradients' dtype on their device (a NumPy scalar on the CPU; 0.0 where no
    parameter has a gradient). params may be one Parameter, as in torch.
    """
    params = [params] if isinstance(params, Tensor) else params
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    xp = backend.get_array_module(grads[0])
    squares = [sum_of_squares(g) for g in grads]
    total = xp.sqrt(sum(squares[1:], squares[0]))
    if max_norm > 0:
        factor = xp.minimum(1.0, max_norm / (total + 1e-6)).astype(grads[0].dtype)
        for g in grads:
            g *= factor
    return total


@dispatchable("sum_of_squares")
def sum_of_squares(array):
    """sum(x^2) over every element, as a 0-d array on the array's device."""
    flat = array.reshape(-1)
    return backend.get_array_module(array).dot(flat, flat)
