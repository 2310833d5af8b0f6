"""The data step: edit requests, fine-tuning data, held-out tasks and statistics corpora.

Every data spec (`worldfacts`, `counterfact:PATH`, `zsre:PATH`, `embedded`, `chatterbot[:DIR]`,
`instructions:PATH`, `text:PATH`, `hf:NAME[:SPLIT]`) names a registered source (data/sources.py).
"""

from __future__ import annotations

from editdecay.data.common import EditDataset, Rejection, validate_request
from editdecay.data.sources import held_out_task, load_edit_data, load_source, parse_spec, subset

__all__ = ["EditDataset", "Rejection", "held_out_task", "load_edit_data", "load_source", "parse_spec", "subset",
           "validate_request"]
