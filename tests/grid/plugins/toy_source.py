"""A toy data source, added the way a plug-in adds one: this file and one `register` call (tests/grid/
test_plugins.py). Nothing in editdecay names it.

`toyfacts`: four invented facts as edit requests, and sentences about them as fine-tuning text.
"""

from __future__ import annotations

import hashlib
import json

from editdecay.core.request import EditRequest
from editdecay.data.common import EditDataset, finish
from editdecay.data.source import EDIT, FINETUNE, DataSource, DataSpec, EditOptions, Source

FACTS = [("Zorbia", "Quillton", "Marlow"), ("Veltria", "Ossen", "Duneford"), ("Karrow", "Pellis", "Brightwater"),
         ("Lunmark", "Tessary", "Holloway")]     # country, its capital, the capital the edit writes


class ToyFacts(DataSource):
    prefix = "toyfacts"
    roles = (EDIT, FINETUNE)
    description = "four invented capitals (edit requests) and sentences about them (fine-tuning text)"
    licence = "CC0 (written for this test)"

    def digest(self, spec: DataSpec) -> str:
        return hashlib.sha256(json.dumps(FACTS).encode()).hexdigest()[:16]

    def edit_data(self, spec: DataSpec, options: EditOptions) -> EditDataset:
        requests = [EditRequest(f"toy-{country.lower()}", "The capital of {} is", country, new, true,
                                paraphrase_prompts=("{} has its capital in".replace("{}", country),),
                                neighborhood_prompts=(f"The capital of {FACTS[(i + 1) % 4][0]} is",),
                                neighborhood_answers=(FACTS[(i + 1) % 4][1],))
                    for i, (country, true, new) in enumerate(FACTS)]
        return finish(self.prefix, len(requests), requests, [], strict=options.strict)

    def training_data(self, spec: DataSpec, task=None) -> Source:
        texts = tuple(f"{country} is a small country. Its capital, {capital}, lies by the sea."
                      for country, capital, _ in FACTS) * 4
        return Source(spec.text, self.prefix, texts=texts, identity={"spec": spec.text, "licence": self.licence})
