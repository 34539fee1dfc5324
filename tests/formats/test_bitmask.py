import torch
from transformers import AutoModelForSequenceClassification

from hf_modelopt.formats.bitmask import pack_bitmask, unpack_bitmask
from hf_modelopt.formats.detect import weights_size_on_disk
from hf_modelopt.formats.hf_modelopt import save_sparse
from hf_modelopt.prune.masks import apply_masks_, masks_from_scores, prunable_linears


def test_bitmask_round_trip_odd_sizes():
    for shape in [(3, 5), (1, 1), (7, 9), (8, 16)]:
        mask = torch.rand(shape) > 0.5
        assert torch.equal(unpack_bitmask(pack_bitmask(mask), shape), mask)


def test_sparse_checkpoint_round_trip_is_exact_and_smaller(tiny_models, tmp_path):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_models("roberta"))
    modules = prunable_linears(model)
    apply_masks_(modules, masks_from_scores({n: m.weight.abs() for n, m in modules.items()}, 0.8))
    model.save_pretrained(tmp_path / "dense")
    compressed = save_sparse(model, tmp_path / "sparse")
    assert sorted(compressed) == sorted(modules)  # the classifier head is dense (not sparse enough)
    assert "quantization_config" not in model.config.to_dict()  # the model in memory is left as it was
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "sparse")
    assert getattr(reloaded.config, "quantization_config", None) is None  # a plain model once loaded
    for (name, a), b in zip(model.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), name
    dense_linear = sum(m.weight.numel() * 4 for m in modules.values())
    saved = weights_size_on_disk(tmp_path / "dense") - weights_size_on_disk(tmp_path / "sparse")
    assert saved > 0.6 * dense_linear  # 80 % zeros: values 0.2 × 32 bits + 1 bit mask per weight
