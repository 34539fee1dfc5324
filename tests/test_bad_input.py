"""Bad input is refused before any work, by `hf-modelopt run`, with one `error:` line naming it (README table).

The CLI's `main()` runs in this process (a subprocess per case would cost seconds each; `tests/test_cli.py`
checks the same path in subprocesses). Each case asserts the line names the key / file / column at fault.
"""

import json
import logging
import shutil

import pytest
import yaml

from hf_modelopt.cli import main
from hf_modelopt.pipeline import preflight
from hf_modelopt.recipe import validate_recipe
from hf_modelopt.stages import STAGES, StageConfig, StageSpec

from .conftest import tiny_recipe


def refused(tmp_path, capsys, data, *options, output=None):
    """Run the recipe `data` through the CLI; assert it failed with one error line and wrote nothing."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(data))
    output = output or tmp_path / "out"
    existed = output.exists()
    capsys.readouterr()
    assert main(["run", str(recipe), "--output-dir", str(output), *options]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    assert output.exists() == existed and not (output / "stages").exists()
    return errors[0]


@pytest.fixture
def good(tiny_models, sst2_files):
    return tiny_recipe(tiny_models("bert"), sst2_files, stages=["finetune", "evaluate"])


def test_out_of_range_values(good, tmp_path, capsys):
    good["training"]["learning_rate"] = -0.1
    assert "training.learning_rate: input should be greater than or equal to 0, got -0.1" in refused(
        tmp_path, capsys, good)
    good["training"]["learning_rate"] = 1e-3
    good["stages"] = [{"type": "distill", "student": {"layers": [0]}, "temperature": 0}]
    assert "stages[0].temperature: input should be greater than 0, got 0" in refused(tmp_path, capsys, good)
    good["stages"] = ["evaluate"]
    good["data"]["eval_fraction"] = 1.5
    assert "data.eval_fraction: input should be less than 1, got 1.5" in refused(tmp_path, capsys, good)


def test_contradictory_training_arguments(good, tmp_path, capsys):
    good["stages"] = [{"type": "finetune", "training": {"load_best_model_at_end": True, "eval_strategy": "steps",
                                                        "save_strategy": "epoch"}}, "evaluate"]
    error = refused(tmp_path, capsys, good)
    assert "stages[0].training: --load_best_model_at_end requires the save and eval strategy to match" in error


def test_training_after_quantization(good, tmp_path, capsys, monkeypatch):
    if "quantize" not in STAGES:  # the quantize stage lives on its own branch; the check is keyed on its name
        monkeypatch.setitem(STAGES, "quantize", StageSpec(StageConfig, lambda state, config, context: state,
                                                          True, True))
    good["stages"] = ["quantize", "finetune"]
    error = refused(tmp_path, capsys, good)
    assert "stages[1]: a finetune stage trains every weight, but stage 'quantize' before it quantized them" in error
    good["stages"] = ["quantize", {"type": "distill", "student": {"every": 2}}]
    assert "stages[1]: a distill stage trains every weight" in refused(tmp_path, capsys, good)


@pytest.mark.parametrize("name", ["../escape", "/tmp/elsewhere", "..", "a\\..\\b"])
def test_stage_names_cannot_leave_the_output_folder(good, tmp_path, capsys, name):
    good["stages"] = [{"type": "finetune", "name": name}]
    assert f"stages[0].name: stage names cannot contain '/' or '\\' or start with '.': {name!r}" in refused(
        tmp_path, capsys, good)


@pytest.mark.parametrize("key", ["hub_token", "push_to_hub"])
def test_training_arguments_that_write_elsewhere_or_hold_secrets(good, tmp_path, capsys, key):
    good["training"][key] = "hf_secret" if key == "hub_token" else True
    assert f"training.{key}: " in refused(tmp_path, capsys, good)


def test_model_without_a_head_for_the_task(tiny_models, sst2_files, tmp_path, capsys):
    data = tiny_recipe(tiny_models("distilbert", "text-classification"), sst2_files, task="causal-lm",
                       stages=["finetune"])
    error = refused(tmp_path, capsys, data)
    assert "model.name_or_path: " in error and "is a 'distilbert' model, which has no causal-lm head" in error


def test_classifier_checkpoint_as_causal_lm(tiny_models, sst2_files, tmp_path, capsys):
    data = tiny_recipe(tiny_models("bert"), sst2_files, task="causal-lm", stages=["evaluate"])
    assert "is a sequence classifier (BertForSequenceClassification)" in refused(tmp_path, capsys, data)


def test_classifier_head_for_another_number_of_classes(good, sst2_files, tmp_path, capsys):
    rows = ["sentence\tlabel"] + [f"sentence number {i}\t{i % 3}" for i in range(12)]
    (sst2_files / "three.tsv").write_text("\n".join(rows) + "\n")
    good["data"]["train_file"] = "three.tsv"
    error = refused(tmp_path, capsys, good)
    assert "model.name_or_path: " in error and "has a classification head for 2 classes, but the data's labels " \
        "have 3" in error


def with_labels(folder, target, id2label):
    shutil.copytree(folder, target)
    config = json.loads((target / "config.json").read_text())
    config["id2label"], config["label2id"] = id2label, {v: int(k) for k, v in id2label.items()}
    (target / "config.json").write_text(json.dumps(config))
    return target


def test_teacher_and_student_with_other_classes(tiny_models, sst2_files, tmp_path, capsys):
    bert = tiny_models("bert")
    teacher = with_labels(bert, tmp_path / "teacher", {"0": "negative", "1": "positive"})
    student = with_labels(bert, tmp_path / "student", {"0": "positive", "1": "negative"})
    data = tiny_recipe(teacher, sst2_files, stages=[{"type": "distill", "student": {"name_or_path": str(student)}}])
    error = refused(tmp_path, capsys, data)
    assert "distill.student.name_or_path: the student's classes {0: 'positive', 1: 'negative'} are not the " \
        "teacher's {0: 'negative', 1: 'positive'}" in error


def test_empty_data(good, sst2_files, tmp_path, capsys):
    (sst2_files / "header-only.tsv").write_text("sentence\tlabel\n")
    good["data"]["train_file"] = "header-only.tsv"
    assert "the train split is empty" in refused(tmp_path, capsys, good)


def test_missing_data_file_and_split(good, tmp_path, capsys):
    good["data"]["train_file"] = "sst2/trian.tsv"
    assert "data.train_file: file not found: " in refused(tmp_path, capsys, good)
    del good["data"]["train_file"]
    assert "data.train_file: a stage needs this split" in refused(tmp_path, capsys, good)


def test_column_not_found(good, tmp_path, capsys):
    good["data"]["text_column"] = "text"
    error = refused(tmp_path, capsys, good)
    assert "data.text_column: column 'text' not found in " in error and "its columns are: sentence, label" in error


def test_output_folder_rule(good, tmp_path, capsys):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    error = refused(tmp_path, capsys, good, output=occupied)
    assert f"--output-dir {occupied}: not empty and not an earlier hf-modelopt run" in error
    assert f"--resume: {tmp_path / 'fresh'} holds no earlier hf-modelopt run" in refused(
        tmp_path, capsys, good, "--resume", output=tmp_path / "fresh")


def test_overwrite_writes_into_a_non_empty_folder_and_leaves_other_files(good, tmp_path):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    good["stages"] = ["evaluate"]
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(good))
    assert main(["run", str(tmp_path / "r.yaml"), "--output-dir", str(occupied), "--overwrite"]) == 0
    assert (occupied / "notes.txt").read_text() == "mine" and (occupied / "model.safetensors").is_file()
    # Now an earlier run: used again without --overwrite (stage reuse, --resume).
    assert main(["run", str(tmp_path / "r.yaml"), "--output-dir", str(occupied)]) == 0


def test_trust_remote_code_is_logged(good, caplog):
    good["model"]["trust_remote_code"] = True
    with caplog.at_level(logging.WARNING, logger="hf_modelopt"):
        preflight(validate_recipe(good))
    assert any("trust_remote_code is on" in record.getMessage() for record in caplog.records)
