"""Registers "h3fusion" in transformers' experts interface the moment transformers loads it, at no import cost.

`import h3fusion` must stay cheap (no torch, no transformers, no compiled extension: `h3fusion --help` runs in well
under a second), yet `from_pretrained(..., experts_implementation="h3fusion")` must work after it. So importing
`h3fusion` installs a one-shot import hook: right after transformers executes its MoE integration module, the hook
imports `h3fusion.models.hf_experts` and registers; if transformers already loaded that module, we register at once.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys

MOE_MODULE = "transformers.integrations.moe"

__all__ = ["MOE_MODULE", "register_lazily"]


def _register() -> None:
    importlib.import_module("h3fusion.models.hf_experts").register_experts_implementation()


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Wraps the loader of transformers' MoE integration module so that registration runs after it executes."""

    def find_spec(self, fullname, path, target=None):
        if fullname != MOE_MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                break
        else:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        original = spec.loader.exec_module

        def exec_module(module):
            original(module)
            _register()

        spec.loader.exec_module = exec_module
        return spec


def register_lazily() -> None:
    """Register now if transformers' MoE integration is loaded, else when it gets imported (costs nothing now)."""
    if MOE_MODULE in sys.modules:
        _register()
    elif not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())
