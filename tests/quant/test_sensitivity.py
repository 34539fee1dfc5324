import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_modelopt.quant.sensitivity import (
    UnitSensitivity,
    bytes_per_weight,
    choose_kept_units,
    fake_quantize_weight,
    scan_units,
    sensitivity_scan,
    write_sensitivity_report,
)

from ..conftest import REPO


def test_units_group_layers_by_block():
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj", "model.layers.10.mlp.up_proj",
             "bert.encoder.layer.1.output.dense", "bert.pooler.dense"]
    assert scan_units(names, "block") == {
        "model.layers.0": names[:2], "model.layers.10": [names[2]], "bert.encoder.layer.1": [names[3]],
        "bert.pooler.dense": [names[4]]}
    assert list(scan_units(names, "layer")) == names


@pytest.mark.parametrize("method", ["int8", "nf4", "fp4"])
def test_fake_quantization_is_close_and_idempotent(method):
    torch.manual_seed(0)
    weight = torch.randn(64, 128)
    once = fake_quantize_weight(weight, method)
    assert once.shape == weight.shape and once.dtype == weight.dtype
    assert not torch.equal(once, weight)
    assert (once - weight).abs().mean() < (0.02 if method == "int8" else 0.2)
    assert torch.allclose(fake_quantize_weight(once, method), once, atol=1e-5)  # on the grid already


def _units(*kls):
    return [UnitSensitivity(unit=f"u{i}", layers=[f"u{i}.l"], parameters=1_000_000, kl=kl, loss=0.0,
                            loss_delta=0.0) for i, kl in enumerate(kls)]


def test_kept_units_follow_sensitivity_within_the_budget():
    extra = 1_000_000 * (4 - bytes_per_weight("nf4")) / 1e6  # MB one unit adds when kept in fp32
    units = _units(0.3, 0.2, 0.1)
    assert choose_kept_units(units, 10_000_000, "nf4", False, max_size_mb=10 + 2 * extra + 0.01) == ["u0", "u1"]
    assert [u.kept for u in units] == [True, True, False]
    assert choose_kept_units(_units(0.3, 0.2, 0.1), 10_000_000, "nf4", False, max_size_mb=9) == []
    assert choose_kept_units(_units(0.3, 0.2, 0.1, 0.05), 0, "int8", False, keep_fraction=0.5) == ["u0", "u1"]


def test_scan_measures_each_block_and_restores_the_weights(wide_tiny_models, tmp_path):
    folder = wide_tiny_models("llama", "causal-lm")
    model = AutoModelForCausalLM.from_pretrained(folder)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tokenizer = AutoTokenizer.from_pretrained(folder)
    encoded = tokenizer(["the cat sat on the mat and looked at the dog", "a quick brown fox jumps"] * 2,
                        padding=True, return_tensors="pt")
    batches = [{**encoded, "labels": encoded["input_ids"]}]
    candidates = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear and n != "lm_head"]
    results = sensitivity_scan(model, batches, "nf4", candidates, "block")
    assert [r.unit for r in sorted(results, key=lambda r: r.unit)] == ["model.layers.0", "model.layers.1"]
    assert all(r.kl > 0 and len(r.layers) == 7 for r in results)
    assert results[0].kl >= results[1].kl
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    results[0].kept = True
    paths = write_sensitivity_report(results, tmp_path, "nf4")
    assert json.loads(paths["json"].read_text())[0]["kept"] is True
    assert "| `model.layers" in paths["markdown"].read_text()
    assert paths["plot"].read_bytes()[:4] == b"\x89PNG"


def test_sensitivity_scan_units_are_shared_out_over_two_processes(wide_tiny_models, tmp_path):
    folder = wide_tiny_models("llama", "causal-lm")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    worker = str(REPO / "tests" / "sensitivity_worker.py")
    (tmp_path / "two").mkdir()
    (tmp_path / "one").mkdir()
    for command, output in (
            ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29535"], "two"),
            ([sys.executable], "one")):
        result = subprocess.run(command + [worker, str(folder), str(tmp_path / output)], capture_output=True,
                                text=True, env=env, cwd=REPO, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "sensitivity-rank-0.json").read_text())
    ranks = [json.loads((tmp_path / "two" / f"sensitivity-rank-{i}.json").read_text()) for i in (0, 1)]
    everything = [r["unit"] for r in one["results"]]
    assert len(everything) == 14 and sorted(one["measured"]) == sorted(everything)
    # Each process measured half of the units, and ended with every unit's result, as one process does.
    assert sorted(ranks[0]["measured"] + ranks[1]["measured"]) == sorted(everything)
    assert len(ranks[0]["measured"]) == len(ranks[1]["measured"]) == 7
    for rank in ranks:
        assert [r["unit"] for r in rank["results"]] == everything
        for mine, alone in zip(rank["results"], one["results"]):
            assert mine["kl"] == pytest.approx(alone["kl"], rel=1e-6)
            assert mine["loss"] == pytest.approx(alone["loss"], rel=1e-6)
