"""Two CPU processes under `accelerate launch` (DDP over gloo) against one process, on a tiny model."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from hf_modelopt.prune.masks import prunable_linears, sparsity_of
from tests.conftest import REPO, tiny_recipe


def _launch(recipe: Path, output: Path, processes: int, port: int):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if processes == 1:
        command = [sys.executable, str(REPO / "tests" / "ddp_worker.py"), str(recipe), str(output)]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   str(REPO / "recipes" / "accelerate" / "cpu-2proc.yaml"), "--main_process_port", str(port),
                   str(REPO / "tests" / "ddp_worker.py"), str(recipe), str(output)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_two_cpu_processes_distill_and_prune_like_one(tiny_models, sst2_files, tmp_path):
    stages = [{"type": "prune", "sparsity": 0.6, "schedule": {"end_step": 4, "update_every": 1},
               "distillation": {"kd_weight": 1.0, "ce_weight": 0.5, "cache_teacher_logits": True},
               "training": {"max_steps": 6, "per_device_train_batch_size": 4}},
              {"type": "evaluate"}]
    recipe = tiny_recipe(tiny_models("bert"), sst2_files, stages=stages)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))

    _launch(path, tmp_path / "ddp", 2, port=29531)
    ranks = [load_file(tmp_path / "ddp" / f"rank-{i}.safetensors") for i in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys()
    for key in ranks[0]:  # masks and weights bit-identical on both processes
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    assert not (tmp_path / "ddp" / ".process-1").exists()  # the other process's scratch folder is gone
    record = json.loads((tmp_path / "ddp" / "stages" / "prune" / "stage.json").read_text())

    from transformers import AutoModelForSequenceClassification

    saved = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ddp")
    assert abs(sparsity_of(prunable_linears(saved)) - 0.6) < 1e-3
    assert record["metrics"]["sparsity"] == pytest.approx(0.6, abs=1e-3)

    # One process with the same global batch (2 × 4 = 8) gives the same model up to float reordering.
    single = json.loads(json.dumps(recipe))
    single["stages"][0]["training"]["per_device_train_batch_size"] = 8
    single_path = tmp_path / "single.yaml"
    single_path.write_text(yaml.safe_dump(single))
    _launch(single_path, tmp_path / "one", 1, port=0)
    metrics = [json.loads((tmp_path / d / "metrics.json").read_text())[-1]["metrics"] for d in ("ddp", "one")]
    assert metrics[0]["accuracy"] == pytest.approx(metrics[1]["accuracy"], abs=1 / 32 + 1e-9)


def test_masks_act_on_fsdp2_sharded_parameters(tiny_models, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
               str(REPO / "tests" / "fsdp2_worker.py"), str(tiny_models("bert")), str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"fsdp2-rank-{i}.json").read_text()) for i in (0, 1)]
    assert all(r["sharded"] for r in ranks)  # the weights really are DTensors split over both processes
    assert all(r["after_step"] < 0.7 for r in ranks)  # the optimizer step undid some zeros...
    assert all(r["sparsity"] == pytest.approx(0.7, abs=1e-3) for r in ranks)  # ...the masks put them back
    assert ranks[0]["checksum"] == ranks[1]["checksum"]
    # Saved from sharded parameters: whole weights, with the masks' zeros.
    from transformers import AutoModelForSequenceClassification

    saved = AutoModelForSequenceClassification.from_pretrained(tmp_path / "saved")
    original = AutoModelForSequenceClassification.from_pretrained(tiny_models("bert"))
    assert {k: v.shape for k, v in saved.state_dict().items()} == {k: v.shape for k, v in original.state_dict().items()}
    assert sparsity_of(prunable_linears(saved)) == pytest.approx(0.7, abs=1e-3)


def test_masks_act_on_zero3_partitioned_parameters(tiny_models, tmp_path):
    pytest.importorskip("deepspeed")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29539",
               str(REPO / "tests" / "zero3_worker.py"), str(tiny_models("bert")), str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"zero3-rank-{i}.json").read_text()) for i in (0, 1)]
    assert all(r["partitioned"] for r in ranks)  # each process holds slices only: weight.numel() == 0
    assert all(r["after_step"] < 0.7 for r in ranks)  # the optimizer step undid some zeros...
    assert all(r["sparsity"] == pytest.approx(0.7, abs=1e-3) for r in ranks)  # ...the masks put them back
    assert all(r["masters_zero"] for r in ranks)  # in the optimizer's fp32 copy too
    assert ranks[0]["checksum"] == ranks[1]["checksum"]
    from transformers import AutoModelForSequenceClassification

    saved = AutoModelForSequenceClassification.from_pretrained(tmp_path / "saved")
    original = AutoModelForSequenceClassification.from_pretrained(tiny_models("bert"))
    assert {k: v.shape for k, v in saved.state_dict().items()} == {k: v.shape for k, v in original.state_dict().items()}
    assert sparsity_of(prunable_linears(saved)) == pytest.approx(0.7, abs=1e-3)


@pytest.mark.parametrize("config, running", [("fsdp2", "MULTI_CPU"), ("deepspeed-zero3", "DEEPSPEED ZeRO-3")])
def test_fsdp_and_zero3_configs_on_cpu_run_distill_and_prune(config, running, tiny_models, sst2_files, tmp_path):
    """What runs is what the log says: FSDP on CPU is plain DDP (and warned about), ZeRO-3 really partitions."""
    if config.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
    # Structured pruning first: layer shapes the config cannot describe, which the gathered model must keep.
    stages = [{"type": "prune_structured", "heads": 0.5, "neurons": 0.5, "training": {"max_steps": 2}},
              {"type": "prune", "sparsity": 0.6, "schedule": {"end_step": 4, "update_every": 1},
               "distillation": {"kd_weight": 1.0, "ce_weight": 0.5}, "training": {"max_steps": 6}}, "evaluate"]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tiny_models("bert"), sst2_files, stages=stages, verify_export=False)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "recipes" / "accelerate" / f"{config}.yaml"), "--mixed_precision", "no",
               "--main_process_port", "29547", str(REPO / "scripts" / "run_recipe.py"), str(path),
               "--output-dir", str(tmp_path / "out")]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert f"prune: training in 2 processes, {running}" in log
    assert ("the launch asked for FSDP, but accelerate runs MULTI_CPU" in log) == (config == "fsdp2")
    from transformers import AutoModelForSequenceClassification

    saved = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    assert saved.bert.encoder.layer[0].intermediate.dense.out_features == 32  # of 64
    sizes = [m.weight.numel() for m in prunable_linears(saved).values()]  # ⌈0.6 n⌉ dropped per layer
    assert sparsity_of(prunable_linears(saved)) == sum(math.ceil(0.6 * n) for n in sizes) / sum(sizes)
