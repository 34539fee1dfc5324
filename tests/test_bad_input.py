"""Bad input is refused before any work, by `hf-modelopt run`, with one `error:` line naming it (README table).

The CLI's `main()` runs in this process (a subprocess per case would cost seconds each; `tests/test_cli.py`
checks the same path in subprocesses). Each case asserts the line names the key / file / column at fault.
"""

import json
import logging
import os
import shutil
import subprocess
import sys
import time

import pytest
import yaml

from hf_modelopt.cli import main
from hf_modelopt.pipeline import preflight
from hf_modelopt.recipe import RecipeError, load_recipe, validate_recipe

from .conftest import REPO, tiny_recipe


def refused(tmp_path, capsys, data, *options, output=None):
    """Run the recipe `data` (a mapping, or the file's raw bytes) through the CLI; assert it failed with one error
    line and wrote nothing."""
    recipe = tmp_path / "r.yaml"
    if isinstance(data, bytes):
        recipe.write_bytes(data)
    else:
        recipe.write_text(yaml.safe_dump(data))
    output = output or tmp_path / "out"
    existed = output.exists()
    capsys.readouterr()
    assert main(["run", str(recipe), "--output-dir", str(output), *options]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    assert output.exists() == existed and not (output / "stages").exists()
    return errors[0]


def refused_command(capsys, *argv):
    """Run another CLI command; assert it exited 2 with one line on stderr, which is returned."""
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()
             and not line.startswith("[hf-modelopt]")]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


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


def test_training_after_quantization(good, tmp_path, capsys):
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


# --------------------------------------------------------------------------- issue 28: bounded, finite, ordered input


@pytest.mark.parametrize("where, value", [("training", float("inf")), ("training", float("nan")),
                                          ("stage", float("inf")), ("stage", float("-inf"))])
def test_non_finite_numbers(good, tmp_path, capsys, where, value):
    # `.inf` trained to all-NaN weights, cached the stage, and the export blamed "different logits".
    if where == "training":
        good["training"]["learning_rate"] = value
        assert f"r.yaml: training.learning_rate: must be a finite number, got {value}" in refused(tmp_path, capsys,
                                                                                                  good)
    else:
        good["stages"] = [{"type": "distill", "student": {"layers": [0]}, "temperature": value}]
        assert f"r.yaml: stages[0].temperature: must be a finite number, got {value}" in refused(tmp_path, capsys,
                                                                                                 good)


def test_non_finite_numbers_from_the_command_line(good, tmp_path, capsys):
    # YAML reads `inf` (no dot) as text, which pydantic would turn into a float: refused as well.
    assert "--set training.learning_rate: training.learning_rate: input should be a finite number, got 'inf'" in \
        refused(tmp_path, capsys, good, "--set", "training.learning_rate=inf")
    good["stages"] = [{"type": "finetune"}]
    assert "--set stages.0.training.weight_decay: stages[0].training.weight_decay: must be a finite number, got " \
        "nan" in refused(tmp_path, capsys, good, "--set", "stages.0.training.weight_decay=.nan")


def test_absurd_learning_rate(good, tmp_path, capsys):
    good["training"]["learning_rate"] = 5e2  # meant 5e-2
    assert "training.learning_rate: input should be less than or equal to 10, got 500.0" in refused(
        tmp_path, capsys, good)


def test_a_stage_after_export(good, tmp_path, capsys):
    # [export, finetune] exited 0 having exported the untrained base model while the summary listed finetune.
    good["stages"] = ["export", "finetune"]
    assert "r.yaml: stages[1]: stage 'export' must be the last stage: what runs after it would not be in its " \
        "output; move this finetune stage before it" in refused(tmp_path, capsys, good)
    good["stages"] = [{"type": "export", "name": "final"}, "evaluate"]
    assert "stages[1]: stage 'final' (export) must be the last stage" in refused(tmp_path, capsys, good)


def test_two_storage_stages(good, tmp_path, capsys):
    good["stages"] = ["quantize_storage", {"type": "quantize_storage", "name": "again", "linear_bits": 4}]
    assert "r.yaml: stages[1]: stage 'quantize_storage' before it already stored the weights quantized" in \
        refused(tmp_path, capsys, good)


@pytest.mark.parametrize("scheduler, key, allowed", [
    ("cosine", "num_cycle", "expected one of: num_cycles, last_epoch"),
    ("linear", "num_cycles", "expected one of: last_epoch"),
    ("constant", "num_cycles", "that scheduler takes none"),
    ("reduce_lr_on_plateau", "patient", "expected one of: mode, factor, patience, threshold, threshold_mode, "
                                        "cooldown, min_lr, eps"),
])
def test_unknown_scheduler_arguments(good, tmp_path, capsys, scheduler, key, allowed):
    # Transformers hands lr_scheduler_kwargs to the scheduler only when training starts (a TypeError then, or for
    # `constant`, silently ignored).
    good["stages"] = [{"type": "finetune", "training": {"lr_scheduler_type": scheduler,
                                                        "lr_scheduler_kwargs": {key: 2}}}]
    error = refused(tmp_path, capsys, good)
    assert f"stages[0].training.lr_scheduler_kwargs.{key}: unknown argument of the '{scheduler}' learning-rate " \
        f"scheduler; {allowed}" in error


def test_scheduler_arguments_that_fit_are_accepted(good):
    good["training"]["lr_scheduler_kwargs"] = {"num_cycles": 0.25}  # for the stage's scheduler, set below
    good["stages"] = [{"type": "finetune", "training": {"lr_scheduler_type": "cosine"}}]
    validate_recipe(good)
    good["stages"] = [{"type": "finetune", "training": {"lr_scheduler_type": "polynomial"}}]
    with pytest.raises(RecipeError, match=r"^<python>: training\.lr_scheduler_kwargs\.num_cycles: unknown argument "
                                          "of the 'polynomial'"):
        validate_recipe(good)


@pytest.mark.parametrize("name", ["a\x00b", "two\nlines", "esc\x1b[31m", "x" * 500])
def test_stage_names_with_control_characters_or_too_long(good, tmp_path, capsys, name):
    good["stages"] = [{"type": "finetune", "name": name}]
    error = refused(tmp_path, capsys, good)
    assert "stages[0].name: stage names are at most 100 printable characters (no control characters): " in error
    quoted = error.split("(no control characters): ", 1)[1]
    assert len(quoted) <= 90  # the 500-character name is quoted cut short (the tmp path before it varies)


@pytest.mark.parametrize("override", ["training.learning_rate=[1", "data.text_column={a: *b}",
                                      "training.seed=" + "[" * 20_000])
def test_bad_yaml_in_set(good, tmp_path, capsys, override):
    key = override.split("=")[0]
    error = refused(tmp_path, capsys, good, "--set", override)
    assert error.startswith(f"error: --set {key}: invalid YAML at line 1, column ")
    assert len(error) < 300  # the 20,000 brackets are not echoed


def test_non_utf8_recipe(good, tmp_path, capsys):
    text = yaml.safe_dump(good).encode() + "# café\n".encode("latin-1")  # é is one byte in Latin-1
    offset = text.index(b"\xe9")
    assert f"r.yaml: not UTF-8 text: byte {offset} is b'\\xe9'; save the recipe as UTF-8" in refused(
        tmp_path, capsys, text)


def test_deep_nesting(good, tmp_path, capsys):
    # PyYAML's composer recurses once per level: 20,000 levels used to end in a RecursionError traceback.
    deep = yaml.safe_dump(good).encode() + b"extra: " + b"[" * 20_000 + b"]" * 20_000 + b"\n"
    assert "r.yaml: invalid YAML at line " in (error := refused(tmp_path, capsys, deep))
    assert error.endswith("nested deeper than 64 levels")
    nested = "{a: " * 64 + "1" + "}" * 64  # 65 levels with the top mapping
    assert "nested deeper than 64 levels" in refused(tmp_path, capsys, f"description: x\nb: {nested}\n".encode())


def test_alias_bomb(good, tmp_path, capsys):
    # 9 levels of 9 aliases each: ~400 bytes that expand to 9^9 = 387 million strings (minutes, then pydantic).
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    bomb = "\n".join(lines).encode() + b"\n"
    assert len(bomb) < 500
    start = time.perf_counter()
    error = refused(tmp_path, capsys, bomb)
    assert time.perf_counter() - start < 10
    assert "r.yaml: invalid YAML at line 6, column 5: expands to more than 100,000 values once its aliases (*name) " \
        "are expanded" in error
    assert "an alias refers to a node that contains it" in refused(tmp_path, capsys, b"a: &a [1, *a]\n")
    # Aliases that stay small keep working: one anchored mapping used twice.
    rest = yaml.safe_dump({key: value for key, value in good.items() if key not in ("training", "stages")})
    (tmp_path / "ok.yaml").write_text(rest + "training: &t {max_steps: 2, seed: 0}\n"
                                      "stages: [{type: finetune, training: *t}]\n")
    assert load_recipe(tmp_path / "ok.yaml").resolved_stages[0].config.training == {"max_steps": 2, "seed": 0}


def test_recipe_too_large(good, tmp_path, capsys):
    big = yaml.safe_dump(good).encode() + b"# " + b"x" * (1 << 20) + b"\n"
    assert f"r.yaml: {len(big):,} bytes: a recipe is at most 1,048,576 bytes" in refused(tmp_path, capsys, big)


def test_long_values_are_quoted_cut_short(good, tmp_path, capsys):
    good["stages"] = [{"type": "finetune", "name": ["x" * 10_000] * 100}]
    error = refused(tmp_path, capsys, good)
    assert "stages[0].name: input should be a valid string, got ['xxx" in error and len(error) < 250


def stored_export(tiny_models, folder, **changes):
    """A tiny BERT saved with int8 group-wise storage, its quantization_config then edited with `changes`."""
    from transformers import AutoModelForSequenceClassification

    from hf_modelopt.formats.hf_modelopt import save_with_quantized_storage

    model = AutoModelForSequenceClassification.from_pretrained(tiny_models("bert"))
    save_with_quantized_storage(model, folder, linear_bits=8, embedding_bits=8)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"].update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("changes, key, message", [
    ({"group_size": 600_000_000}, "group_size", "600000000 is larger than every stored weight of the model"),
    ({"group_size": 128}, "group_size", "128 does not fit "),
    ({"group_size": -1}, "group_size", "expected a positive integer, got -1"),
    ({"layer_shapes": {"bert.encoder.layer.0.intermediate.dense": [100_000, 100_000]}},
     "layer_shapes.bert.encoder.layer.0.intermediate.dense", "[100000, 100000] does not match the stored weight"),
])
def test_crafted_sizes_in_an_export(tiny_models, tmp_path, capsys, changes, key, message):
    # group_size 600,000,000 in a 4 MB export made from_pretrained allocate 5 GB, then try 38 GB.
    folder = stored_export(tiny_models, tmp_path / "crafted", **changes)
    error = refused_command(capsys, "inspect", folder)
    assert error.startswith(f"error: {folder}/config.json: quantization_config.{key}: ") and message in error


def remote_code_model(tiny_models, folder):
    """A tiny model whose config names its own code (`auto_map`), which leaves a marker file when it runs."""
    shutil.copytree(tiny_models("bert"), folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="remote-bert", auto_map={"AutoConfig": "remote.RemoteConfig",
                                                      "AutoModelForSequenceClassification": "remote.RemoteModel"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "remote.py").write_text(
        "import pathlib\n"
        f"pathlib.Path({str(folder / 'RAN')!r}).write_text('the model\\'s own code ran')\n"
        "from transformers import BertConfig, BertForSequenceClassification\n"
        "class RemoteConfig(BertConfig):\n    model_type = 'remote-bert'\n"
        "class RemoteModel(BertForSequenceClassification):\n    config_class = RemoteConfig\n")
    return folder


def test_remote_code_needs_the_flag(tiny_models, sst2_files, tmp_path, capsys):
    model = remote_code_model(tiny_models, tmp_path / "remote")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tiny_models("bert"), sst2_files, stages=["evaluate"])))
    hint = "the model ships its own Python code (auto_map in its config), which runs when it loads; nothing was " \
        "run. If you trust its author, pass --trust-remote-code"
    for argv in (["inspect", model], ["bench", model, "--no-memory", "--repeats", "1", "--batch-sizes", "1"],
                 ["eval", model, "--recipe", recipe]):
        assert refused_command(capsys, *argv) == f"error: {model}: {hint}"
    data = tiny_recipe(model, sst2_files, stages=["evaluate"])
    assert refused(tmp_path, capsys, data).endswith("If you trust its author, set model.trust_remote_code: true "
                                                    "in the recipe")
    assert not (model / "RAN").exists()
    capsys.readouterr()
    assert main(["inspect", str(model), "--trust-remote-code"]) == 0
    assert (model / "RAN").exists()


def test_remote_code_is_never_prompted_for(tiny_models, tmp_path):
    # transformers asks "[y/N]" on a terminal when trust_remote_code is None: run the real CLI on one.
    import pty

    model = remote_code_model(tiny_models, tmp_path / "remote")
    leader, follower = pty.openpty()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "hf_modelopt.cli", "inspect", str(model)], stdin=follower,
                          capture_output=True, text=True, env=env, timeout=120)
    os.close(leader)
    os.close(follower)
    assert done.returncode == 2 and "[y/N]" not in done.stdout + done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: {model}: the model ships its own Python code")
    assert "Traceback" not in done.stderr and not (model / "RAN").exists()
