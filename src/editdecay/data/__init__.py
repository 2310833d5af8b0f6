"""Edit data sources, named on the command line as `worldfacts`, `counterfact:PATH`, `zsre:PATH`."""

from __future__ import annotations

import random

from editdecay.core.config import did_you_mean
from editdecay.core.errors import ConfigError
from editdecay.data.common import EditDataset, Rejection, validate_request

SOURCES = ("worldfacts", "counterfact", "zsre")
EDIT_SOURCES = SOURCES + ("mcf", "multicounterfact")     # with the aliases of counterfact


def load_edit_data(spec: str, *, zsre_target: str = "answers", strict: bool = False,
                   limit: int | None = None, seed: int | None = None) -> EditDataset:
    """Load and validate edit requests.

    `limit` keeps the first `limit` requests, or a seeded random sample when `seed`
    is given (the same seed always gives the same sample).
    """
    kind, _, path = spec.partition(":")
    if kind == "worldfacts":
        from editdecay.data.worldfacts import load_worldfacts

        ds = load_worldfacts(strict=strict)
    elif kind in ("counterfact", "mcf", "multicounterfact"):
        from editdecay.data.counterfact import load_counterfact

        ds = load_counterfact(_need_path(spec, path), strict=strict)
    elif kind == "zsre":
        from editdecay.data.zsre import load_zsre

        ds = load_zsre(_need_path(spec, path), target=zsre_target, strict=strict)
    else:
        raise ConfigError(f"data {spec!r}: unknown source {kind!r}{did_you_mean(kind, EDIT_SOURCES)}; use one of: "
                          f"worldfacts, counterfact:PATH, zsre:PATH")
    return subset(ds, limit, seed)


def _need_path(spec: str, path: str) -> str:
    if not path:
        raise ConfigError(f"data {spec!r}: give a file, e.g. {spec.split(':')[0]}:/path/to/file.json")
    return path


def subset(ds: EditDataset, limit: int | None, seed: int | None) -> EditDataset:
    if limit is None or limit >= len(ds.requests):
        return ds
    if limit <= 0:
        raise ConfigError(f"limit must be positive, got {limit}")
    reqs = list(ds.requests)
    if seed is not None:
        reqs = random.Random(seed).sample(reqs, limit)
    else:
        reqs = reqs[:limit]
    opts = dict(ds.options, limit=limit, seed=seed)
    return EditDataset(ds.name, tuple(reqs), ds.n_records, ds.rejected, opts, ds.rejected_records)


__all__ = ["EditDataset", "Rejection", "load_edit_data", "subset", "validate_request", "SOURCES"]
