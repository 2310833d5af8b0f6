"""benchmarks/gpu_scale.py --preset tiny: the GPU script's code paths on the CPU.

Asserts the JSON's fields and that every section and phase ran; timings are not asserted.
"""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
from support import ROOT

SCRIPT = ROOT / "benchmarks" / "gpu_scale.py"


@pytest.fixture(scope="module")
def gpu_scale():
    spec = importlib.util.spec_from_file_location("gpu_scale", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_scale"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("gpu_scale", None)


@pytest.fixture(scope="module")
def tiny_report(gpu_scale, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_scale") / "gpu_scale.json"
    gpu_scale.main(["--preset", "tiny", "--out", str(out)])
    return json.loads(out.read_text())


def test_tiny_preset_runs_every_section(gpu_scale, tiny_report):
    r = tiny_report
    assert r["kind"] == "gpu_scale" and r["preset"] == "tiny" and r["device"] == "cpu"
    assert r["errors"] == {} and r["skipped"] == {}
    assert list(r["results"]) == list(gpu_scale.SECTIONS)
    assert r["environment"]["packages"] and r["wall_seconds"] > 0
    p = gpu_scale.PRESETS["tiny"]

    stats = r["results"]["stats"]
    assert stats["layers"] == list(p.edit_layers) and stats["moment_dtype"] == "float32"
    for mode in ("tf32", "fp32"):
        assert stats[mode]["tokens_used"] == stats["tokens"] > 0 and stats[mode]["tokens_per_s"] > 0

    for editor, solve in (("memit", "E4 solve"), ("alphaedit", "E5 solve")):
        e = r["results"][editor]
        assert e["editor"] == editor and e["n_requests"] == p.n_requests and e["layers"] == list(p.edit_layers)
        assert set(e["phase_seconds"]) >= {"context", "targets", "keys", "solve"}
        assert all(v > 0 for v in e["phase_seconds"].values()), e["phase_seconds"]
        assert e["mean_target_steps"] == p.v_num_grad_steps           # random weights: no early stop
        assert {"E2 keys", "E2 block outputs", "E3 targets", solve} <= set(e["batches"])
        assert e["peak_gib"] is None                                   # no GPU memory on the CPU
    assert "E5 C_p (K K^T)" in r["results"]["alphaedit"]["batches"]
    proj = r["results"]["alphaedit"]["projector"]
    assert proj["d_k"] == p.edit_shape.intermediate and 0 <= proj["rank"] <= proj["d_k"] and proj["kind"] == "eigh"

    train = r["results"]["train"]
    assert train["batch"] == p.train_batch and train["seq_len"] == p.train_seq_len
    for method in ("full", "lora", "dora"):
        assert train[method]["tokens_per_s"] > 0 and train[method]["steps"] == p.train_warmup_steps + p.train_steps
    assert train["dora"]["n_trainable"] > train["lora"]["n_trainable"]   # DoRA adds magnitude vectors

    scale = r["results"]["scale"]
    assert scale["n_requests"] == scale["n_target"] == p.n_scale and scale["v_num_grad_steps"] == 1
    assert set(scale["phase_seconds"]) >= {"context", "targets", "keys", "solve"}
    ex = scale["extrapolated"]
    assert ex["n"] == p.n_scale and ex["targets_seconds"] > 0 and "basis" in ex
    assert ex["total_seconds"] >= ex["targets_seconds"] + ex["keys_seconds"]

    ad = r["results"]["adaptive"]
    assert ad["tokens_cap"] == p.adaptive_max_tokens and 0 < ad["tokens_used"] <= p.adaptive_max_tokens
    assert ad["stopped"] in ("converged", "max_tokens", "corpus exhausted") and len(ad["checkpoints"]) >= 2
    ft = r["results"]["fullft"]
    assert ft["tokens_per_s"] > 0 and ft["precision"]["weights"] == p.dtype
    assert ft["plan_gib"] > 0 and ft["plan_error"] is None                # no GPU peak to compare with on the CPU
    for name in ("memit", "alphaedit", "scale"):
        assert set(r["results"][name]["plan_stages_gib"]) == {"targets", "keys", "solve"}
    assert r["results"]["stats"]["tf32"]["plan_gib"] > 0 and train["full"]["plan_gib"] > 0

    goals = r["goals"]
    assert set(goals) == {"stats_tokens_per_s_5_layers", "memit_1000_edits_seconds_statistics_cached",
                          "memit_10000_edits_seconds", "memit_10000_edits_peak_gib"}
    assert goals["stats_tokens_per_s_5_layers"]["value"] == stats["tokens_per_s"]
    assert all(g["met"] is None for g in goals.values())               # the goals are for the GPU presets
    assert goals["memit_10000_edits_seconds"]["n"] == p.n_scale
    assert r["model_gib"] > 0


def test_out_of_time_sections_are_skipped_or_shrunk(gpu_scale, tmp_path):
    """With no time left, alphaedit is skipped with a reason and scale falls back to a stated extrapolation."""
    out = tmp_path / "g.json"
    gpu_scale.main(["--preset", "tiny", "--out", str(out), "--budget-s", "0.001",
                    "--sections", "stats,memit,alphaedit,scale"])
    r = json.loads(out.read_text())
    assert "alphaedit" in r["skipped"] and "budget" in r["skipped"]["alphaedit"]
    scale = r["results"]["scale"]
    assert "not run" in scale["note"] and "x 120" in scale["extrapolated"]["basis"]


def test_editing_sections_need_the_statistics(gpu_scale, tmp_path):
    out = tmp_path / "g.json"
    gpu_scale.main(["--preset", "tiny", "--out", str(out), "--sections", "memit"])
    r = json.loads(out.read_text())
    assert r["results"] == {} and "stats" in r["skipped"]["memit"]
    with pytest.raises(SystemExit):
        gpu_scale.main(["--preset", "tiny", "--out", str(out), "--sections", "stats,nonsense"])
