"""The package's own rules of order, checked on its source: every public function and
class says what it is, no function runs past a screen, no module past a few hundred lines."""

import ast
import os

import raybm

PACKAGE = os.path.dirname(raybm.__file__)
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 450


def modules():
    """(path relative to the package, parsed tree, line count) of every module."""
    for folder, _, names in os.walk(PACKAGE):
        for name in sorted(names):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path, encoding="utf-8") as f:
                    text = f.read()
                yield os.path.relpath(path, PACKAGE), ast.parse(text), text.count("\n") + 1


def definitions(tree, prefix=""):
    """(qualified name, node) of every function and class, nested ones included."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield prefix + node.name, node
            yield from definitions(node, prefix + node.name + ".")
        elif not isinstance(node, (ast.Lambda,)):
            yield from definitions(node, prefix)


def public_definitions(tree, prefix=""):
    """(qualified name, node) of the module's public functions and classes and of their
    public methods; what functions define inside themselves is not an interface."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            yield prefix + node.name, node
            if isinstance(node, ast.ClassDef):
                yield from public_definitions(node, prefix + node.name + ".")


def test_every_public_function_and_class_has_a_docstring():
    missing = [f"raybm/{rel}:{node.lineno} {name}" for rel, tree, _ in modules()
               for name, node in public_definitions(tree) if not ast.get_docstring(node)]
    assert not missing, "add a docstring:\n" + "\n".join(missing)


def test_no_function_is_longer_than_a_screen():
    long = [f"raybm/{rel}:{node.lineno} {name} ({node.end_lineno - node.lineno + 1} lines)"
            for rel, tree, _ in modules() for name, node in definitions(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"split into named steps (at most {MAX_FUNCTION_LINES} lines):\n" + "\n".join(long)


def test_no_module_is_longer_than_a_few_hundred_lines():
    big = [f"raybm/{rel} ({lines} lines)" for rel, _, lines in modules() if lines > MAX_MODULE_LINES]
    assert not big, f"split by concern (at most {MAX_MODULE_LINES} lines):\n" + "\n".join(big)
