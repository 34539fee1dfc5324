"""`save_compressed`: each kind of model in the format that expresses it, reloaded in a fresh process with what
its format says to import (and nothing of hf_modelopt where that is plain transformers)."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from hf_modelopt import PruningConfig, QuantizationConfig, StructuredPruningConfig, prune_, quantize, save_compressed
from hf_modelopt.quant import StorageQuantizationConfig

RELOAD = """
import json, sys
{imports}
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
model = AutoModelForSequenceClassification.from_pretrained(sys.argv[1]).eval()
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
batch = tokenizer(["a fine film", "dull"], padding=True, return_tensors="pt")
with torch.no_grad():
    logits = model(**batch).logits
print(json.dumps({{"logits": logits.tolist(), "hf_modelopt_imported": "hf_modelopt" in sys.modules}}))
"""


def reload_in_fresh_process(folder, loads_with):
    imports = "import hf_modelopt" if loads_with == "hf_modelopt" else ""
    run = subprocess.run([sys.executable, "-c", RELOAD.format(imports=imports), str(folder)], capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["hf_modelopt_imported"] == (loads_with == "hf_modelopt")
    return torch.tensor(result["logits"])


def logits_of(model, tokenizer):
    batch = tokenizer(["a fine film", "dull"], padding=True, return_tensors="pt")
    with torch.no_grad():
        return model.eval()(**batch).logits


@pytest.mark.parametrize("kind,expected", [("dense", ("dense", "transformers")),
                                           ("sparse", ("hf-modelopt", "hf_modelopt")),
                                           ("storage", ("compressed-tensors", "transformers")),
                                           ("storage-hf_modelopt", ("hf-modelopt", "hf_modelopt")),
                                           ("structured", ("hf-modelopt", "hf_modelopt")),
                                           ("bitsandbytes", ("bitsandbytes", "transformers"))])
def test_each_kind_of_model_saves_in_its_format_and_reloads(wide_tiny_models, tmp_path, kind, expected):
    folder = wide_tiny_models("bert")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    options, atol = {}, 1e-5
    if kind in ("dense", "sparse", "storage", "storage-hf_modelopt"):
        prune_(model, PruningConfig(sparsity=0.6))
    if kind == "sparse":
        options = {"sparse": True}
    if kind.startswith("storage"):  # int8 codes: close, not equal
        format_name = "hf_modelopt" if kind.endswith("hf_modelopt") else "compressed-tensors"
        options, atol = {"storage": StorageQuantizationConfig(format=format_name)}, 0.05
    if kind == "structured":  # BERT with fewer heads: no config field can say so
        prune_(model, StructuredPruningConfig(heads=0.5, importance="magnitude"))
    if kind == "bitsandbytes":
        model = quantize(model, QuantizationConfig(method="int8"))
    expected_logits = logits_of(model, tokenizer)  # (a forward pass before saving: save_compressed copes)
    fmt = save_compressed(model, tmp_path / kind, tokenizer, **options)
    assert (fmt.name, fmt.loads_with) == expected
    reloaded = reload_in_fresh_process(tmp_path / kind, fmt.loads_with)
    assert torch.allclose(reloaded, expected_logits, atol=atol), (reloaded - expected_logits).abs().max()


def test_sparse_format_is_smaller_on_disk(tiny_models, tmp_path):
    from hf_modelopt.formats import weights_size_on_disk
    from hf_modelopt.prune.masks import prunable_linears

    model = AutoModelForSequenceClassification.from_pretrained(tiny_models("bert"))
    prune_(model, PruningConfig(sparsity=0.9))
    save_compressed(model, tmp_path / "dense")
    save_compressed(model, tmp_path / "sparse", sparse=True)
    pruned_bytes = sum(m.weight.numel() * 4 for m in prunable_linears(model).values())
    saved = weights_size_on_disk(tmp_path / "dense") - weights_size_on_disk(tmp_path / "sparse")
    # fp32 at 90 % sparsity: 0.1 x 32 bits per kept value + 1 bit of mask, against 32 bits: at most 87 % of those
    # bytes saved (less the names of the extra bitmask tensors in the file's header)
    assert 0.8 * pruned_bytes < saved <= 0.87 * pruned_bytes


def test_options_that_do_not_apply_are_refused(wide_tiny_models, tmp_path):
    model = quantize(AutoModelForSequenceClassification.from_pretrained(wide_tiny_models("bert")),
                     QuantizationConfig(method="int8"))
    with pytest.raises(ValueError, match="bitsandbytes"):
        save_compressed(model, tmp_path / "x", sparse=True)


# --------------------------------------------------------------------------- the folder loads as `loads_with` says


def test_a_compressed_tensors_folder_that_does_not_load_is_written_again_in_hf_modelopts_format(tmp_path, caplog):
    # ModernBERT's weight initialisation reads `.weight` of the layers compressed-tensors replaces: the folder said
    # `loads_with: transformers` and failed in plain from_pretrained (issue 30). Checked in a fresh process that
    # imports transformers alone, as a user loads it.
    from tests.matrix.common import logits_of, tiny_model

    model = tiny_model("modernbert")
    folder = tmp_path / "storage"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")  # a user's file: the rewrite removes only what save_compressed wrote
    with caplog.at_level("WARNING", logger="hf_modelopt"):
        fmt = save_compressed(model, folder, storage=StorageQuantizationConfig(linear_bits=8), verify="fresh-process")
    assert (fmt.name, fmt.loads_with) == ("hf-modelopt", "hf_modelopt")
    assert any("does not load with plain transformers (RuntimeError: AttributeError: 'Linear' object has no "
               "attribute 'weight')" in r.getMessage() for r in caplog.records)
    assert (folder / "notes.txt").read_text() == "mine"
    config = json.loads((folder / "config.json").read_text())  # nothing of the compressed-tensors attempt is left
    assert config["quantization_config"]["quant_method"] == "hf_modelopt"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "notes.txt"]
    from transformers import AutoModelForSequenceClassification as Auto

    import hf_modelopt  # noqa: F401  (the format it names)

    reloaded = Auto.from_pretrained(folder)
    expected = logits_of(model, "modernbert")
    spread = (expected - expected.mean(-1, keepdim=True)).norm()
    assert (logits_of(reloaded, "modernbert") - expected).norm() / spread < 0.05


def test_a_folder_that_loads_is_returned_as_written(tmp_path):
    from tests.matrix.common import tiny_model

    fmt = save_compressed(tiny_model("bert"), tmp_path / "s", storage=StorageQuantizationConfig(linear_bits=8),
                          verify="fresh-process")
    assert (fmt.name, fmt.loads_with) == ("compressed-tensors", "transformers")


def test_a_folder_that_loads_in_no_format_fails_loudly_in_one_line(tmp_path, monkeypatch):
    from hf_modelopt.export import compressed
    from tests.matrix.common import tiny_model

    monkeypatch.setattr(compressed, "_loading_info", lambda *a: {"missing_keys": ["bert.pooler.dense.weight"]})
    with pytest.raises(compressed.ExportLoadError) as failed:
        save_compressed(tiny_model("bert"), tmp_path / "s", sparse=True)
    message = str(failed.value)
    assert "\n" not in message and message.endswith(
        "is in the hf-modelopt format, which loads with hf_modelopt, but loading it (in-process) failed: 1 weights not "
        "found, so initialised at random (first: bert.pooler.dense.weight)")
    with pytest.raises(ValueError, match="verify must be one of"):
        save_compressed(tiny_model("bert"), tmp_path / "t", verify="yes")
