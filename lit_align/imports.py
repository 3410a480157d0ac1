"""Objects named in configs by import path (``package.module.name`` or ``package.module:name``)."""

from __future__ import annotations

import importlib
from typing import Any


def import_object(path: str, what: str, default_module: str | None = None, expected: str = "") -> Any:
    """The object at ``path``; a bare name is looked up in ``default_module``. ``what`` names the
    option in the error (``reward function 'x'``), ``expected`` says what a good value looks like."""
    module, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
    if not module and default_module:
        module, attr = default_module, path
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"{what} {path!r}: cannot import {attr!r} from {module!r} ({err}){'; expected ' + expected if expected else ''}") from err
