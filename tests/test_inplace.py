"""Every verb that changes a model in place finishes or leaves the model as it was (`hf_modelopt.inplace`).

Each test makes the work fail half-way (the function that prunes block 1, the last step of Minitron, a fake
quantization in the middle of the sensitivity scan) and checks that the model's state dict, its module types and
its config equal the original's afterwards.
"""

from __future__ import annotations

import pytest
import torch

from hf_modelopt.inplace import all_or_nothing
from tests.matrix.common import model_inputs, tiny_model


class Injected(RuntimeError):
    pass


def _picture(model) -> tuple[dict, dict, dict]:
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            {name: type(module) for name, module in model.named_modules()}, model.config.to_dict())


def _assert_as_before(model, picture) -> None:
    state, types, config = picture
    after = model.state_dict()
    assert list(after) == list(state)
    for key, tensor in state.items():
        assert after[key].shape == tensor.shape and torch.equal(after[key], tensor), key
    assert {name: type(module) for name, module in model.named_modules()} == types
    assert model.config.to_dict() == config


def _fail_on_call(monkeypatch, owner, name: str, failing_call: int):
    """Replace `owner.name` by a wrapper that runs it, except that call number `failing_call` raises `Injected`."""
    original, calls = getattr(owner, name), []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == failing_call:
            raise Injected(f"{name} call {failing_call}")
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return calls


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_one_shot_pruning_failing_in_block_1_leaves_the_model_unpruned(method, monkeypatch):
    from hf_modelopt import OneShotPruningConfig, prune_
    from hf_modelopt.prune import oneshot

    model = tiny_model("llama")
    picture = _picture(model)
    per_block = 7  # q, k, v, o, gate, up, down: the first call of block 1 fails, after block 0 was pruned
    target = {"magnitude": "magnitude_mask", "wanda": "wanda_mask", "sparsegpt": "sparsegpt_prune_"}[method]
    calls = _fail_on_call(monkeypatch, oneshot, target, per_block + 1)
    with pytest.raises(Injected):
        prune_(model, OneShotPruningConfig(method=method, sparsity=0.5), [model_inputs("llama", labels=False)])
    assert len(calls) == per_block + 1
    _assert_as_before(model, picture)


def test_magnitude_pruning_at_once_failing_after_the_first_layer_leaves_every_weight(monkeypatch):
    from hf_modelopt import PruningConfig, prune_
    from hf_modelopt.prune import masks

    model = tiny_model("gpt2")
    picture = _picture(model)
    apply_masks_ = masks.apply_masks_

    def first_layer_then_fail(modules, new_masks):
        first = next(iter(modules))
        apply_masks_({first: modules[first]}, {first: new_masks[first]})  # block 0's first layer is pruned
        raise Injected("after the first layer")

    monkeypatch.setattr(masks, "apply_masks_", first_layer_then_fail)
    with pytest.raises(Injected):
        prune_(model, PruningConfig(sparsity=0.5))
    _assert_as_before(model, picture)


def test_structured_pruning_failing_in_block_1_leaves_the_layers_as_they_were(monkeypatch):
    from hf_modelopt import StructuredPruningConfig, prune_
    from hf_modelopt.prune import structured

    model = tiny_model("bert")
    picture = _picture(model)
    _fail_on_call(monkeypatch, structured, "_remove_heads_", 2)  # block 0's heads removed and its FFN sliced first
    with pytest.raises(Injected):
        prune_(model, StructuredPruningConfig(heads=0.5, neurons=0.5, importance="magnitude"))
    _assert_as_before(model, picture)
    assert model.bert.encoder.layer[0].attention.self.num_attention_heads == 2
    logits = model(**model_inputs("bert", labels=False)).logits  # and the model still runs as before
    assert torch.isfinite(logits).all()


def test_expert_removal_failing_in_block_1_leaves_every_expert(monkeypatch):
    from hf_modelopt.prune import experts

    model = tiny_model("mixtral")
    picture = _picture(model)
    keep = {name: [0, 1] for name in experts.moe_blocks(model)}
    _fail_on_call(monkeypatch, experts, "expert_count", len(keep) + 2)  # inside the loop, block 1 (block 0 done)
    with pytest.raises(Injected):
        experts.remove_experts_(model, keep)
    _assert_as_before(model, picture)
    assert model.config.num_local_experts == 4


def test_minitron_failing_at_its_last_step_leaves_blocks_heads_and_neurons(monkeypatch):
    from hf_modelopt import prune_
    from hf_modelopt.prune import MinitronConfig
    from hf_modelopt.prune.minitron import removal

    model = tiny_model("llama")
    picture = _picture(model)
    monkeypatch.setattr(removal, "remove_hidden_channels_", lambda *a, **k: (_ for _ in ()).throw(Injected()))
    config = MinitronConfig(num_hidden_layers=1, intermediate_size=32, hidden_size=16)
    with pytest.raises(Injected):
        prune_(model, config, [model_inputs("llama", labels=False)])
    _assert_as_before(model, picture)
    assert len(model.model.layers) == 2


def test_quantize_failing_in_the_sensitivity_scan_leaves_the_weights_unquantized(monkeypatch):
    # (the scan puts each unit's weights back in its own `finally` too; this checks the verb as a whole)
    from hf_modelopt import QuantizationConfig, quantize
    from hf_modelopt.quant import SensitivityConfig, sensitivity

    model = tiny_model("bert")
    picture = _picture(model)
    _fail_on_call(monkeypatch, sensitivity, "fake_quantize_weight", 3)
    config = QuantizationConfig(method="int8", sensitivity=SensitivityConfig(keep_fraction=0.5, calibration_samples=2,
                                                                             granularity="layer"))
    with pytest.raises(Injected):
        quantize(model, config, calibration=[model_inputs("bert")])
    _assert_as_before(model, picture)


def test_nested_guards_take_one_snapshot_and_success_keeps_the_changes():
    model = tiny_model("bert")
    with all_or_nothing(model), all_or_nothing(model):
        model.classifier.weight.data.zero_()
        model.classifier = torch.nn.Linear(32, 3)
    assert model.classifier.out_features == 3  # finished: nothing restored
