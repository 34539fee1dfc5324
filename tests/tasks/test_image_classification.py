from hf_modelopt.data import load_split
from hf_modelopt.modeling import ModelConfig, load_tokenizer
from hf_modelopt.tasks import ImageClassificationData
from hf_modelopt.tasks.image_classification import probe_batch, process_images


def test_images_become_pixel_values_with_the_models_image_processor(tiny_models, task_data):
    processor = load_tokenizer(ModelConfig(name_or_path=str(tiny_models("vit", "image-classification"))),
                               task="image-classification")
    assert type(processor).__name__.startswith("ViTImageProcessor")
    config = ImageClassificationData(**task_data("image-classification"))
    rows = process_images(load_split(config, "train"), processor, config)
    assert rows.column_names == ["pixel_values", "labels"] and len(rows) == 24
    assert [len(rows[0]["pixel_values"]), len(rows[0]["pixel_values"][0])] == [3, 32]
    assert tuple(probe_batch(processor)["pixel_values"].shape) == (4, 3, 32, 32)
