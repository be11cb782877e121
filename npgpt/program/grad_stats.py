"""Gradient flow, layer by layer: the numbers behind ``python -m npgpt.plot --grads``.

On every --log-interval step the training program records, for each group of parameters (the embeddings,
each transformer block ``blocks.0`` ... ``blocks.N-1``, the final LayerNorm ``ln_f``):

    grad_norm[group]    = sqrt(sum over the group's parameters of sum(g^2))
                          g = the .grad arrays after backward, summed over the micro-batches, BEFORE clipping:
                          clipping rescales every gradient by one factor and would hide an exploding layer
    update_ratio[group] = ||w_after - w_before|| / ||w_before||   over the whole optimizer step
                          (the clipped gradient, AdamW's update and its weight decay together)

Gradients that shrink block after block towards the embeddings are vanishing; a norm that jumps by orders of
magnitude between steps is exploding. An update/weight ratio around 1e-3 per step is the usual healthy range;
far below it a layer barely learns, far above it the step is too large.

Shapes: each parameter's .grad has the parameter's shape ((V, C), (C,), ...); the statistics are one float
per group.

Next to read: ``npgpt/program/plot.py``, which draws them.
"""

import math

from .. import backend


def parameter_group(name):
    """The group a parameter name belongs to: 'blocks.3.ffn.linear1.weight' -> 'blocks.3',
    'token_embedding.weight' -> 'embeddings', 'ln_f.bias' -> 'ln_f'."""
    parts = name.split(".")
    if len(parts) > 2 and parts[1].isdigit():
        return f"{parts[0]}.{parts[1]}"
    if "embed" in parts[0]:
        return "embeddings"
    return parts[0]


def parameter_groups(model):
    """{group: [parameters]} in the model's order (inputs first); a tied weight counts once."""
    groups = {}
    for name, p in model.named_parameters():
        groups.setdefault(parameter_group(name), []).append(p)
    return groups


def _sum_of_squares(array):
    """sum(a^2) as a Python float, accumulated in float64 so a float32 model's norm is not rounded twice."""
    flat = array.ravel()
    xp = backend.get_array_module(flat)
    return float(xp.dot(flat.astype(xp.float64, copy=False), flat.astype(xp.float64, copy=False)))


class GradStats:
    """Per-group gradient norms and update/weight ratios over one optimizer step.

    train_step calls gradients_ready() between backward and clipping, then step_done() after the optimizer
    step; record() returns {"grad_norm": {group: float}, "update_ratio": {group: float}} for metrics.jsonl.
    """

    def __init__(self, model):
        self.groups = parameter_groups(model)
        self.clear()

    def clear(self):
        self.grad_norm, self.update_ratio, self._weights_before = {}, {}, None

    def gradients_ready(self):
        self.grad_norm = {group: math.sqrt(sum(_sum_of_squares(p.grad) for p in params if p.grad is not None))
                          for group, params in self.groups.items()}
        # the weights before the step, to measure the step; copied only on the steps that are logged
        self._weights_before = {group: [p.data.copy() for p in params] for group, params in self.groups.items()}

    def step_done(self):
        self.update_ratio = {}
        for group, params in self.groups.items():
            before = self._weights_before[group]
            change = sum(_sum_of_squares(p.data - w) for p, w in zip(params, before))
            size = sum(_sum_of_squares(w) for w in before)
            self.update_ratio[group] = math.sqrt(change / size) if size > 0 else 0.0
        self._weights_before = None

    def record(self):
        """The statistics of the last step (empty if none was measured), rounded for the log file."""
        if not self.update_ratio:
            return {}
        return {"grad_norm": {g: float(f"{v:.6g}") for g, v in self.grad_norm.items()},
                "update_ratio": {g: float(f"{v:.6g}") for g, v in self.update_ratio.items()}}
