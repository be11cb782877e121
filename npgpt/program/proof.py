"""The gradient proof on screen: every op, and a tiny GPT, against central finite differences in float64.

    python -m npgpt.proof

Prints one row per op: the shapes checked, the largest absolute and relative error between backprop's
gradient and the finite-difference one, and PASS or FAIL. Exits 1 if anything fails. (The function itself is
``npgpt.gradcheck``, defined in ``npgpt/gradcheck.py``.)

Shapes: small ones, listed per row of the table.

Next to read: ``npgpt/gradcheck.py``, the check itself.
"""

import sys

import numpy as np

from .. import backend
from .. import functional as F
from ..gradcheck import GradcheckError, gradcheck
from ..engine import Tensor
from .cli import run_command, silence_stdout
from .config import OneLineParser


def _param(rng, *shape, low=None):
    values = rng.standard_normal(shape) if low is None else rng.uniform(low, low + 1.5, shape)
    return Tensor(backend.current().asarray(values), requires_grad=True)


def cases():
    """[(name, fn, inputs)]: every Tensor operation and every op of npgpt.functional, then a tiny GPT."""
    rng = np.random.default_rng(0)
    xp = backend.current()
    a, b, pos = _param(rng, 3, 4), _param(rng, 4), _param(rng, 3, 4, low=0.5)
    targets = xp.asarray([0, 2, 1, 3, -100])
    ids = xp.asarray([[1, 4, 4], [0, 2, 1]])
    out = [
        ("add", lambda x, y: x + y, [a, b]),
        ("sub", lambda x, y: x - y, [a, b]),
        ("mul", lambda x, y: x * y, [a, b]),
        ("div", lambda x, y: x / y, [a, pos]),
        ("pow", lambda x: x ** 3.0 + 2.0 ** x, [a]),
        ("neg", lambda x: -x, [a]),
        ("matmul", lambda x, y: x @ y, [_param(rng, 2, 3, 4), _param(rng, 4, 5)]),
        ("exp", lambda x: x.exp(), [a]),
        ("log", lambda x: x.log(), [pos]),
        ("tanh", lambda x: x.tanh(), [a]),
        ("sqrt", lambda x: x.sqrt(), [pos]),
        ("sum", lambda x: x.sum(axis=1, keepdims=True), [a]),
        ("mean", lambda x: x.mean(axis=0), [a]),
        ("max", lambda x: x.max(axis=-1), [a]),
        ("reshape", lambda x: x.reshape(2, 6) * x.reshape(2, 6), [a]),
        ("transpose", lambda x: x.transpose(0, 1).tanh(), [a]),
        ("permute", lambda x: x.permute(2, 0, 1).tanh(), [_param(rng, 2, 3, 4)]),
        ("getitem", lambda x: x[1:, xp.asarray([0, 0, 3])], [a]),
        ("linear", lambda x, w, c: F.linear(x, w, c), [_param(rng, 2, 3, 4), _param(rng, 5, 4), _param(rng, 5)]),
        ("layer_norm", lambda x, w, c: F.layer_norm(x, 4, w, c), [_param(rng, 2, 3, 4), _param(rng, 4), _param(rng, 4)]),
        ("gelu", lambda x: F.gelu(x), [_param(rng, 3, 4)]),
        ("gelu (tanh)", lambda x: F.gelu(x, approximate="tanh"), [_param(rng, 3, 4)]),
        ("softmax", lambda x: F.softmax(x, -1), [a]),
        ("log_softmax", lambda x: F.log_softmax(x, 0), [a]),
        ("cross_entropy", lambda z: F.cross_entropy(z, targets), [_param(rng, 5, 4)]),
        ("embedding", lambda w: F.embedding(ids, w), [_param(rng, 5, 3)]),
        ("dropout", lambda x: F.dropout(x, 0.3, generator=backend.default_rng(1)), [a]),
        ("scaled_dot_product_attention",
         lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
         [_param(rng, 2, 4, 3), _param(rng, 2, 4, 3), _param(rng, 2, 4, 3)]),
    ]
    from ..model import GPT
    backend.manual_seed(0)
    model = GPT(vocab_size=11, d_model=8, num_heads=2, num_layers=2, d_ff=12, max_seq_len=8, dropout=0.0)
    model.to(np.float64)
    for p in model.parameters():
        p.data[...] = xp.asarray(rng.standard_normal(p.shape) * 0.5)
    tokens = xp.asarray(rng.integers(0, 11, (2, 6)))

    def gpt_loss(*params):
        logits = model(tokens[:, :-1])
        return F.cross_entropy(logits.reshape(-1, 11), tokens[:, 1:].reshape(-1))
    out.append(("GPT (2 layers, every parameter)", gpt_loss, model.parameters()))
    return out


def run(log=print):
    """Check every case; print the table; return the number of failures."""
    log("| op | input shapes | max abs error | max rel error | result |")
    log("|---|---|---|---|---|")
    failures = 0
    for name, fn, inputs in cases():
        shapes = ", ".join(str(tuple(x.shape)) for x in inputs[:3]) + (", ..." if len(inputs) > 3 else "")
        try:
            results = gradcheck(fn, inputs, max_probes=60)
            max_abs = max(r[1] for r in results)
            max_rel = max(r[2] for r in results)
            log(f"| {name} | {shapes} | {max_abs:.1e} | {max_rel:.1e} | PASS |")
        except GradcheckError as exc:
            failures += 1
            log(f"| {name} | {shapes} | | | FAIL: {exc} |")
    log(f"\n{'all gradients agree with finite differences' if not failures else f'{failures} FAILED'}")
    return failures


def build_parser():
    return OneLineParser(description="Check the gradient of every op, and of a tiny GPT, against central finite "
                                     "differences in float64: one row per op with its largest absolute and "
                                     "relative error and PASS or FAIL; exit code 1 if anything fails. It takes "
                                     "no arguments.")


def main(argv=None):
    build_parser().parse_args(argv)
    try:
        failures = run()
        sys.stdout.flush()              # here, so that a closed stdout is met below rather than at exit
    except BrokenPipeError:             # the reader of stdout went away (a pipe into head): stop quietly
        silence_stdout()
        return 0
    return 1 if failures else 0


if __name__ == "__main__":
    run_command(main)
