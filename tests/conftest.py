"""Fixtures every test folder shares: the embedded model, its tokenizer, and tiny random models of every family.

Helpers that are not fixtures live in tests/support (imported as `support`); test modules never import
each other.

Markers (pyproject.toml): `slow` on every test that loads the embedded model (SmolLM2-135M), `gpu` on the
tests that need a CUDA device (skipped without one), `processes` on the tests that start real Slurm/Ray
services or kill worker processes. `make test` runs everything; `make test-fast` runs
`-m "not slow and not gpu and not processes"`. A test that loads the embedded model without the `slow` marker fails here, so
the fast selection stays fast.

Torch uses one thread in tests: on 2 cores, several threaded torch processes slow each other badly.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support.models import FAMILIES, load_tokenizer, make_tiny

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def embedded():
    """The real embedded model (SmolLM2-135M), loaded once per test session; tests using it are `slow`."""
    from editdecay.core.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def tokenizer():
    """The embedded model's real BPE tokenizer (no BOS added), without loading its weights; a copy of its
    own, safe to change padding side on."""
    return load_tokenizer()


@pytest.fixture(params=FAMILIES)
def tiny(request, tokenizer):
    """A tiny random model of each family (support.models.make_tiny), one test per family."""
    return make_tiny(request.param, tokenizer)


def pytest_runtest_setup(item):
    if item.get_closest_marker("gpu") and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if "embedded" in item.fixturenames and not item.get_closest_marker("slow"):
        pytest.fail(f"{item.nodeid} uses the embedded model: mark it @pytest.mark.slow", pytrace=False)


@pytest.fixture(autouse=True)
def _embedded_model_only_in_slow_tests(request, monkeypatch):
    """Fail a test that loads the embedded model's weights in this process without the `slow` marker
    (through load_model, the CLI or a grid: every load ends in from_pretrained on its converted directory,
    named smollm2-135m-instruct-v<N> in whichever cache)."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    from transformers import AutoModelForCausalLM

    load = AutoModelForCausalLM.from_pretrained.__func__
    loaded = []

    def guarded(cls, source, *args, **kwargs):
        if Path(str(source)).name.startswith("smollm2-135m"):
            loaded.append(str(source))
            pytest.fail(f"{request.node.nodeid} loads the embedded model: mark it @pytest.mark.slow "
                        f"(make test-fast leaves slow tests out)", pytrace=False)
        return load(cls, source, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(guarded))
    yield
    if loaded:      # in case the code under test caught the failure
        pytest.fail(f"{request.node.nodeid} loaded the embedded model from {loaded[0]} without the slow marker",
                    pytrace=False)
