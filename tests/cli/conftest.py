"""Fixtures of the command-line tests: a tiny model directory with the files a grid needs, and model loading
replaced by an assertion (for inputs that must be refused before a model loads)."""

from __future__ import annotations

import pytest
from support.grids import make_world


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A saved tiny Llama, a statistics corpus and a cache directory (support.grids.make_world)."""
    return make_world(tmp_path_factory.mktemp("world"))


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: the command must have refused its input before."""
    import editdecay.core.models as models

    def load_model(*a, **k):
        raise AssertionError("a model was loaded before the input was refused")

    monkeypatch.setattr(models, "load_model", load_model)
