"""Modules imported on first use, so that a cache hit, which never parses or converts a model, imports only
torch (tests/importer/test_importer_startup.py checks ``sys.modules``)."""

from __future__ import annotations

import importlib

__all__ = ["lazy"]


class _LazyModule:
    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str):
        module = importlib.import_module(self._name)
        self.__dict__.update(module.__dict__)  # later lookups go straight to the module's names
        return getattr(module, attr)


def lazy(name: str):
    """A stand-in for ``import name`` that imports the module when one of its attributes is first read."""
    return _LazyModule(name)
