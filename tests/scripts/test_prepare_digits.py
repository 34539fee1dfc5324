import importlib.util

from ..conftest import REPO


def load_script():
    spec = importlib.util.spec_from_file_location("prepare_digits", REPO / "scripts" / "prepare_digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_digits_splits_and_untrained_vit_are_written_for_the_recipes(tmp_path):
    from datasets import Image, Value, load_dataset
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from hf_modelopt.data import check_data
    from hf_modelopt.recipe import load_recipe
    from hf_modelopt.tasks.image_classification import process_images

    load_script().main([str(tmp_path), "--seed", "0"])
    splits = load_dataset("parquet", data_files={split: str(tmp_path / "digits" / f"{split}.parquet")
                                                 for split in ("train", "validation")})
    for split in splits.values():
        assert split.features["image"] == Image() and split.features["label"] == Value("int64")
        assert sorted(split.unique("label")) == list(range(10))
        assert split[0]["image"].size == (32, 32) and split[0]["image"].mode == "RGB"
    assert (len(splits["train"]), len(splits["validation"])) == (1437, 360)  # all 1,797 digits, 80 / 20
    pixels = {split: {image.tobytes() for image in rows["image"]} for split, rows in splits.items()}
    assert not pixels["train"] & pixels["validation"]  # no image in both splits

    model = AutoModelForImageClassification.from_pretrained(tmp_path / "vit-tiny")
    processor = AutoImageProcessor.from_pretrained(tmp_path / "vit-tiny")
    assert model.config.model_type == "vit" and model.config.id2label[3] == "3" and model.config.num_labels == 10
    assert model.config.num_hidden_layers == 4 and 0.5e6 < model.num_parameters() < 0.6e6

    # The recipes find both where the script wrote them, and the model takes the processed images.
    recipe = load_recipe(REPO / "recipes" / "digits-vit" / "finetune.yaml",
                         [f"data.data_dir={tmp_path}", f"model.name_or_path={tmp_path / 'vit-tiny'}"])
    check_data(recipe.data, {"train", "eval"}, str(recipe.source))
    rows = process_images(splits["validation"].select(range(4)), processor, recipe.data).with_format("torch")[:]
    assert model(pixel_values=rows["pixel_values"]).logits.shape == (4, 10)
