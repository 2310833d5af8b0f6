"""One process of the two-process FSDP test (tests/finetune/test_distributed.py), started by torchrun.

Builds the tiny model and data of the test, trains it sharded over the process group (gloo on the CPU) with
`finetune.train.train(dist=...)`, and process 0 writes the losses and the gathered final weights.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))          # tests/: `support`, as pytest has it

from dist_case import build_case  # noqa: E402


def main(out: Path) -> None:
    from safetensors.torch import save_file

    from editdecay.finetune.distributed import gather_state, init_from_env
    from editdecay.finetune.train import train
    from editdecay.finetune.trainable import resolve_plan

    torch.set_num_threads(1)
    ctx = init_from_env()
    model, tok, recipe, data = build_case()
    log = out / "log.jsonl"
    outcome = train(model, tok, recipe, data, plan=resolve_plan(recipe, model), log_path=log, progress=False,
                    dist=ctx)
    state = gather_state(outcome.model, ctx)
    if ctx.main:
        save_file({k: v.contiguous() for k, v in state.items()}, str(out / "weights.safetensors"))
        (out / "outcome.json").write_text(json.dumps({"world": ctx.world, "final_loss": outcome.final_loss,
                                                      "tokens": outcome.tokens, "steps": outcome.steps}))
    import torch.distributed as dist

    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
