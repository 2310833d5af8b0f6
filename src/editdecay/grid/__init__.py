"""The experiment grid: one YAML file -> cells -> shared, content-addressed stages -> one result per cell.

- `spec`      the grid file, validated (pydantic), without torch
- `plan`      cells and the stages they need; stage ids are hashes of what each stage depends on
- `store`     the output directory: finished stages, locks, failure records, cell results, results table
- `stages`    what each stage kind computes (statistics, patch, fine-tuning, evaluation, cell result)
- `runner`    runs one stage safely (lock, atomic output, failure record) and a grid in-process
- `backends`  local (in-process), Ray (one task per stage) and Slurm (submitit job arrays)

Modules are imported lazily so `editdecay grid plan` stays light; import what you use, e.g.
`from editdecay.grid.plan import build_plan`.
"""
