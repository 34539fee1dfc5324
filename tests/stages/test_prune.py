import json

import pytest
from transformers import AutoModelForSequenceClassification

from hf_modelopt.pipeline import run_recipe
from hf_modelopt.prune.masks import prunable_linears, sparsity_of
from hf_modelopt.recipe import RecipeError, validate_recipe
from tests.conftest import tiny_recipe


@pytest.mark.parametrize("distillation", [None, {"kd_weight": 1.0, "ce_weight": 0.5, "cache_teacher_logits": True}])
def test_prune_stage_reaches_the_target_in_the_exported_model(tiny_models, sst2_files, tmp_path, distillation):
    stage = {"type": "prune", "sparsity": 0.75, "schedule": {"end_step": 4, "update_every": 1},
             "training": {"max_steps": 6}}
    if distillation:
        stage["distillation"] = distillation
    recipe = tiny_recipe(tiny_models("bert"), sst2_files, stages=[stage, {"type": "evaluate"}])
    run_recipe(validate_recipe(recipe), tmp_path / "out")
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    assert abs(sparsity_of(prunable_linears(model)) - 0.75) < 1e-3
    report = json.loads((tmp_path / "out" / "stages" / "prune" / "sparsity.json").read_text())
    assert abs(report["sparsity"] - 0.75) < 1e-3


@pytest.mark.parametrize("bad,message", [
    ({"sparsity": 1.0}, "sparsity"),
    ({"sparsity": 0.5, "schedule": {"start_step": 10, "end_step": 5}}, "end_step"),
    ({"sparsity": 0.5, "metod": "magnitude"}, "metod"),
])
def test_bad_prune_settings_are_refused(tiny_models, sst2_files, bad, message):
    with pytest.raises(RecipeError, match=message):
        validate_recipe(tiny_recipe(tiny_models("bert"), sst2_files, stages=[{"type": "prune", **bad}]))


@pytest.mark.parametrize("model_type,task", [("bert", "text-classification"), ("llama", "causal-lm")])
def test_prune_structured_stage_shrinks_and_exports_a_loadable_model(tiny_models, sst2_files, tmp_path,
                                                                    model_type, task):
    from hf_modelopt.export.verify import verify_reload
    from hf_modelopt.modeling import auto_model_class

    stage = {"type": "prune_structured", "heads": 0.5, "neurons": 0.5, "calibration_batches": 2,
             "distillation": {"kd_weight": 1.0}, "training": {"max_steps": 2}}
    recipe = tiny_recipe(tiny_models(model_type, task), sst2_files, task=task, stages=[stage, {"type": "evaluate"}])
    result = run_recipe(validate_recipe(recipe), tmp_path / "out")
    record = next(r for r in result["stages"] if r["type"] == "prune_structured")
    assert record["metrics"]["parameters"] < record["metrics"]["parameters_before"]
    model = auto_model_class(task).from_pretrained(tmp_path / "out")
    assert model.config.num_hidden_layers == 2
    from transformers import AutoTokenizer

    verify_reload(tmp_path / "out", model, AutoTokenizer.from_pretrained(tmp_path / "out"), task, atol=1e-5)


def test_pruned_exports_are_verified_and_load_per_the_matrix(tiny_models, sst2_files, tmp_path):
    import json as json_module

    from hf_modelopt.formats.detect import detect_format

    # A structurally pruned BERT (hook format) and a sparse export of an unstructured one, both verified.
    structured = [{"type": "prune_structured", "heads": 0.5, "importance": "magnitude", "recover": False},
                  {"type": "evaluate"}]
    run_recipe(validate_recipe(tiny_recipe(tiny_models("bert"), sst2_files, stages=structured)), tmp_path / "s")
    sparse = [{"type": "prune", "sparsity": 0.8, "schedule": {"kind": "one_shot"}, "training": {"max_steps": 2}},
              {"type": "evaluate"}, {"type": "export", "sparse": True, "latency_repeats": 0}]
    run_recipe(validate_recipe(tiny_recipe(tiny_models("bert"), sst2_files, stages=sparse)), tmp_path / "u")
    for folder in (tmp_path / "s", tmp_path / "u"):
        record = json_module.loads((folder / "export.json").read_text())
        assert detect_format(folder).loads_with == "hf_modelopt"
        assert record["reload_check"]["passed"] and record["reload_check"]["max_abs_diff"] < 1e-4
    assert "weight_bitmask" in str(list((tmp_path / "u").glob("*.safetensors"))[0].read_bytes()[:20000])


def test_kd_teacher_can_be_an_earlier_stage_model(tiny_models, sst2_files, tmp_path, monkeypatch):
    from hf_modelopt.stages import prune as prune_stage

    teachers = []
    original = prune_stage.kd_teacher
    monkeypatch.setattr(prune_stage, "kd_teacher", lambda *a: teachers.append(original(*a)) or teachers[-1])
    stages = [{"type": "finetune", "training": {"max_steps": 2}},
              {"type": "distill", "student": {"layers": [0]}, "training": {"max_steps": 2}},
              {"type": "prune_structured", "heads": 0.5, "neurons": 0.5, "teacher": "finetune",
               "distillation": {"kd_weight": 1.0}, "training": {"max_steps": 2}}]
    run_recipe(validate_recipe(tiny_recipe(tiny_models("bert"), sst2_files, stages=stages)), tmp_path / "out")
    finetuned = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out" / "stages" / "finetune" / "model")
    (teacher,) = teachers
    assert teacher.config.num_hidden_layers == 2  # the fine-tuned model, not the 1-layer student
    for (name, a), b in zip(finetuned.state_dict().items(), teacher.state_dict().values()):
        assert (a == b).all(), name


@pytest.mark.parametrize("stage, message", [
    ({"teacher": "nowhere", "distillation": {}}, "no earlier stage named 'nowhere' produced a model"),
    ({"teacher": "finetune"}, "set distillation: as well"),
])
def test_kd_teacher_must_be_an_earlier_model_stage(tiny_models, sst2_files, stage, message):
    stages = ["finetune", "evaluate", {"type": "prune", "sparsity": 0.5, **stage}]
    with pytest.raises(RecipeError, match=message):
        validate_recipe(tiny_recipe(tiny_models("bert"), sst2_files, stages=stages))
