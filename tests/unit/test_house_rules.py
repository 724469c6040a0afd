"""The package's own rules of order, checked on its source: every public function and
class says what it is, no function runs past a screen, no module past a few hundred lines.

Sizes are counted in statements, not lines: ``ruff format`` (checked in make test) lays a
call that does not fit one line out one argument a line, which says nothing of how much a
function does. 70 statements are about the 80 lines of the rule before the formatter came."""

import ast
import os

import raybm

PACKAGE = os.path.dirname(raybm.__file__)
MAX_FUNCTION_STATEMENTS = 70
MAX_MODULE_STATEMENTS = 320


def statements(node) -> int:
    """Statements in a function or module, nested ones included (the ``def`` itself not)."""
    return sum(isinstance(n, ast.stmt) for n in ast.walk(node)) - (not isinstance(node, ast.Module))


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
    missing = [
        f"raybm/{rel}:{node.lineno} {name}"
        for rel, tree, _ in modules()
        for name, node in public_definitions(tree)
        if not ast.get_docstring(node)
    ]
    assert not missing, "add a docstring:\n" + "\n".join(missing)


def unannotated(fn: ast.FunctionDef | ast.AsyncFunctionDef, method: bool) -> list[str]:
    """What of ``fn``'s signature has no annotation: its parameters by name (``self`` and
    ``cls`` of a method aside), and ``return``."""
    a = fn.args
    params = [*a.posonlyargs, *a.args, *a.kwonlyargs, *(p for p in (a.vararg, a.kwarg) if p)]
    if method and params and params[0].arg in ("self", "cls"):
        params = params[1:]
    return [p.arg for p in params if p.annotation is None] + (["return"] if fn.returns is None else [])


def interface_functions(tree):
    """(qualified name, node, is a method) of every public function and method, with the
    constructors and ``__call__`` of public classes (their callers' interface too)."""
    for name, node in public_definitions(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield name, node, "." in name
        elif isinstance(node, ast.ClassDef):
            for m in node.body:
                if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef)) and m.name in ("__init__", "__call__"):
                    yield f"{name}.{m.name}", m, True


def test_every_public_function_is_annotated():
    """Parameters and return of every public function: what mypy (in make test) checks its
    callers against."""
    missing = [
        f"raybm/{rel}:{node.lineno} {name}: {', '.join(unannotated(node, method))}"
        for rel, tree, _ in modules()
        for name, node, method in interface_functions(tree)
        if unannotated(node, method)
    ]
    assert not missing, "annotate:\n" + "\n".join(missing)


def test_the_annotation_rule_can_fail():
    tree = ast.parse("def f(a, b: int):\n    pass\nclass C:\n    def __init__(self, x: int):\n        pass\n")
    found = {name: unannotated(node, method) for name, node, method in interface_functions(tree)}
    assert found == {"f": ["a", "return"], "C.__init__": ["return"]}


def test_no_function_is_longer_than_a_screen():
    long = [
        f"raybm/{rel}:{node.lineno} {name} ({statements(node)} statements)"
        for rel, tree, _ in modules()
        for name, node in definitions(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and statements(node) > MAX_FUNCTION_STATEMENTS
    ]
    assert not long, f"split into named steps (at most {MAX_FUNCTION_STATEMENTS} statements):\n" + "\n".join(long)


def test_no_module_is_longer_than_a_few_hundred_lines():
    big = [
        f"raybm/{rel} ({statements(tree)} statements)"
        for rel, tree, _ in modules()
        if statements(tree) > MAX_MODULE_STATEMENTS
    ]
    assert not big, f"split by concern (at most {MAX_MODULE_STATEMENTS} statements):\n" + "\n".join(big)


def test_the_size_rules_can_fail():
    tree = ast.parse("def f():\n" + "    x = 1\n" * (MAX_FUNCTION_STATEMENTS + 1))
    assert statements(tree.body[0]) == MAX_FUNCTION_STATEMENTS + 1
    assert statements(ast.parse("x = 1\ny = 2\n")) == 2


# The only imports a function may make itself (not the module): libraries whose import
# costs seconds or which only some commands need, and raybm modules that import them.
# Everything else is imported at the top of the module.
LAZY_IMPORTS = {
    "ray": "Ray's client, Data, Train, Tune and Serve: 0.7 s or more; not needed by a command that fails its checks",
    "torch": "3 s with transformers; not needed to read results, list them or check a config",
    "transformers": "3 s with torch",
    "safetensors": "only where weights are read or written",
    "onnxruntime": "only ONNX variants",
    "fastapi": "only the model server",
    "starlette": "only the model server",
    "streamlit": "only the dashboard",
    "altair": "only the dashboard's charts",
    "pandas": "0.2 s; only tables and files of predictions",
    "sklearn": "only its English stop-word list (data.clean.stop_words)",
    "peft": "only LoRA (train.strategy=lora)",
    "captum": "1.8 s with matplotlib; only explanations of answers",
    "accelerate": "imports torch; only FSDP's model skeletons",
    "boto3": "only S3",
    "botocore": "only S3",
    "ftfy": "only the twitter corpus's repair",
    "mlflow": "an optional extra (tracking); about 1 s; only when tracking.mlflow_uri is set",
    "raybm.data": "imports Ray Data",
    "raybm.models": "imports torch and transformers",
    "raybm.inference.evaluate": "imports pandas and Ray Data",
    "raybm.inference.predict": "imports pandas",
    "raybm.inference.batch": "imports pandas (raybm.inference.predict's labelling)",
    "raybm.dashboard": "imports pandas and Streamlit",
    "raybm.serve.app": "imports FastAPI",
    "raybm.serve.deploy": "imports FastAPI",
    "raybm.ray_patches": "imports Ray Train (the Train controller unpickles its backend and never imports torch)",
}


def lazy_reason(module: str) -> str | None:
    """The reason a function may import ``module`` itself, or None."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LAZY_IMPORTS:
            return LAZY_IMPORTS[".".join(parts[:n])]
    return None


def test_functions_import_only_heavy_libraries_themselves():
    found = []
    for rel, tree, _ in modules():
        for name, node in definitions(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for stmt in ast.walk(node):
                if isinstance(stmt, ast.Import):
                    names = [a.name for a in stmt.names]
                elif isinstance(stmt, ast.ImportFrom) and not stmt.level:
                    names = [stmt.module]
                else:
                    continue
                found += [f"raybm/{rel}:{stmt.lineno} {name}: {m}" for m in names if lazy_reason(m) is None]
    assert not found, "import these at the top of the module:\n" + "\n".join(sorted(set(found)))
