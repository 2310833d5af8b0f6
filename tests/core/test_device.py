"""One device vocabulary and one default (auto) for the command line, grid files and model loading."""

from __future__ import annotations

import pytest

from editdecay.core.errors import ConfigError
from editdecay.core.placement import DEFAULT_DEVICE


def test_auto_is_cuda_when_available_else_cpu(monkeypatch):
    import torch

    from editdecay.core.placement import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda"
    assert resolve_device("cuda:1") == "cuda:1" and resolve_device({"": "cpu"}) == {"": "cpu"}


def test_one_default_everywhere():
    import inspect

    from editdecay.cli import _register, app
    from editdecay.core.model_ref import ModelRef
    from editdecay.core.models import load_model
    from editdecay.grid.spec import SharedSettings

    assert DEFAULT_DEVICE == "auto" == SharedSettings().device
    assert inspect.signature(load_model).parameters["device"].default == DEFAULT_DEVICE
    assert inspect.signature(ModelRef.load).parameters["device"].default == DEFAULT_DEVICE
    import typer

    _register()
    group = typer.main.get_command(app)
    for name in ("edit", "eval-edits", "finetune", "report"):
        option = next(p for p in group.commands[name].params if "--device" in p.opts)
        assert "(default: auto)" in option.help, name


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:3", "balanced", "mps"])
def test_device_words(device):
    from editdecay.grid.spec import SharedSettings

    assert SharedSettings(device=device).device == device


def test_a_bad_device_names_the_words():
    from editdecay.grid.spec import SharedSettings

    with pytest.raises(ConfigError, match=r"shared\.device='cdua' is not valid \(did you mean 'cuda'\?\); use one of "
                                          r"auto, cpu, cuda, balanced, mps or cuda:N"):
        SharedSettings(device="cdua")
