"""The layers of npgpt, checked on the source: every import of every npgpt/ file (function-level imports
included, read with the ast module) goes down the layers, never up, and no import cycle exists anywhere."""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "npgpt")

# The textbook in reading order: each module may import only those before it.
TEXTBOOK = ["npgpt.backend", "npgpt.engine", "npgpt.functional", "npgpt.gradcheck", "npgpt.nn", "npgpt.optim",
            "npgpt.model", "npgpt.generate"]
ALLOWED_TEXTBOOK_IMPORTS = {
    "npgpt.backend": set(),
    "npgpt.engine": {"npgpt.backend"},
    "npgpt.functional": {"npgpt.backend", "npgpt.engine"},
}


def module_name(path):
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def npgpt_files():
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                yield os.path.join(folder, name)


def imports_of(path):
    """Every npgpt module that `path` imports, at any depth of its code (`from . import x` counts as x)."""
    name = module_name(path)
    package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "npgpt")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "npgpt":
                continue
            for alias in node.names:       # `from pkg import module` imports that module
                candidate = f"{target}.{alias.name}"
                found.add(candidate if os.path.exists(module_path(candidate)) else target)
    return found - {name}


def module_path(name):
    base = os.path.join(ROOT, *name.split("."))
    return base + ".py" if os.path.exists(base + ".py") else os.path.join(base, "__init__.py")


def layer_of(name):
    """0..7 for the textbook (its reading order), 8 for the fast paths, 9 for the program, 10 for the
    package's front: npgpt/__init__.py and the front doors of the commands (npgpt/train.py, ...)."""
    if name in TEXTBOOK:
        return TEXTBOOK.index(name)
    if name.startswith("npgpt.fast"):
        return 8
    if name.startswith("npgpt.program"):
        return 9
    return 10


GRAPH = {module_name(p): imports_of(p) for p in npgpt_files()}


def test_the_import_graph_sees_function_level_imports():
    """The walker is not blind: npgpt/__init__.py imports the tokenizers only inside __getattr__, and the front
    door npgpt/train.py imports the program."""
    assert {"npgpt.fast", "npgpt.program.tokenizer", "npgpt.backend"} <= GRAPH["npgpt"]
    assert "npgpt.program.train" in GRAPH["npgpt.train"]
    assert GRAPH["npgpt.functional"] == {"npgpt.backend", "npgpt.engine"}


@pytest.mark.parametrize("name", sorted(GRAPH))
def test_imports_go_down_the_layers(name):
    upward = sorted(m for m in GRAPH[name] if layer_of(m) > layer_of(name)
                    and not (layer_of(m) == layer_of(name) >= 8))
    assert not upward, f"{name} imports the higher {upward}"
    if name in ALLOWED_TEXTBOOK_IMPORTS:
        extra = GRAPH[name] - ALLOWED_TEXTBOOK_IMPORTS[name]
        assert not extra, f"{name} may import only {sorted(ALLOWED_TEXTBOOK_IMPORTS[name])}, not {sorted(extra)}"


def test_no_import_cycle_anywhere():
    """Depth-first search over the whole graph, each submodule and package its own node."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(GRAPH.get(node, ())):
            if state.get(target) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(target):] + [target]))
            if target not in state:
                visit(target)
        stack.pop()
        state[node] = "done"

    for node in sorted(GRAPH):
        if node not in state:
            visit(node)
