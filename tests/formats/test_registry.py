"""The format registry: a model in memory is written by the writer of the format it is in, and a registered format
brings its detection and its writer together."""

import json

import pytest
from transformers import AutoModelForSequenceClassification

from hf_modelopt.formats import detect
from hf_modelopt.formats.export_format import ExportFormat, save_pretrained_with_tokenizer
from hf_modelopt.stages import ModelState, save_model_state

MARKER = "tagged.json"


def _write_tagged(model, folder, tokenizer=None):
    save_pretrained_with_tokenizer(model, folder, tokenizer)
    (folder / MARKER).write_text(json.dumps({"tag": model.tag}))


TAGGED = ExportFormat("tagged", "transformers", lambda folder: (folder / MARKER).is_file(), "a test format",
                      holds=lambda model: hasattr(model, "tag"), write=_write_tagged)


@pytest.fixture
def registered():
    before = list(detect.EXPORT_FORMATS)
    detect.register_export_format(TAGGED)
    yield
    detect.EXPORT_FORMATS[:] = before


def test_a_plain_model_is_written_dense(tiny_models, tmp_path):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_models("bert"))
    assert detect.format_of_model(model).name == "dense"
    assert detect.write_model(model, tmp_path / "m").name == "dense"
    assert detect.detect_format(tmp_path / "m").name == "dense"


def test_a_registered_format_writes_the_models_it_holds(registered, tiny_models, tmp_path):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_models("bert"))
    assert detect.format_of_model(model).name == "dense"  # not tagged: the built-in formats as before
    model.tag = "mine"
    save_model_state(ModelState(model=model), tmp_path / "stage")  # the recipe runner's save dispatches too
    assert json.loads((tmp_path / "stage" / MARKER).read_text()) == {"tag": "mine"}
    assert detect.detect_format(tmp_path / "stage").name == "tagged"


def test_a_format_that_holds_models_must_write_them():
    with pytest.raises(ValueError, match="`holds` and `write` come together"):
        detect.register_export_format(ExportFormat("half", "transformers", lambda folder: False,
                                                   holds=lambda model: True))
