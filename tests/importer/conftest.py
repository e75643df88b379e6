"""Fixtures of the importer tests: models exported once per session (see importer_models.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from importer_models import EXPORTS
from importer_models import export


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """key -> path of the exported file; each model is exported on first use, once per session."""
    folder = tmp_path_factory.mktemp("exports")
    paths: dict[str, Path] = {}

    def get(key: str) -> Path:
        if key not in paths:
            spec = next(e for e in EXPORTS if e.key == key)
            paths[key] = export(spec, folder / f"{key}.onnx")
        return paths[key]

    return get


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("featureviz-cache")
