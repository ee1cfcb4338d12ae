"""dsmoe: a compiler for DeepSeek-style Mixture-of-Experts models.

Python API::

    import dsmoe
    model = dsmoe.load("path/to/checkpoint", dtype="float32")   # or "preset:tiny"
    logits = model(input_ids)                                     # [B, S, V]

``passes/``, ``plugins/`` and ``export/`` install as :mod:`dsmoe.passes`, :mod:`dsmoe.plugins`
and :mod:`dsmoe.export`.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any

from dsmoe.errors import DsmoeError

__version__ = "0.1.0"
PRESET_PREFIX = "preset:"
log = logging.getLogger("dsmoe")  # notes for the user (the CLI prints them as "note: ...")

__all__ = [
    "PRESETS",
    "DeepseekConfig",
    "DeepseekForCausalLM",
    "DsmoeError",
    "__version__",
    "cast_model",
    "init_model",
    "load",
    "load_config",
]

# The package imports torch only when one of these is first used (PEP 562), so that `import
# dsmoe.errors` or `dsmoe --help` does not pay for it. name → the module that defines it.
_LAZY = {"load": "dsmoe.loading", "load_config": "dsmoe.loading", "init_model": "dsmoe.loading",
         "cast_model": "dsmoe.loading", "PRESETS": "dsmoe.config", "DeepseekConfig": "dsmoe.config",
         "DeepseekForCausalLM": "dsmoe.model"}


def is_preset(source: str | Path) -> bool:
    """Whether ``source`` names a preset (``preset:NAME``) rather than a checkpoint directory."""
    return str(source).startswith(PRESET_PREFIX)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    try:  # `import dsmoe; dsmoe.ops` as before, when the submodule was imported eagerly
        return importlib.import_module(f"dsmoe.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"dsmoe.{name}":
            raise
        raise AttributeError(f"module 'dsmoe' has no attribute {name!r}") from None
