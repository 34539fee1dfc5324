"""Every stage of a recipe on the tasks beyond text classification and causal LMs, end to end on tiny models."""

import json

import pytest

from hf_modelopt.pipeline import run_recipe
from hf_modelopt.recipe import validate_recipe
from hf_modelopt.tasks import get_task

# (task, model type, the metric its evaluation reports)
# One run takes 40-80 s on a shared 2-core machine: the default suite runs one task, the others are marked slow.
CASES = [("token-classification", "bert", "f1"),
         pytest.param("question-answering", "bert", "exact_match", marks=pytest.mark.slow),
         pytest.param("image-classification", "vit", "accuracy", marks=pytest.mark.slow)]
STAGES = [
    {"type": "evaluate", "name": "before"},
    {"type": "finetune"},
    {"type": "distill", "student": {"layers": [0]}, "ce_weight": 0.5},
    {"type": "prune", "sparsity": 0.5, "schedule": {"end_step": 2, "update_every": 1}},
    {"type": "quantize", "method": "nf4", "verify": False},  # the export's reload check covers the folder
    {"type": "evaluate", "name": "after"},
    {"type": "export", "latency_repeats": 0, "compare_base": False},
]


@pytest.mark.parametrize("task,model_type,metric", CASES)
def test_recipe_runs_every_stage(task, model_type, metric, wide_tiny_models, task_data, tmp_path):
    recipe = {"model": {"name_or_path": str(wide_tiny_models(model_type, task))}, "task": task,
              "data": {**task_data(task), "eval_batch_size": 8},
              "training": {"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 1e-3, "seed": 0,
                           "disable_tqdm": True},
              "stages": STAGES}
    result = run_recipe(validate_recipe(recipe), tmp_path / "out")
    before, after = result["metrics"][0]["metrics"], result["metrics"][-1]["metrics"]
    assert metric in before and metric in after and after["eval_samples"] == before["eval_samples"] == 12
    records = {r["type"]: r for r in result["stages"]}
    assert records["prune"]["metrics"]["sparsity"] >= 0.45
    assert records["quantize"]["metrics"]["quantized_layers"] > 0
    export = json.loads((tmp_path / "out" / "export.json").read_text())
    assert export["reload_check"]["passed"] and export["task"] == task
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"pipeline_tag: {get_task(task).pipeline_tag}" in card and get_task(task).auto_class in card
