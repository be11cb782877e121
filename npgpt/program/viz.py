"""Pictures of the graph: any small computation as Graphviz DOT text (no new dependency).

    python -m npgpt.viz                      # one attention head; an SVG where `dot` is installed, else DOT
    python -m npgpt.viz --example layernorm --out graph.svg

In code:

    graph = npgpt.viz.capture(loss, names={"x": x, "W": w})   # before backward(): the graph is freed after
    loss.backward()
    print(graph.to_dot())      # ops as boxes, tensors as ellipses with shape, dtype and, after backward, |gradient|

Shapes: each tensor node is labelled with its own shape.

Next to read: ``npgpt/gradcheck.py``, and ``python -m npgpt.proof`` for the proof on screen.
"""

import shutil
import subprocess
import sys

import numpy as np

from .. import backend
from ..engine import Tensor
from .cli import run_command, silence_stdout
from .config import OneLineParser


class Graph:
    """The tensors and ops that led to one output, kept so their gradients can be shown after backward."""

    def __init__(self, output, names=None):
        self.output = output
        self.names = {id(t): name for name, t in (names or {}).items()}
        # every tensor reachable through parents, constants included
        self.tensors, seen, stack = [], set(), [output]
        while stack:
            t = stack.pop()
            if id(t) in seen:
                continue
            seen.add(id(t))
            self.tensors.append(t)
            stack.extend(t._parents)
        self.parents = {id(t): list(t._parents) for t in self.tensors}
        self.ops = {id(t): t._op for t in self.tensors if t._parents}
        for t in self.tensors:
            if t._parents and t.requires_grad:
                t.retain_grad()          # so the picture can show every intermediate's gradient

    def edges(self):
        """(source, target) pairs: tensor -> op and op -> tensor, named as in the DOT text."""
        out = []
        for t in self.tensors:
            if id(t) in self.ops:
                op = f"op{id(t)}"
                out.extend((f"t{id(p)}", op) for p in self.parents[id(t)])
                out.append((op, f"t{id(t)}"))
        return out

    def _label(self, t):
        name = self.names.get(id(t))
        if name is None:
            name = "output" if t is self.output else ("param" if t.requires_grad and not self.parents[id(t)]
                                                     else ("const" if not self.parents[id(t)] else ""))
        lines = [name] if name else []
        lines.append(f"{tuple(t.shape)} {t.dtype}")
        if t.grad is not None:
            norm = float(np.sqrt((backend.to_numpy(t.grad).astype(np.float64) ** 2).sum()))
            lines.append(f"|grad| {norm:.4g}")
        return "\\n".join(lines)

    def to_dot(self):
        lines = ["digraph npgpt {", "  rankdir=LR;", '  node [fontname="Helvetica", fontsize=10];']
        for t in self.tensors:
            style = ', style=filled, fillcolor="#dde8f8"' if t.requires_grad and not self.parents[id(t)] else ""
            lines.append(f'  t{id(t)} [shape=ellipse, label="{self._label(t)}"{style}];')
            if id(t) in self.ops:
                lines.append(f'  op{id(t)} [shape=box, style=rounded, label="{self.ops[id(t)]}"];')
        for source, target in self.edges():
            label = ""
            if target.startswith("op"):          # an op with several inputs numbers them: 0 = first argument
                parents = [f"t{id(p)}" for p in self.parents[int(target[2:])]]
                if len(parents) > 1:
                    label = f' [label="{parents.index(source)}"]'
            lines.append(f"  {source} -> {target}{label};")
        lines.append("}")
        return "\n".join(lines)


def capture(output, names=None):
    """Record the graph behind `output` (call before backward, which frees it)."""
    if not isinstance(output, Tensor):
        raise TypeError(f"capture() takes a Tensor, got {type(output).__name__}")
    return Graph(output, names)


def _example(kind):
    """A tiny computation with its named inputs: one attention head, or a layer norm."""
    from .. import functional as F
    rng = np.random.default_rng(0)

    def param(*shape):
        return Tensor(backend.current().asarray(rng.standard_normal(shape)), requires_grad=True)

    if kind == "layernorm":
        x, w, b = param(2, 4), param(4), param(4)
        loss = (F.layer_norm(x, 4, w, b) ** 2).mean()
        return loss, {"x": x, "weight": w, "bias": b}
    x, W_q, W_k, W_v = param(1, 4, 8), param(8, 8), param(8, 8), param(8, 8)
    q, k, v = F.linear(x, W_q), F.linear(x, W_k), F.linear(x, W_v)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return out.sum(), {"x": x, "W_q": W_q, "W_k": W_k, "W_v": W_v}


def main(argv=None):
    p = OneLineParser(description="Draw the autograd graph of a tiny example as DOT (or SVG).")
    p.add_argument("--example", choices=("attention", "layernorm"), default="attention",
                   help="the computation to draw: one attention head or a layer norm (default: attention)")
    p.add_argument("--out", default="npgpt-graph.svg", help="SVG to write when Graphviz's dot is installed")
    p.add_argument("--dot", action="store_true", help="print the DOT text even when dot is installed")
    args = p.parse_args(argv)
    loss, names = _example(args.example)
    graph = capture(loss, names)
    loss.backward()
    text = graph.to_dot()
    try:
        if args.dot or shutil.which("dot") is None:
            print(text)
            sys.stdout.flush()          # here, so that a closed stdout is met below rather than at exit
            if shutil.which("dot") is None:
                print("// Graphviz is not installed: render with `dot -Tsvg` elsewhere to see the picture",
                      file=sys.stderr)
            return 0
        subprocess.run(["dot", "-Tsvg", "-o", args.out], input=text, text=True, check=True)
        print(f"wrote {args.out} ({len(graph.ops)} ops, {len(graph.tensors)} tensors)")
        sys.stdout.flush()
        return 0
    except BrokenPipeError:             # the reader of stdout went away (a pipe into head): stop quietly
        silence_stdout()
        return 0


if __name__ == "__main__":
    run_command(main)
