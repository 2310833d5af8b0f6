"""ModelRef: the one record of what a model load depends on."""

from __future__ import annotations

import pytest

from editdecay.core.errors import ConfigError
from editdecay.core.model_ref import ModelRef


def test_aliases_normalise_and_equal_refs_hash_alike():
    assert ModelRef(dtype="bf16") == ModelRef(dtype="bfloat16")
    assert hash(ModelRef(name="a/b", dtype="fp32")) == hash(ModelRef(name="a/b"))
    assert ModelRef().embedded and not ModelRef(name="gpt2").embedded


@pytest.mark.parametrize("fields, named", [({"dtype": "int8"}, "model.dtype='int8'"),
                                           ({"nme": "gpt2"}, "did you mean 'name'"),
                                           ({"name": ""}, "model.name=''")])
def test_bad_fields_are_named(fields, named):
    with pytest.raises(ConfigError, match=named.replace("(", r"\(").replace(".", r"\.")):
        ModelRef(**fields)


def test_load_passes_every_field(monkeypatch):
    seen = {}
    import editdecay.core.models as models

    monkeypatch.setattr(models, "load_model", lambda name, **kw: seen.update(name=name, **kw))
    ModelRef(name="/m", revision="r1", dtype="float16", trust_remote_code=True, allow_pickle=True).load(device="meta")
    assert seen == {"name": "/m", "dtype": "float16", "device": "meta", "cache": None, "trust_remote_code": True,
                    "revision": "r1", "allow_pickle": True}
