"""The optional parts of raybm and what they need installed.

``pip install raybm`` brings what training needs. Serving, export and the dashboard come
with extras (``pip install 'raybm[serve]'``, ``[export]``, ``[dashboard]``; ``[tracking]``
for TensorBoard and MLflow). A command checks for its extra before it starts anything, and
says the one line that installs it.
"""

from __future__ import annotations

import importlib.util

from raybm.errors import RaybmError

# extra -> the modules it brings (import names)
EXTRAS: dict[str, tuple[str, ...]] = {
    "serve": ("fastapi", "uvicorn", "prometheus_client", "captum", "onnxruntime"),  # uvicorn: ray[serve]
    "export": ("onnx", "onnxruntime"),
    "dashboard": ("streamlit",),
}


def missing_modules(modules: tuple[str, ...]) -> list[str]:
    """The ``modules`` that cannot be imported here (found without importing them)."""
    missing = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a parent package missing
            found = False
        if not found:
            missing.append(name)
    return missing


def require(extra: str, what: str, modules: tuple[str, ...] | None = None) -> None:
    """Fail with the pip line to run when ``what`` (a command, a setting) needs ``extra``
    and some of its modules (all of them, or ``modules``) are not installed."""
    missing = missing_modules(modules if modules is not None else EXTRAS[extra])
    if missing:
        raise RaybmError(
            f"{what} needs {', '.join(missing)}, which come with raybm's {extra} extra: pip install 'raybm[{extra}]'"
        )
