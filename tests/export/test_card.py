import yaml
from huggingface_hub import ModelCard

from hf_modelopt.pipeline import run_recipe
from hf_modelopt.recipe import validate_recipe

from ..conftest import tiny_recipe


def test_card_has_valid_metadata_and_before_after(tiny_models, sst2_files, tmp_path):
    run_recipe(validate_recipe(tiny_recipe(tiny_models("distilbert"), sst2_files)), tmp_path / "out")
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert "hf-modelopt" in card.data.tags and "finetune" in card.data.tags
    assert card.data.pipeline_tag == "text-classification"
    text = card.text
    assert "(stage `before`)" in text and "(stage `after`)" in text and "| accuracy |" in text
    # The recipe embedded in the card is the resolved one and parses.
    embedded = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(embedded)["task"] == "text-classification"
