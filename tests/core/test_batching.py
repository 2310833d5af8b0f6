"""On the CPU: memory-aware batching (core.memory) and tensors that follow module devices
(core.devices).

The acceptance test of the batching rule simulates a CUDA device with a fixed amount of free
memory (the only input the planner reads) and edits 10x more requests: no stage builds a larger
batch, and every batch stays within the budget.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
import torch
from support.models import make_tiny

import editdecay
import editdecay.core.memory as memory
from editdecay.core.devices import input_device, module_device
from editdecay.core.memory import (
    MEMORY_FRACTION,
    DeviceMemoryError,
    plan_batch_size,
    record_batches,
    run_batched,
)
from editdecay.core.request import EditRequest
from editdecay.edit import make_config
from editdecay.edit.context import context_templates
from editdecay.edit.keys import compute_keys
from editdecay.edit.memit import Memit
from editdecay.edit.run import EditingRun
from editdecay.edit.solve import key_gram, memit_delta, nullspace_delta, output_dtype
from editdecay.edit.targets import TargetSettings, compute_targets
from editdecay.measure.metrics import evaluate_requests

torch.set_num_threads(1)

WORDS = "river city music team state world people year time first new north south east west old".split()
LAYERS = (1, 2)


def requests(n: int, seed: int = 0) -> list[EditRequest]:
    rng = random.Random(seed)
    w = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))   # noqa: E731
    return [EditRequest(f"r{i}", "{} " + w(3), w(2).title(), rng.choice(WORDS), rng.choice(WORDS),
                        paraphrase_prompts=(f"{w(2).title()} {w(2)}",), neighborhood_prompts=(w(3),),
                        neighborhood_answers=(rng.choice(WORDS),)) for i in range(n)]


def memit_run(lm) -> EditingRun:
    cfg = make_config("memit", layers=LAYERS, v_num_grad_steps=2, n_context_templates=2, context_length=4,
                      mom2_update_weight=100.0)
    d_k = lm.model.config.intermediate_size
    return EditingRun(lm, Memit(cfg, {l: torch.eye(d_k) for l in LAYERS}), progress=False)


def oom(what: str = "CUDA out of memory. Tried to allocate 2.00 GiB"):
    return torch.OutOfMemoryError(what)


# --------------------------------------------------------------------------- the acceptance test

@pytest.mark.parametrize("budget_mib", [2.5, 16])
def test_ten_times_more_edits_build_no_larger_batches(tokenizer, monkeypatch, budget_mib):
    """A simulated device with `budget_mib` free: 160 requests build no larger batches than 16, and every
    batch stays within the budget (or is a single item)."""
    budget = int(budget_mib * 2 ** 20)
    monkeypatch.setattr(memory, "free_bytes", lambda device: budget)
    lm = make_tiny("llama", tokenizer)
    seen = {}
    for n in (16, 160):
        run = memit_run(lm)
        with record_batches() as seen[n]:
            run.edit_batch(requests(n))
        run.restore()
    small, big = seen[16], seen[160]
    assert set(big) == set(small) == {"E2 keys", "E2 block outputs", "E3 targets", "E4 solve"}
    for stage, rec in big.items():
        per_item = rec.bytes // rec.items
        assert rec.bytes <= max(MEMORY_FRACTION * budget, per_item), f"{stage}: a batch exceeds the budget"
    # Stages whose batches the budget already capped at 16 requests do not grow with 10x the requests.
    capped = {stage for stage, rec in small.items() if rec.items < 16}
    assert "E3 targets" in capped and (budget_mib > 3 or "E2 keys" in capped), small
    for stage in capped:
        assert big[stage].items == small[stage].items, (stage, small[stage], big[stage])
        assert big[stage].batches >= 5 * small[stage].batches          # more batches instead
    # The peak (largest batch of any stage) is bounded by the budget, not by n.
    peak_small = max(r.bytes for r in small.values())
    peak_big = max(r.bytes for r in big.values())
    assert peak_big <= max(MEMORY_FRACTION * budget, peak_small)


def test_plan_batch_size_precedence(monkeypatch):
    kw = dict(n_items=1000, bytes_per_item=2 ** 20, cpu_default=32)
    assert plan_batch_size("s", device="cpu", **kw) == 32                         # CPU: the fixed default
    assert plan_batch_size("s", device="cpu", explicit=7, **kw) == 7              # explicit wins
    assert plan_batch_size("s", device="cpu", explicit=5000, **kw) == 1000        # never more than n
    monkeypatch.setattr(memory, "free_bytes", lambda device: 100 * 2 ** 20)
    assert plan_batch_size("s", device="cpu", **kw) == int(MEMORY_FRACTION * 100)  # from free memory
    assert plan_batch_size("s", device="cpu", reserve_bytes=50 * 2 ** 20, **kw) == int(MEMORY_FRACTION * 100) - 50
    assert plan_batch_size("s", device="cpu", n_items=1000, bytes_per_item=2 ** 30, cpu_default=32) == 1
    with pytest.raises(ValueError, match="batch size 0"):
        plan_batch_size("s", device="cpu", explicit=0, **kw)


# --------------------------------------------------------------------------- out of memory

def test_run_batched_halves_on_out_of_memory_and_keeps_order():
    calls = []

    def fn(part):
        calls.append(len(part))
        if len(part) > 3:
            raise oom()
        return [x * 10 for x in part]

    with record_batches() as seen:
        out = run_batched("toy", list(range(10)), fn, batch_size=8, bytes_per_item=100, device="cpu")
    assert [x for part in out for x in part] == [x * 10 for x in range(10)]
    assert calls[:3] == [8, 4, 2] and max(calls[3:]) == 2
    assert seen["toy"].items == 8                    # the largest batch attempted is recorded


def test_out_of_memory_at_batch_size_one_names_stage_size_and_memory():
    def fn(part):
        raise oom()

    with pytest.raises(DeviceMemoryError) as err:
        run_batched("E3 targets", ["a", "b"], fn, batch_size=2, bytes_per_item=3 * 2 ** 30, device="cpu")
    msg = str(err.value)
    assert "'E3 targets'" in msg and "batch size 1" in msg and "3.00 GiB" in msg and "Tried to allocate" in msg
    assert isinstance(err.value, editdecay.core.errors.EditDecayError)
    # Other errors pass through untouched.
    with pytest.raises(KeyError):
        run_batched("s", [1], lambda part: {}[0], batch_size=1, bytes_per_item=1, device="cpu")


@pytest.fixture
def oom_above():
    """Make every forward pass with more than `rows` sequences fail like a full GPU."""
    def install(lm, rows: int):
        def pre(mod, args):
            if args and args[0].shape[0] > rows:
                raise oom()
        return lm.model.get_input_embeddings().register_forward_pre_hook(pre)
    return install


def test_keys_and_targets_recover_from_out_of_memory(tokenizer, oom_above):
    lm = make_tiny("llama", tokenizer)
    reqs = requests(6)
    tmpl = context_templates(lm.model, tokenizer, n=2, length=4)
    T = len(tmpl.flat)
    want_k = compute_keys(lm.model, tokenizer, reqs, list(LAYERS), tmpl, batch_size=T)       # one request a pass
    settings = TargetSettings(layer=2, v_num_grad_steps=3)
    want_z = compute_targets(lm.model, tokenizer, reqs, tmpl, replace_batch(settings, 1), progress=False).z
    handle = oom_above(lm, 2 * (T + 1))              # 6 -> 3 -> 1 requests per batch for keys and E3
    try:
        with record_batches() as seen:
            got_k = compute_keys(lm.model, tokenizer, reqs, list(LAYERS), tmpl)        # CPU default: all 6 at once
            got_z = compute_targets(lm.model, tokenizer, reqs, tmpl, settings, progress=False).z
    finally:
        handle.remove()
    assert seen["E2 keys"].items == 6 and seen["E3 targets"].items == 6      # tried at full size first
    for l in LAYERS:
        torch.testing.assert_close(got_k[l], want_k[l], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_z, want_z, rtol=1e-6, atol=1e-6)
    assert all(p.requires_grad for p in lm.model.parameters()), "requires_grad flags restored after retries"


def replace_batch(settings: TargetSettings, size: int) -> TargetSettings:
    from dataclasses import replace

    return replace(settings, batch_size=size)


def test_solve_out_of_memory_names_the_stage(monkeypatch):
    K, R, C = torch.randn(6, 3), torch.randn(4, 3), torch.eye(6)

    def lu_factor(A):
        raise oom()

    monkeypatch.setattr(torch.linalg, "lu_factor", lu_factor)
    with pytest.raises(DeviceMemoryError, match="'E4 solve'"):
        memit_delta(K, R, C, 1.0)
    with pytest.raises(DeviceMemoryError, match="'E5 solve'"):
        nullspace_delta(K, R, C, C, 1.0)


# --------------------------------------------------------------------------- solves in key-column blocks

def _problem(d=5, d_k=9, n=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    K = torch.randn(d_k, n, generator=g, dtype=torch.float64)
    R = torch.randn(d, n, generator=g, dtype=torch.float64)
    A = torch.randn(d_k, 3 * d_k, generator=g, dtype=torch.float64)
    U = torch.linalg.eigh(A @ A.T)[1][:, :4]
    return K, R, A @ A.T / (3 * d_k), U @ U.T


def test_blocked_solves_equal_one_block():
    K, R, C, P = _problem()
    C_p = key_gram(torch.randn(9, 4, dtype=torch.float64))
    with record_batches() as seen:
        for block in (1, 4, 5):
            torch.testing.assert_close(memit_delta(K, R, C, 2.0, block_size=block), memit_delta(K, R, C, 2.0),
                                       rtol=0, atol=1e-10)
            torch.testing.assert_close(nullspace_delta(K, R, P, C_p, 3.0, block_size=block),
                                       nullspace_delta(K, R, P, C_p, 3.0), rtol=0, atol=1e-10)
            torch.testing.assert_close(key_gram(K, block_size=block), K @ K.T, rtol=0, atol=1e-10)
    assert seen["E4 solve"].items == 13 and seen["E5 solve"].items == 13
    # Precision rule: weight-sized results in the solve dtype on the CPU, float32 on accelerators.
    assert memit_delta(K.float(), R.float(), C.float(), 2.0).dtype == torch.float64
    assert output_dtype(torch.device("cuda"), torch.float64) == torch.float32
    assert output_dtype(torch.device("cpu"), torch.float64) == torch.float64


# --------------------------------------------------------------------------- devices

def test_module_device_reads_accelerates_execution_device():
    class Hook:
        execution_device = 1

    lin = torch.nn.Linear(2, 2)
    assert module_device(lin) == torch.device("cpu")
    lin._hf_hook = Hook()
    assert module_device(lin) == torch.device("cuda", 1)          # where it computes, not where weights sit
    Hook.execution_device = "cuda:3"
    assert module_device(lin) == torch.device("cuda", 3)
    assert module_device(torch.nn.ReLU()) == torch.device("cpu")   # no parameters


def test_no_code_reads_a_global_device():
    """Tensors go to the device of the module they meet: only core/devices.py asks a model where it is."""
    src = Path(editdecay.__file__).resolve().parent
    pattern = re.compile(r"next\(\s*[\w.]+\.parameters\(\)\s*\)\.device|\b(model|lm|base|self\.model)\.device\b")
    bad = [f"{p.relative_to(src)}:{i}: {line.strip()}" for p in sorted(src.rglob("*.py"))
           if p.name != "devices.py"
           for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not bad, "read the module's device via editdecay.core.devices instead:\n" + "\n".join(bad)


def _with_accelerate_hooks(lm):
    """Dispatch every block, the embedding, the final norm and the unembedding with accelerate's hooks
    (execution device CPU), as `device_map` loading does on GPUs."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    m = lm.model
    mods = [m.model.embed_tokens, *m.model.layers, m.model.norm, m.lm_head]
    for mod in mods:
        add_hook_to_module(mod, AlignDevicesHook(execution_device="cpu", io_same_device=True))
    assert all(module_device(mod) == torch.device("cpu") for mod in mods)
    return lm


def test_edit_and_metrics_under_accelerate_hooks_match_plain_model(tokenizer):
    plain, hooked = make_tiny("llama", tokenizer), _with_accelerate_hooks(make_tiny("llama", tokenizer))
    reqs = requests(4)
    outs = []
    for lm in (plain, hooked):
        run = memit_run(lm)
        run.edit_batch(reqs)
        outs.append((run.patch(), evaluate_requests(lm.model, tokenizer, reqs)))
    (p1, m1), (p2, m2) = outs
    for name in p1.deltas:
        torch.testing.assert_close(p1.deltas[name], p2.deltas[name], rtol=1e-5, atol=1e-6)
    assert [o.efficacy for o in m1] == [o.efficacy for o in m2]


@pytest.mark.parametrize("device", ["balanced", "map"])
def test_load_model_with_a_device_map(tokenizer, tmp_path, device, monkeypatch):
    """load_model(device="balanced" | {module: device}) loads through accelerate's device map; edits match."""
    from transformers import AutoModelForCausalLM

    from editdecay.core.models import load_model

    asked = {}
    original = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        asked.update(kwargs)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))

    base = make_tiny("llama", tokenizer)
    base.model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    n_layers = base.model.config.num_hidden_layers
    dmap = device if device == "balanced" else {
        "model.embed_tokens": "cpu", **{f"model.layers.{i}": "cpu" for i in range(n_layers)},
        "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    lm = load_model(str(tmp_path / "tiny"), device=dmap)
    assert asked["device_map"] == dmap, "the device map did not reach from_pretrained"
    assert input_device(lm.model) == torch.device("cpu") and lm.device == torch.device("cpu")
    reqs = requests(3)
    deltas = []
    for model in (base, lm):
        run = memit_run(model)
        run.edit_batch(reqs)
        deltas.append(run.patch().deltas)
    for name in deltas[0]:
        torch.testing.assert_close(deltas[0][name], deltas[1][name], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- the command line

@pytest.mark.slow
def test_cli_device_auto_and_out_of_memory_message(tmp_path, embedded, monkeypatch):
    """`eval-edits --device auto` gives the same metrics as --device cpu; a device that never has room
    ends with exit 2 and a message naming the stage and the batch size (no traceback)."""
    import json

    from typer.testing import CliRunner

    from editdecay.cli import _register, app

    _register()
    runner = CliRunner()
    outs = {}
    for device in ("cpu", "auto"):
        outs[device] = tmp_path / f"{device}.json"
        res = runner.invoke(app, ["eval-edits", "--limit", "3", "--device", device, "--out", str(outs[device])])
        assert res.exit_code == 0, res.output
    a, b = (json.loads(outs[d].read_text()) for d in ("cpu", "auto"))
    assert a["metrics"] == b["metrics"] and b["config"]["device"] == "auto"

    def full(self, *args, **kwargs):
        raise oom()

    monkeypatch.setattr(torch.nn.Embedding, "forward", full)
    res = runner.invoke(app, ["eval-edits", "--limit", "3"])
    text = " ".join(res.output.split())
    assert res.exit_code == 2, res.output
    assert "'E6 scoring'" in text and "batch size 1" in text and "Traceback" not in res.output
