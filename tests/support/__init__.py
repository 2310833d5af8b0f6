"""What the tests share, in one place: test modules import from here (or use the fixtures of
tests/conftest.py), never from each other.

- `support.models`: the embedded model's tokenizer and the one tiny-model factory (random GPT-2, GPT-J,
  GPT-NeoX and Llama models, in memory or saved as a model directory), and stand-in models;
- `support.edits`: edit requests, a statistics corpus and a synthetic patch for tiny models;
- `support.grids`: a tiny grid (model directory, corpus, grid file) that runs in seconds;
- `support.results`: a results directory built by hand, whose every number is known;
- the paths below: the files under tests/fixtures (provenance in tests/fixtures/README.md).

`tests/` is on the import path (pyproject.toml: [tool.pytest.ini_options] pythonpath), so this package
imports as `support` from any test folder.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]           # the repository
FIXTURES = ROOT / "tests" / "fixtures"
ZSRE_SAMPLE = FIXTURES / "zsre_sample.json"            # 301 real zsRE records
COUNTERFACT_SMALL = FIXTURES / "counterfact_small.json"  # 3 usable and 6 broken CounterFact records
RESULTS_V1 = FIXTURES / "results_v1"                   # results written before the typed schema
RESULTS_V2 = FIXTURES / "results_v2"                   # results written before the typed stage specs
