"""AdamW (as torch.optim.AdamW) and the learning-rate schedule used for training.

Shapes: each moment has its parameter's shape; the update is elementwise.

Next to read: ``npgpt/model.py``, the GPT these update.
"""

import math

import numpy as np

from . import backend
from .fast.cuda import kernels


class AdamW:
    """Adam with decoupled weight decay (Loshchilov & Hutter), step for step as torch.optim.AdamW.

    For each parameter p with gradient g, at step t (counted from 1):
        p <- p * (1 - lr * weight_decay)                  decoupled decay: not mixed into the moments
        m <- beta1 * m + (1 - beta1) * g                  first moment (mean of g)
        v <- beta2 * v + (1 - beta2) * g^2                second moment (mean of g^2)
        p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)   bias-corrected step

    `params` is an iterable of Parameters, or of dicts {'params': [...], 'weight_decay': ...} (param groups
    with their own settings, as in PyTorch). `workers` > 1 shares the update among CPU threads.
    """

    piece_size = 262144

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, workers=1):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"AdamW: invalid settings lr={lr}, betas={betas}, eps={eps}, "
                             f"weight_decay={weight_decay}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        params = list(params)
        if not params:
            raise ValueError("AdamW: got an empty parameter list")
        groups = params if isinstance(params[0], dict) else [{"params": params}]
        self.param_groups = []
        for group in groups:
            full = dict(defaults)
            full.update(group)
            full["params"] = list(full["params"])
            self.param_groups.append(full)
        self.state = {}  # id(param) -> {"step": int, "exp_avg": array, "exp_avg_sq": array}
        self.workers = workers
        self._fused_updates, self._schedule = [], None    # the GPU's last step (see _step_fused)

    def _params(self):
        for group in self.param_groups:
            for p in group["params"]:
                yield group, p

    def zero_grad(self):
        for _, p in self._params():
            p.grad = None

    def step(self):
        """Update every parameter that has a gradient."""
        updates = []    # (group, param, state) of every parameter with a gradient, its step counted
        for group, p in self._params():
            if p.grad is None:
                continue
            xp = backend.get_array_module(p.data)
            state = self.state.get(id(p))
            if state is None:
                state = {"step": 0, "exp_avg": xp.zeros_like(p.data), "exp_avg_sq": xp.zeros_like(p.data)}
                self.state[id(p)] = state
            state["step"] += 1
            updates.append((group, p, state))
        if updates and kernels.available(updates[0][1].data):
            self._step_fused(updates)
            return
        pieces = []   # (param, grad, m, v, settings): whole small parameters, pieces of big ones
        for group, p, state in updates:
            settings = (group["lr"], *group["betas"], group["eps"], group["weight_decay"], state["step"])
            arrays = (p.data, p.grad, state["exp_avg"], state["exp_avg_sq"])
            if not all(a.flags.c_contiguous for a in arrays):
                pieces.append(arrays + (settings,))
                continue
            # The update is elementwise, so any cut is exact: pieces of 256K elements let CPU threads share
            # even the largest parameter (the update is bound by memory bandwidth, ~28 bytes an element).
            flat = [a.reshape(-1) for a in arrays]
            for lo in range(0, p.size, self.piece_size):
                pieces.append(tuple(a[lo:lo + self.piece_size] for a in flat) + (settings,))
        if self.workers > 1 and len(pieces) > 1:
            from .fast.cpu.threads import run_in_parallel
            run_in_parallel(lambda piece: adamw_update(*piece), pieces, self.workers)
        else:
            for piece in pieces:
                adamw_update(*piece)

    # ---- the GPU: one fused kernel per parameter, the per-step numbers in device memory ------------------
    def _step_fused(self, updates):
        """Each kernel reads its learning rate and bias corrections from a row of a small device array (see
        kernels.adamw_update), so that a CUDA graph recording this step can replay it with the numbers of
        later steps: npgpt/graph.py calls replay_step before each replay."""
        self._fused_updates = updates
        xp = backend.get_array_module(updates[0][1].data)
        if self._schedule is None or self._schedule.shape[0] != len(updates):
            self._schedule = xp.zeros((len(updates), 3), dtype=np.float64)   # (parameters, 3)
        if not backend.capturing():       # while a graph records, the copy waits for replay_step
            backend.copy_into(self._schedule, self._schedule_rows())
        for (group, p, state), schedule in zip(updates, self._schedule):
            kernels.adamw_update(p.data, p.grad, state["exp_avg"], state["exp_avg_sq"], group["betas"],
                                 group["eps"], group["weight_decay"], schedule)

    def _schedule_rows(self):
        """(parameters, 3) float64 on the host: lr, lr / (1 - beta1^t), 1 / sqrt(1 - beta2^t) per update."""
        rows = []
        for group, _, state in self._fused_updates:
            lr, (beta1, beta2), t = group["lr"], group["betas"], state["step"]
            rows.append((lr, lr / (1 - beta1 ** t), 1 / math.sqrt(1 - beta2 ** t)))
        return np.array(rows, dtype=np.float64)

    def replay_step(self, count=True):
        """Before a recorded GPU step replays: count the step for the parameters it updates (count=False for
        the launch right after recording, whose step() already counted) and write the numbers it reads."""
        if count:
            for _, _, state in self._fused_updates:
                state["step"] += 1
        backend.copy_into(self._schedule, self._schedule_rows())

    # ---- checkpointing: arrays by parameter position, so the state outlives the objects ----------------------
    def state_dict(self):
        """{'step': [...], 'exp_avg': [...], 'exp_avg_sq': [...]} in parameter order (None if never stepped)."""
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
    """Linear warmup from 0 to max_lr over warmup_iters steps, then cosine decay to min_lr at max_iters."""
    if step < warmup_iters:
        return max_lr * (step + 1) / warmup_iters
    if step >= max_iters:
        return min_lr
    progress = (step - warmup_iters) / max(1, max_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def clip_grad_norm_(params, max_norm):
    """Scale all gradients so their global L2 norm is at most max_norm; return the norm before clipping.

    The norm stays an array on the device (a 0-d array), so clipping on the GPU needs no host round trip.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    xp = backend.get_array_module(grads[0])
    squares = [kernels.sum_of_squares(g) if kernels.available(g) else xp.vdot(g.ravel(), g.ravel())
               for g in grads]
    total = xp.sqrt(sum(squares[1:], squares[0]))
    if max_norm > 0:
        factor = xp.minimum(1.0, max_norm / (total + 1e-6)).astype(grads[0].dtype)
        for g in grads:
            g *= factor
    return total
