"""`editdecay train-editor`: train what an editor needs before it can edit (MEND's hypernetwork), on edit requests.

Which editors train, and with which settings, comes from the registry (edit/editor.py `training_class`): each such
editor's training settings are options here (`--train-<field>`), its config fields too (the structure it trains
for: `--layers`, `--modules`, ...), as `editdecay edit` names them.

The training requests are `--data` (optionally the first / a seeded sample of `--n`); `--exclude DATA --exclude-n N
--exclude-seed S` removes every request about a subject of the requests that selection would edit, so the
network is trained on requests disjoint from the ones edited later (e.g. a grid's `n_edits: [50]`, `seeds: [0]`
on worldfacts edits the sample `--exclude worldfacts --exclude-n 50 --exclude-seed 0`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from editdecay.cli import app
from editdecay.cli.common import console, guard, set_threads
from editdecay.cli.edit import EDITOR, MODEL, RUN, own_fields
from editdecay.cli.options import Fields, config_options
from editdecay.core.model_ref import ModelRef
from editdecay.edit.registry import editor_class, editor_names
from editdecay.grid.spec import SharedSettings

TRAINED = tuple(n for n in editor_names() if editor_class(n).training_class is not None)
OWN = own_fields(TRAINED)          # only the config fields of editors that train
TRAINING = tuple(Fields(editor_class(n).training_class, into="training", section=n, prefix="train-",
                        panel=f"Training of {n}") for n in TRAINED)


@app.command("train-editor")
@guard
@config_options(MODEL, EDITOR, *OWN, *TRAINING, RUN)
def train_editor(
    model: dict,
    editor_fields: dict,
    training: dict,
    run: dict,
    editor: str = typer.Option(..., help="an editor that needs training: " + " | ".join(TRAINED)),
    data: str = typer.Option("worldfacts", help="training requests: worldfacts | counterfact:PATH | zsre:PATH"),
    n: Optional[int] = typer.Option(None, help="use the first N training requests (a seeded sample with --seed)"),
    seed: Optional[int] = typer.Option(None, help="seed of the sample of --n training requests"),
    exclude: Optional[str] = typer.Option(None, help="edit data whose selected requests' subjects are left out"),
    exclude_n: Optional[int] = typer.Option(None, help="the --exclude selection: first N (or a seeded sample)"),
    exclude_seed: Optional[int] = typer.Option(None, help="seed of the --exclude selection's sample"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="show a progress bar"),
    out: Path = typer.Option(..., help="directory to write the trained editor into"),
) -> None:
    """Train an editor's learned part (MEND's hypernetwork) on requests disjoint from those edited later."""
    from editdecay.core.cache import Cache
    from editdecay.core.config import check_choice
    from editdecay.core.errors import ConfigError, DataError
    from editdecay.data.sources import EditSelection
    from editdecay.edit.registry import check_fields, resolve_config

    ref = ModelRef(**model)
    settings_run = SharedSettings(**run)
    name = check_choice("--editor", editor.lower(), TRAINED or ("(none registered)",))
    cls = editor_class(name)
    unused = [k for k in training if k != name]
    if unused:
        raise ConfigError(f"--train-* options of editor {unused[0]} given with --editor {name}")
    settings = cls.training_class(**training.get(name, {}))
    check_fields(name, editor_fields)
    if (exclude_n is not None or exclude_seed is not None) and exclude is None:
        raise ConfigError("--exclude-n/--exclude-seed select requests of --exclude DATA; give --exclude")
    set_threads(settings_run.threads)
    train_ds = EditSelection(data=data, n=n, seed=seed).load()
    requests = list(train_ds.requests)
    left_out: list[str] = []
    if exclude is not None:
        excluded = EditSelection(data=exclude, n=exclude_n, seed=exclude_seed).load()
        subjects = {r.subject for r in excluded.requests}
        left_out = sorted(subjects)
        requests = [r for r in requests if r.subject not in subjects]
    if not requests:
        raise DataError(f"--data {data}: no training requests left after --exclude {exclude}")
    console.print(f"{len(requests)} training requests from {data}"
                  + (f" ({len(train_ds.requests) - len(requests)} about {len(left_out)} excluded subjects left out)"
                     if exclude else ""))
    lm = ref.load(device=settings_run.device,
                  cache=Cache(Path(settings_run.cache_dir)) if settings_run.cache_dir else None)
    cfg = resolve_config(name, lm.identity.family, lm.identity.name, editor_fields)
    record = cls.train(lm, cfg, settings, requests, out, progress=progress)
    t = record.get("training", {})
    console.print(f"trained in {t.get('seconds', 0):.0f} s on {t.get('n_requests')} requests; written to {out}")
    if t.get("validation"):
        v = t["validation"]
        console.print(f"held-back requests edited one at a time (n={v['n']}): ES {v['efficacy']:.2f}, "
                      f"PS {v['paraphrase']:.2f}, NS {v['neighborhood']:.2f}")
    if record.get("tensors_sha256"):
        console.print(f"tensors sha256 {record['tensors_sha256']} (pin it with hypernetwork_sha256)")
    if left_out:
        console.print(f"excluded subjects: {len(left_out)}")
