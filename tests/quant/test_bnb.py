import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from hf_modelopt.export.verify import probe_batch, probe_logits, verify_reload
from hf_modelopt.formats.bitsandbytes import RepackedWeightsError, check_savable, repacked_layers, save_bitsandbytes
from hf_modelopt.quant.bnb import QuantizationError, kernel_rejects, plan_skips, quantize_with_bitsandbytes
from hf_modelopt.quant.config import QuantizationConfig


@pytest.mark.parametrize("method,double_quant", [("int8", False), ("nf4", False), ("nf4", True), ("fp4", False)])
def test_quantized_model_saves_and_reloads_with_equal_logits(wide_tiny_models, tmp_path, method, double_quant):
    folder = wide_tiny_models("llama", "causal-lm")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    quantized, report = quantize_with_bitsandbytes(model, QuantizationConfig(method=method, double_quant=double_quant))
    assert report.quantized and "lm_head" in report.skipped
    assert report.footprint_bytes < report.reference_footprint_bytes
    save_bitsandbytes(quantized, tmp_path / "q", tokenizer)
    batch = probe_batch(tokenizer)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    expected = "Linear8bitLt" if method == "int8" else "Linear4bit"
    assert type(reloaded.model.layers[0].mlp.down_proj).__name__ == expected
    assert torch.allclose(probe_logits(reloaded, batch), probe_logits(quantized, batch), atol=1e-4, rtol=1e-4)
    # The input model is untouched: still full precision.
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear


def test_quantized_model_reloads_in_a_fresh_process(wide_tiny_models, tmp_path):
    folder = wide_tiny_models("llama", "causal-lm")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    quantized, _ = quantize_with_bitsandbytes(AutoModelForCausalLM.from_pretrained(folder),
                                              QuantizationConfig(method="fp4"))
    save_bitsandbytes(quantized, tmp_path / "q", tokenizer)
    assert verify_reload(tmp_path / "q", quantized, tokenizer, "causal-lm").max_abs_diff <= 1e-4


def test_gpt2_conv1d_layers_are_quantized(wide_tiny_models):
    model = AutoModelForCausalLM.from_pretrained(wide_tiny_models("gpt2", "causal-lm"))
    _, report = quantize_with_bitsandbytes(model, QuantizationConfig(method="nf4"))
    assert "transformer.h.0.mlp.c_fc" in report.quantized


def test_kernel_shape_rules():
    assert kernel_rejects(384, 2, "nf4").startswith("4-bit CPU kernel needs out_features divisible by 32")
    assert "in_features divisible by 64" in kernel_rejects(32, 64, "fp4")
    assert kernel_rejects(64, 96, "nf4") is None
    assert kernel_rejects(32, 2, "int8") is None


def test_classifier_head_is_skipped_for_4bit_only(wide_tiny_models):
    model = AutoModelForSequenceClassification.from_pretrained(wide_tiny_models("bert"))
    nf4_skips = plan_skips(model, QuantizationConfig(method="nf4"))
    assert "out_features divisible by 32, got 2" in nf4_skips["classifier"]
    # transformers keeps the last module in full precision by default; int8 kernels take any shape.
    assert "divisible" not in plan_skips(model, QuantizationConfig(method="int8")).get("classifier", "")
    skips = plan_skips(model, QuantizationConfig(method="nf4", skip_modules=["attention.self.query"]),
                       keep_modules=["bert.encoder.layer.1"])
    assert skips["bert.encoder.layer.0.attention.self.query"] == "skip_modules"
    assert skips["bert.encoder.layer.1.output.dense"].startswith("sensitivity scan")
    assert "bert.encoder.layer.0.output.dense" not in skips

    quantized, report = quantize_with_bitsandbytes(model, QuantizationConfig(method="nf4"))
    assert type(quantized.classifier) is torch.nn.Linear  # would crash the CPU kernel as Linear4bit
    tokenizer = AutoTokenizer.from_pretrained(wide_tiny_models("bert"))
    assert probe_logits(quantized, probe_batch(tokenizer)).shape[-1] == 2


def test_model_without_any_quantizable_layer_is_refused(tiny_models):
    # 32 features: too narrow for the 4-bit CPU kernels, except mlp.down_proj (64 in, 32 out), skipped by name.
    model = AutoModelForCausalLM.from_pretrained(tiny_models("llama", "causal-lm"))
    with pytest.raises(QuantizationError, match="no linear layer of LlamaForCausalLM can be quantized to nf4"):
        quantize_with_bitsandbytes(model, QuantizationConfig(method="nf4", skip_modules=["mlp.down_proj"]))


def test_a_4bit_model_that_ran_on_cpu_saves_its_state_from_before_or_is_refused(wide_tiny_models, tmp_path):
    from hf_modelopt.stages import ModelState, save_model_state

    folder = wide_tiny_models("llama", "causal-lm")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    quantized, _ = quantize_with_bitsandbytes(AutoModelForCausalLM.from_pretrained(folder),
                                              QuantizationConfig(method="nf4"))
    check_savable(quantized)  # fresh: fine
    expected = probe_logits(quantized, probe_batch(tokenizer))
    if not repacked_layers(quantized):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not repack 4-bit weights here")
    # quantize kept the state from before the repacking: that is what is written, and it reloads to the same model.
    save_model_state(ModelState(model=quantized), tmp_path / "q")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert torch.allclose(probe_logits(reloaded, probe_batch(tokenizer)), expected, atol=1e-4)
    # A 4-bit model loaded from disk has no such state: once it has run, saving it is refused.
    probe_logits(reloaded, probe_batch(tokenizer))
    assert repacked_layers(reloaded)
    with pytest.raises(RepackedWeightsError, match="repacked in place by a CPU forward pass"):
        save_bitsandbytes(reloaded, tmp_path / "again")
    assert not (tmp_path / "again").exists()


def test_bnb_config_mapping():
    config = QuantizationConfig(method="fp4", double_quant=True, compute_dtype="bfloat16", skip_modules=["x"])
    bnb = config.to_bnb_config()
    assert bnb.load_in_4bit and bnb.bnb_4bit_quant_type == "fp4" and bnb.bnb_4bit_use_double_quant
    assert bnb.bnb_4bit_compute_dtype == torch.bfloat16 and bnb.llm_int8_skip_modules == ["x"]
    int8 = QuantizationConfig(method="int8", int8_threshold=4.0).to_bnb_config(skip_modules=["lm_head"])
    assert int8.load_in_8bit and int8.llm_int8_threshold == 4.0 and int8.llm_int8_skip_modules == ["lm_head"]
    with pytest.raises(ValueError, match="double_quant is a 4-bit option"):
        QuantizationConfig(method="int8", double_quant=True)


MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")


def _weight_bytes_in_file(path) -> int:
    """The tensor data of a safetensors file: its size less the 8-byte header length and the JSON header."""
    import struct

    with open(path, "rb") as file:
        header = struct.unpack("<Q", file.read(8))[0]
    return path.stat().st_size - 8 - header


@pytest.mark.parametrize("model_type,method", [("mixtral", "int8"), ("qwen2_moe", "int8"), ("qwen3_moe", "int8"),
                                               ("mixtral", "nf4"), ("bert", "int8"), ("gpt2", "nf4")])
def test_reports_name_the_fused_experts_count_every_block_parameter_and_match_the_saved_file(model_type, method,
                                                                                              tmp_path):
    from hf_modelopt import quantize, save_compressed
    from hf_modelopt.blocks import layer_stacks
    from hf_modelopt.formats.experts import experts_modules
    from tests.matrix.common import logits_of, tiny_model

    model = tiny_model(model_type, wide=method == "nf4")
    experts = [f"{name}.{param}" for name, module in experts_modules(model).items()
               for param in ("gate_up_proj", "down_proj")]
    block_parameters = sum(p.numel() for stack in layer_stacks(model) for p in stack.layers.parameters())
    quantized = quantize(model, QuantizationConfig(method=method))
    report = quantized.quantization_report
    # bitsandbytes 0.50 quantizes Linear layers through transformers; the fused 3-D experts stay, and are named.
    assert sorted(report.kept_parameters) == sorted(experts) and bool(experts) == (model_type in MOE_FAMILIES)
    assert all("fused 3-D expert weights" in reason for reason in report.kept_parameters.values())
    assert report.block_parameters == block_parameters
    expert_weights = sum(quantized.get_parameter(name).numel() for name in experts)
    assert 0 < report.quantized_block_parameters <= block_parameters - expert_weights
    fmt = save_compressed(quantized, tmp_path / "q")
    assert report.footprint_bytes == _weight_bytes_in_file(tmp_path / "q" / "model.safetensors")
    assert report.footprint_bytes < report.reference_footprint_bytes
    assert fmt.loads_with == "transformers"
    reloaded = type(model).from_pretrained(tmp_path / "q")
    torch.testing.assert_close(logits_of(reloaded, model_type), logits_of(quantized, model_type), atol=1e-5, rtol=0)
