"""`hf_modelopt.compat`: the declarations the matrix reads follow the library's own tables."""

import pytest

from hf_modelopt.compat import SUPPORT, UnsupportedModelError, require_support, unsupported_reason
from hf_modelopt.errors import UserError
from hf_modelopt.tasks import model_task
from tests.matrix.common import ARCHITECTURES, natural_task, tiny_model


def test_structured_support_is_read_from_the_layouts(monkeypatch):
    from hf_modelopt.prune import structured

    gpt2, layout = tiny_model("gpt2"), structured.LAYOUTS["gpt2"]
    monkeypatch.delitem(structured.LAYOUTS, "gpt2")  # a layout removed: refused at once
    assert "it supports the model types whose block layout it knows" in unsupported_reason("structured pruning", gpt2)
    monkeypatch.setitem(structured.LAYOUTS, "gpt2", layout)  # and added back: supported at once
    assert unsupported_reason("structured pruning", gpt2) is None


def test_heads_come_from_the_transformers_auto_mappings():
    for model_type in ARCHITECTURES:
        assert model_task(tiny_model(model_type)) == natural_task(model_type)


def test_refusal_is_a_user_error_naming_technique_and_model_type():
    with pytest.raises(UnsupportedModelError, match=r"^one-shot pruning does not support model_type 'bart' "
                                                    r"\(BartForConditionalGeneration\): it supports") as refused:
        require_support("one-shot pruning", tiny_model("bart"))
    assert isinstance(refused.value, UserError)
    with pytest.raises(KeyError, match="unknown technique 'pruning'"):
        unsupported_reason("pruning", tiny_model("bert"))


def test_models_inside_peft_adapters_are_checked_as_themselves():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    assert all(unsupported_reason(technique, model) is None for technique in SUPPORT)
