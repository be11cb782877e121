"""The learners' windows: graph pictures (DOT), the gradcheck table, and the demo commands."""

import re
import subprocess
import sys

import numpy as np

import npgpt
import npgpt.functional as F
from npgpt.program import viz


def test_dot_of_a_known_expression_has_exactly_its_ops_and_edges():
    a = npgpt.Tensor(np.ones((2, 3)), requires_grad=True)
    b = npgpt.Tensor(np.full((2, 3), 2.0), requires_grad=True)
    c = npgpt.Tensor(np.zeros(3), requires_grad=True)
    product = a * b
    total = product + c
    loss = total.sum()
    graph = viz.capture(loss, names={"a": a, "b": b, "c": c})
    loss.backward()
    dot = graph.to_dot()
    ops = re.findall(r'op\d+ \[shape=box, style=rounded, label="(\w+)"\]', dot)
    assert sorted(ops) == ["add", "mul", "sum"]
    t = {x: f"t{id(x)}" for x in (a, b, c, product, total, loss)}
    op = {x: f"op{id(x)}" for x in (product, total, loss)}
    expected = {(t[a], op[product]), (t[b], op[product]), (op[product], t[product]),
                (t[product], op[total]), (t[c], op[total]), (op[total], t[total]),
                (t[total], op[loss]), (op[loss], t[loss])}
    assert set(graph.edges()) == expected
    assert set(re.findall(r"(\w+) -> (\w+)[ ;]", dot)) == expected
    assert f'{t[a]} -> {op[product]} [label="0"];' in dot and f'{t[b]} -> {op[product]} [label="1"];' in dot
    # shapes, names and (after backward) gradient norms are in the labels
    assert 'label="a\\n(2, 3) float64\\n|grad| ' in dot
    assert "|grad| 4.899" in dot          # d(sum(a*b + c))/da = b = 2 everywhere: norm sqrt(6 * 4)
    assert "(3,) float64" in dot


def test_viz_demo_runs():
    proc = subprocess.run([sys.executable, "-m", "npgpt.viz", "--dot"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("digraph npgpt {") and "scaled_dot_product_attention" in proc.stdout
    assert "W_q" in proc.stdout and "|grad|" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "npgpt.viz", "--example", "layernorm", "--dot"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "layer_norm" in proc.stdout


def test_gradcheck_table_lists_every_public_op_and_passes():
    proc = subprocess.run([sys.executable, "-m", "npgpt.proof"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {line.split("|")[1].strip(): line for line in proc.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| op")}
    functional_ops = set(F.__all__) - {"erf"}             # erf is a plain array function, not an op
    tensor_ops = {"add", "sub", "mul", "div", "pow", "neg", "matmul", "exp", "log", "tanh", "sqrt", "sum",
                  "mean", "max", "reshape", "transpose", "permute", "getitem"}
    assert functional_ops | tensor_ops <= set(rows), sorted((functional_ops | tensor_ops) - set(rows))
    assert any(name.startswith("GPT") for name in rows)
    assert all(line.rstrip().endswith("PASS |") for line in rows.values())
    assert "all gradients agree" in proc.stdout
