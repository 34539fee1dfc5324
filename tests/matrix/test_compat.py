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


# --------------------------------------------------------------------------- structure the techniques need (issue 30)


def _refused_in_one_line(technique: str, call, *needles: str) -> str:
    with pytest.raises(UnsupportedModelError) as refused:
        call()
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"{technique} does not support model_type")
    assert all(needle in message for needle in needles), message
    return message


def test_albert_shared_layers_are_refused_by_what_needs_a_module_per_layer(tmp_path):
    from transformers import Trainer, TrainingArguments

    from hf_modelopt import OneShotPruningConfig, PruningCallback, PruningConfig, prune_
    from hf_modelopt.distill import student_from_teacher
    from tests.matrix.common import assert_state_unchanged, model_inputs, state_snapshot

    albert = tiny_model("albert")
    before = state_snapshot(albert)
    _refused_in_one_line("students from teacher layers", lambda: student_from_teacher(albert, layers=[0]),
                         "config.num_hidden_groups")
    _refused_in_one_line("one-shot pruning", lambda: prune_(albert, OneShotPruningConfig(method="wanda"),
                                                            [model_inputs("albert", labels=False)]), "share")
    _refused_in_one_line("gradual pruning", lambda: prune_(albert, PruningConfig(sparsity=0.5)), "share")
    # The callback refuses at the start of training, not from inside a step (it was a plain ValueError there).
    args = TrainingArguments(str(tmp_path), max_steps=1, report_to="none", use_cpu=True, save_strategy="no")
    trainer = Trainer(model=albert, args=args, train_dataset=[{k: v[0] for k, v in model_inputs("albert").items()}],
                      callbacks=[PruningCallback(PruningConfig(sparsity=0.5))])
    _refused_in_one_line("gradual pruning", trainer.train, "share")
    assert trainer.state.global_step == 0
    assert_state_unchanged(albert, before)


def test_swin_stages_are_refused_by_what_needs_same_shape_blocks():
    from hf_modelopt import OneShotPruningConfig, prune_
    from hf_modelopt.distill import student_from_teacher
    from tests.matrix.common import assert_state_unchanged, model_inputs, state_snapshot

    swin = tiny_model("swin")
    before = state_snapshot(swin)
    _refused_in_one_line("students from teacher layers", lambda: student_from_teacher(swin, layers=[0]),
                         "config.depths = [1, 1]", "patch merging")
    for method in ("magnitude", "wanda"):  # magnitude needs no calibration, but is refused the same way
        config = OneShotPruningConfig(method=method)
        _refused_in_one_line("one-shot pruning", lambda c=config: prune_(swin, c, [model_inputs("swin", labels=False)]),
                             "stages")
    assert_state_unchanged(swin, before)
    assert unsupported_reason("gradual pruning", swin) is None  # masks per Linear need no block order: it works


def test_falcon_is_refused_quantization_and_falls_back_in_storage_for_its_true_cause(tmp_path, caplog):
    from hf_modelopt import QuantizationConfig, quantize, save_compressed
    from hf_modelopt.quant import StorageQuantizationConfig

    falcon = tiny_model("falcon")
    _refused_in_one_line("quantization", lambda: quantize(falcon, QuantizationConfig(method="int8")),
                         "FalconLinear (subclasses of nn.Linear)", "exactly nn.Linear")
    with caplog.at_level("WARNING", logger="hf_modelopt"):
        fmt = save_compressed(falcon, tmp_path / "storage", storage=StorageQuantizationConfig(linear_bits=8))
    assert fmt.name == "hf-modelopt"
    fallback = " ".join(r.getMessage() for r in caplog.records if "compressed-tensors cannot hold" in r.getMessage())
    assert "FalconLinear (a subclass of nn.Linear)" in fallback and "Conv1D" not in fallback
