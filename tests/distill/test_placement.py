"""A teacher spread over devices (`teacher_device_map`): on this CPU-only machine, over CPU RAM and disk."""

import re

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, DataCollatorWithPadding

from hf_modelopt.distill.cache import TeacherLogitCache, build_teacher_logit_cache
from hf_modelopt.distill.placement import dispatch_teacher, is_dispatched
from hf_modelopt.errors import UserError
from hf_modelopt.pipeline import run_recipe
from hf_modelopt.recipe import RecipeError, validate_recipe
from hf_modelopt.stages.distill import DistillStageConfig

from ..conftest import tiny_recipe
from .test_trainer import make_trainer, sentence_dataset, tiny_bert, tokenizer  # noqa: F401 (fixture)


def model_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def tiny_llama():
    config = AutoConfig.for_model("llama", vocab_size=1000, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=64, head_dim=8, tie_word_embeddings=True)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def small_vocab_bert():
    config = AutoConfig.for_model("bert", vocab_size=1000, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                  intermediate_size=64, num_labels=2)
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(config).eval()


@pytest.mark.parametrize("build", [small_vocab_bert, tiny_llama], ids=["bert", "llama-tied-embeddings"])
def test_teacher_with_layers_on_disk_gives_the_same_logits(build, tmp_path):
    teacher = build()
    inputs = torch.randint(0, 1000, (3, 10))
    with torch.no_grad():
        expected = teacher(input_ids=inputs).logits
    assert not is_dispatched(teacher)
    dispatch_teacher(teacher, "auto", {"cpu": model_bytes(teacher)}, tmp_path / "offload")
    placed = set(teacher.hf_device_map.values())
    assert placed == {"cpu", "disk"}, teacher.hf_device_map
    assert any(p.device.type == "meta" for p in teacher.parameters())  # offloaded: not in memory
    assert any((tmp_path / "offload").iterdir())
    with torch.no_grad():
        assert torch.equal(teacher(input_ids=inputs).logits, expected)


def test_memory_that_holds_no_layer_is_refused_with_the_key(tmp_path):
    teacher = small_vocab_bert()
    with pytest.raises(UserError, match="teacher_max_memory .* holds none of the teacher's layers"):
        dispatch_teacher(teacher, "auto", {"cpu": model_bytes(teacher) // 4}, tmp_path / "offload")


def test_live_and_cached_kd_from_a_spread_teacher_equal_the_plain_teacher(tmp_path, tokenizer):  # noqa: F811
    plain, spread = tiny_bert(layers=4).eval(), tiny_bert(layers=4).eval()  # same seed: same weights
    dispatch_teacher(spread, "sequential", {"cpu": model_bytes(spread)}, tmp_path / "offload")
    assert "disk" in spread.hf_device_map.values()
    student = tiny_bert(layers=1, seed=3)
    config = DistillStageConfig(student={"layers": [0]}, ce_weight=0.3, hidden_weight=1.0)
    collator = DataCollatorWithPadding(tokenizer)
    features = [sentence_dataset(tokenizer)[i] for i in (7, 2, 11, 0)]
    student.eval()
    with torch.no_grad():
        losses = [make_trainer(tmp_path / name, tokenizer, teacher, student, config).compute_loss(
            student, collator(features)) for name, teacher in (("plain", plain), ("spread", spread))]
    assert losses[1].item() == losses[0].item()
    caches = [TeacherLogitCache(build_teacher_logit_cache(teacher, sentence_dataset(tokenizer), collator,
                                                          tmp_path / f"{name}.safetensors", top_k=None))
              for name, teacher in (("plain", plain), ("spread", spread))]
    assert torch.equal(caches[0].values, caches[1].values) and torch.equal(caches[0].indices, caches[1].indices)
    # Training the student against the spread teacher leaves the teacher where and as it was.
    make_trainer(tmp_path / "train", tokenizer, spread, student.train(), config, steps=2).train()
    assert "disk" in spread.hf_device_map.values() and not any(p.requires_grad for p in spread.parameters())
    with torch.no_grad():
        batch = {k: v for k, v in collator(features).items() if k not in ("labels", "example_index")}
        assert torch.equal(spread(**batch).logits, plain(**batch).logits)


def test_distill_stage_with_a_teacher_spread_to_disk(tiny_models, sst2_files, tmp_path, caplog):
    folder = tiny_models("bert")
    size = model_bytes(AutoModelForSequenceClassification.from_pretrained(folder))
    stages = [{"type": "distill", "student": {"layers": [1]}, "ce_weight": 0.5, "hidden_weight": 1.0,
               "teacher_device_map": "auto", "teacher_max_memory": {"cpu": size}}, "evaluate"]
    caplog.set_level("INFO", logger="hf_modelopt")
    run_recipe(validate_recipe(tiny_recipe(folder, sst2_files, stages=stages)), tmp_path / "o")
    assert re.search(r"teacher spread over cpu \(\d+ modules\), disk \(\d+ modules\)", caplog.text)
    assert not (tmp_path / "o" / "stages" / "distill" / "teacher_offload").exists()  # scratch, removed
    student = AutoModelForSequenceClassification.from_pretrained(tmp_path / "o")
    assert student.config.num_hidden_layers == 1


def test_teacher_placement_settings_are_checked_before_any_work(tiny_models, sst2_files, monkeypatch):
    stage = {"type": "distill", "student": {"layers": [1]}, "teacher_max_memory": {"cpu": "1GiB"}}
    with pytest.raises(RecipeError, match="teacher_max_memory is read only with teacher_device_map"):
        validate_recipe(tiny_recipe(tiny_models("bert"), sst2_files, stages=[stage]))
    # Several processes would each spread the teacher over the same devices: only the cache is allowed.
    monkeypatch.setenv("WORLD_SIZE", "2")
    stage = {"type": "distill", "student": {"layers": [1]}, "teacher_device_map": "auto"}
    recipe = validate_recipe(tiny_recipe(tiny_models("bert"), sst2_files, stages=[stage]))
    with pytest.raises(RecipeError, match=r"distill\.teacher_device_map: 2 processes .* cache_teacher_logits"):
        recipe.resolved_stages[0].config.preflight(recipe)  # (the full preflight would start a process group)
    recipe = validate_recipe(tiny_recipe(tiny_models("bert"), sst2_files,
                                          stages=[{**stage, "cache_teacher_logits": True}]))
    recipe.resolved_stages[0].config.preflight(recipe)
