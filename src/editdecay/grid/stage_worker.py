"""A grid fine-tuning stage sharded over N processes (`shared.finetune_devices`, finetune.distributed).

The runner computing the stage calls `stages.launch_sharded`, which starts N workers with torch's elastic launcher
and waits; each worker reads the plan from the grid's store, joins the process group and runs the same
stage function (`stages.run_finetune_stage`) with its share; process 0 writes the stage's files into the
directory the runner is building, as the in-process stage would.

    python -m torch.distributed.run --standalone --nproc_per_node N -m editdecay.grid.stage_worker ROOT STAGE OUT
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    from editdecay.core.devices import set_threads
    from editdecay.core.seeding import seed_everything
    from editdecay.finetune.distributed import init_from_env
    from editdecay.grid.stages import StageContext, run_finetune_stage
    from editdecay.grid.store import GridStore

    root, stage_id, out = (argv or sys.argv[1:])[:3]
    dist = init_from_env()
    store = GridStore(Path(root))
    plan = store.read_plan()
    set_threads(plan.runtime.get("threads"))
    stage = plan.stages[stage_id]
    seed_everything(stage.spec.seed)            # as the in-process stage (grid.execute)
    ctx = StageContext(stage, plan, store, Path(out))
    run_finetune_stage(ctx, dist=dist)
    import torch.distributed

    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
