import json

import pytest
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from hf_modelopt.distill import VocabularyMismatchError
from hf_modelopt.pipeline import run_recipe
from hf_modelopt.recipe import validate_recipe

from ..conftest import tiny_recipe


def test_distill_stage_classification_with_transfer_text_and_cache(tiny_models, sst2_files, tmp_path):
    stages = [{"type": "distill", "student": {"layers": [1]}, "ce_weight": 0.5, "cache_teacher_logits": True,
               "transfer_file": "text/valid.txt", "max_transfer_samples": 20}, "evaluate"]
    result = run_recipe(validate_recipe(tiny_recipe(tiny_models("bert"), sst2_files, stages=stages)), tmp_path / "o")
    student = AutoModelForSequenceClassification.from_pretrained(tmp_path / "o")
    assert student.config.num_hidden_layers == 1
    assert (tmp_path / "o" / "stages" / "distill" / "teacher_logits.safetensors").is_file()
    assert result["metrics"][0]["model"].endswith("-> distill")
    logged = json.loads((tmp_path / "o" / "stages" / "distill" / "log_history.json").read_text())
    assert logged[-1]["train_loss"] > 0


def test_augmented_copies_join_the_training_set_for_kd_only(tiny_models, sst2_files, tmp_path):
    from safetensors.torch import load_file

    from hf_modelopt.distill.augment import AugmentationConfig, augmented_sentences

    augmentation = {"copies": 3, "ngram_probability": 0.5, "mask_probability": 0.2}
    stages = [{"type": "prune", "sparsity": 0.5, "schedule": {"kind": "one_shot"},
               "distillation": {"ce_weight": 0.5, "cache_teacher_logits": True, "augmentation": augmentation},
               "training": {"max_steps": 3}}]
    run_recipe(validate_recipe(tiny_recipe(tiny_models("bert"), sst2_files, stages=stages)), tmp_path / "o")
    labelled = [line.split("\t")[0] for line in (sst2_files / "sst2" / "train.tsv").read_text().splitlines()[1:]]
    copies = augmented_sentences(labelled, AugmentationConfig(**augmentation), "[MASK]")
    assert len(copies) > len(labelled)
    cached = load_file(tmp_path / "o" / "stages" / "prune" / "teacher_logits.safetensors")
    assert cached["values"].shape[0] == len(labelled) + len(copies)  # the teacher labelled every copy once


def test_distill_stage_causal_lm_with_hidden_and_attention_losses(tiny_models, sst2_files, tmp_path):
    stages = [{"type": "distill", "student": {"every": 2}, "hidden_weight": 1.0, "attention_weight": 0.5},
              "evaluate"]
    recipe = tiny_recipe(tiny_models("qwen2", "causal-lm"), sst2_files, task="causal-lm", stages=stages)
    run_recipe(validate_recipe(recipe), tmp_path / "o")
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    assert student.config.num_hidden_layers == 1 and student.config.layer_types == ["full_attention"]
    assert student.config._attn_implementation != "eager"  # back to the fast implementation for inference


def test_separate_student_with_another_vocabulary_is_refused_before_training(tiny_models, sst2_files, tmp_path):
    from transformers import AutoTokenizer

    teacher = tiny_models("llama", "causal-lm")
    other = tmp_path / "other-student"
    config = AutoConfig.from_pretrained(teacher)
    AutoModelForCausalLM.from_config(config).save_pretrained(other)
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    tokenizer.add_tokens(["zzz-extra"])
    tokenizer.save_pretrained(other)
    stages = [{"type": "distill", "student": {"name_or_path": str(other)}}]
    recipe = validate_recipe(tiny_recipe(teacher, sst2_files, task="causal-lm", stages=stages))
    with pytest.raises(VocabularyMismatchError, match="token id 30522"):
        run_recipe(recipe, tmp_path / "o")
    assert not (tmp_path / "o").exists()  # refused in the pre-flight checks, before any stage ran


def test_transfer_text_problems_are_found_before_any_work(tiny_models, sst2_files, tmp_path):
    from hf_modelopt.errors import UserError

    stages = [{"type": "distill", "student": {"layers": [0]}, "transfer_file": "text/missing.txt"}]
    with pytest.raises(UserError, match="transfer_file: file not found"):
        run_recipe(validate_recipe(tiny_recipe(tiny_models("bert"), sst2_files, stages=stages)), tmp_path / "o")
    stages[0]["transfer_file"] = "text/valid.txt"
    recipe = tiny_recipe(tiny_models("gpt2", "causal-lm"), sst2_files, task="causal-lm", stages=stages)
    with pytest.raises(UserError, match="for classification only"):
        run_recipe(validate_recipe(recipe), tmp_path / "o")
    assert not (tmp_path / "o").exists()
    stages[0].pop("transfer_file")
    stages[0]["augmentation"] = {"copies": 2}
    recipe = tiny_recipe(tiny_models("gpt2", "causal-lm"), sst2_files, task="causal-lm", stages=stages)
    with pytest.raises(UserError, match="distill.augmentation: for classification only"):
        run_recipe(validate_recipe(recipe), tmp_path / "o")


def test_logit_cache_with_evaluation_during_training_is_refused(tiny_models, sst2_files, tmp_path):
    from hf_modelopt.errors import UserError

    stages = [{"type": "distill", "student": {"layers": [0]}, "cache_teacher_logits": True,
               "training": {"eval_strategy": "steps"}}]
    with pytest.raises(UserError, match="cache covers the training set only"):
        run_recipe(validate_recipe(tiny_recipe(tiny_models("bert"), sst2_files, stages=stages)), tmp_path / "o")
