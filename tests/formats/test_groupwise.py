import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from hf_modelopt.formats.detect import detect_format, weights_size_on_disk
from hf_modelopt.formats.groupwise import NF4_LEVELS, dequantize_groups, dequantize_in_place_, quantize_groups
from hf_modelopt.formats.hf_modelopt import save_with_quantized_storage
from hf_modelopt.pipeline import run_recipe
from hf_modelopt.prune.masks import apply_masks_, masks_from_scores, prunable_linears
from hf_modelopt.recipe import RecipeError, validate_recipe

from ..conftest import tiny_recipe


@pytest.mark.parametrize("bits", [8, 4])
def test_group_codes_round_trip_within_half_a_step(bits):
    values = torch.randn(1000)  # not a multiple of the group size: the last group is padded
    codes, scales = quantize_groups(values, bits, group_size=64)
    assert codes.numel() == (1000 if bits == 8 else 500) and scales.dtype == torch.float16 and scales.numel() == 16
    restored = dequantize_groups(codes, scales, 1000, 64)
    groups = torch.nn.functional.pad(values, (0, 24)).view(-1, 64).abs().amax(1).repeat_interleave(64)[:1000]
    # at most half the widest gap between two neighbouring levels, relative to the group's maximum (NF4:
    # -1 -> -0.696; the fp16 scale adds a rounding of its own)
    widest = 1 / 127 if bits == 8 else max(b - a for a, b in zip(NF4_LEVELS, NF4_LEVELS[1:]))
    error = (restored - values).abs() / groups
    assert float(error.max()) <= widest / 2 + 1e-3
    assert torch.equal(dequantize_groups(codes, scales, 1000, 64), restored)  # deterministic
    if bits == 4:
        levels = restored / scales.float().repeat_interleave(64)[:1000]  # every value is a level × its scale
        assert set(levels.mul(1e4).round().unique().tolist()) <= {round(v * 1e4) for v in NF4_LEVELS}


def test_nf4_levels_are_bitsandbytes_levels():
    import bitsandbytes.functional as bnb

    assert bnb.get_4bit_type("nf4", device="cpu").tolist() == list(NF4_LEVELS)


@pytest.mark.parametrize("model_type, task", [("bert", "text-classification"), ("llama", "causal-lm")])
@pytest.mark.parametrize("linear_bits, embedding_bits", [(8, 8), (4, 4), (8, None)])
def test_storage_checkpoint_reloads_as_the_dequantized_model(tiny_models, tmp_path, model_type, task,
                                                             linear_bits, embedding_bits):
    loader = AutoModelForSequenceClassification if task == "text-classification" else AutoModelForCausalLM
    model = loader.from_pretrained(tiny_models(model_type, task))
    original = {k: v.clone() for k, v in model.state_dict().items()}
    report = save_with_quantized_storage(model, tmp_path / "q", linear_bits=linear_bits,
                                         embedding_bits=embedding_bits, skip=("classifier",))
    assert "quantization_config" not in model.config.to_dict()  # the model in memory is left as it was
    assert all(torch.equal(original[k], v) for k, v in model.state_dict().items())
    assert detect_format(tmp_path / "q").name == "hf-modelopt"
    reloaded = loader.from_pretrained(tmp_path / "q")
    assert getattr(reloaded.config, "quantization_config", None) is None  # a plain model once loaded
    dequantize_in_place_(model, linear_bits=linear_bits, embedding_bits=embedding_bits, skip=("classifier",))
    for (name, a), b in zip(model.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), name
    if task == "text-classification":
        assert "classifier" in report.kept and torch.equal(reloaded.classifier.weight, original["classifier.weight"])
    embeddings = "bert.embeddings.word_embeddings" if model_type == "bert" else "model.embed_tokens"
    assert (embeddings in report.formats) == (embedding_bits is not None)
    model.save_pretrained(tmp_path / "dense")
    ratio = weights_size_on_disk(tmp_path / "q") / weights_size_on_disk(tmp_path / "dense")
    assert ratio < {(8, 8): 0.3, (4, 4): 0.17, (8, None): 1.0}[linear_bits, embedding_bits]


def test_sparse_weights_keep_their_zeros_and_bitmask(tiny_models, tmp_path):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_models("roberta"))
    modules = prunable_linears(model)
    apply_masks_(modules, masks_from_scores({n: m.weight.abs() for n, m in modules.items()}, 0.9))
    report = save_with_quantized_storage(model, tmp_path / "q", linear_bits=8, embedding_bits=8)
    assert {report.formats[name] for name in modules} == {"int8+bitmask"}
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "q")
    for name, module in prunable_linears(reloaded).items():
        assert torch.equal(module.weight == 0, modules[name].weight == 0), name


def test_quantize_storage_stage_evaluates_what_loads_back(tiny_models, sst2_files, tmp_path):
    stages = ["evaluate", {"type": "quantize_storage", "format": "hf_modelopt", "linear_bits": 8, "embedding_bits": 4},
              "evaluate", "export"]
    result = run_recipe(validate_recipe(tiny_recipe(tiny_models("bert"), sst2_files, stages=stages)), tmp_path / "o")
    record = next(r for r in result["stages"] if r["type"] == "quantize_storage")
    assert record["metrics"]["reload_max_abs_diff"] == 0.0 and record["metrics"]["stored_ratio"] < 0.2
    report = json.loads((tmp_path / "o" / "quantization.json").read_text())
    assert report["formats"]["bert.embeddings.word_embeddings"] == "nf4"
    assert report["kept_in_full_precision"] == ["classifier"]
    export = json.loads((tmp_path / "o" / "export.json").read_text())
    assert export["format"]["name"] == "hf-modelopt"
    card = (tmp_path / "o" / "README.md").read_text()
    assert "Linear\nlayers in 8 bits" in card and "embeddings in 4 bits" in card
    assert "Kept in full precision: `classifier`" in card


@pytest.mark.parametrize("stages, message", [
    ([{"type": "quantize", "method": "int8"}, "quantize_storage"], r"stages\[1\]: stage 'quantize' before it already "
     "quantized the model with bitsandbytes: its integer weights cannot be stored again"),
    ([{"type": "quantize_storage", "linear_bits": None, "embedding_bits": None}],
     r"stages\[0\]: linear_bits and embedding_bits are both null: nothing to quantize"),
    ([{"type": "quantize_storage", "linear_bits": 6}], r"stages\[0\].linear_bits: input should be 4 or 8, got 6"),
])
def test_bad_storage_settings_are_refused_naming_the_key(tiny_models, sst2_files, stages, message):
    with pytest.raises(RecipeError, match=message):
        validate_recipe(tiny_recipe(tiny_models("bert"), sst2_files, stages=stages))
