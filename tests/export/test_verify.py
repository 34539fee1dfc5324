import pytest
import torch
from transformers import AutoTokenizer

from hf_modelopt.export.verify import ReloadError, verify_reload
from hf_modelopt.modeling import auto_model_class


@pytest.mark.parametrize("model_type,task", [("bert", "text-classification"), ("llama", "causal-lm")])
def test_reload_of_a_saved_model_matches(tiny_models, model_type, task):
    folder = tiny_models(model_type, task)
    model = auto_model_class(task).from_pretrained(folder)
    check = verify_reload(folder, model, AutoTokenizer.from_pretrained(folder), task)
    assert check.max_abs_diff <= 1e-5


def test_reload_that_differs_is_refused(tiny_models, tmp_path):
    folder = tiny_models("bert", "text-classification")
    model = auto_model_class("text-classification").from_pretrained(folder)
    with torch.no_grad():
        model.classifier.weight.add_(0.5)  # the model in memory is no longer what was saved
    with pytest.raises(ReloadError, match="different logits"):
        verify_reload(folder, model, AutoTokenizer.from_pretrained(folder), "text-classification")
    with pytest.raises(ReloadError, match="does not load"):
        verify_reload(tmp_path, model, AutoTokenizer.from_pretrained(folder), "text-classification")


def test_adapter_folder_reloads_with_peft(tiny_models, tmp_path):
    """An export that is a peft adapter is recognised and reloaded with peft's AutoPeftModel class."""
    from peft import LoraConfig, get_peft_model

    from hf_modelopt.formats.detect import detect_format, loading_code

    base = tiny_models("bert", "text-classification")
    torch.manual_seed(0)
    lora = LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"], init_lora_weights=False)
    model = get_peft_model(auto_model_class("text-classification").from_pretrained(base), lora)
    tokenizer = AutoTokenizer.from_pretrained(base)
    folder = tmp_path / "adapter"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert detect_format(folder).loads_with == "peft"
    assert "AutoPeftModelForSequenceClassification.from_pretrained" in loading_code(
        detect_format(folder), "AutoModelForSequenceClassification", "org/x", "AutoPeftModelForSequenceClassification")
    check = verify_reload(folder, model, tokenizer, "text-classification")
    assert check.max_abs_diff <= 1e-5
