"""image-classification (ViT-style): one class per image; accuracy and F1, as for text classification.

Rows hold an image (`data.image_column`, default `image`: a datasets `Image` feature, or PIL images) and an
integer class (`data.label_column`). The model's processor is its image processor (`AutoImageProcessor`),
which the project passes where text tasks pass a tokenizer: it resizes and normalises the images into the
`pixel_values` the model takes.
"""

from __future__ import annotations

from pydantic import Field

from ..data import LabelColumn, num_labels, require_columns
from .task import Task
from .text_classification import predict_classes


class ImageClassificationData(LabelColumn):
    """The `data:` of an image-classification recipe: the image and label columns."""

    image_column: str = Field("image", description="image-classification: column holding the images (a datasets "
                              "Image feature, or PIL images).")


def _rgb(image):
    from PIL import Image

    if not isinstance(image, Image.Image):  # e.g. a numpy array
        import numpy as np

        image = Image.fromarray(np.asarray(image))
    return image.convert("RGB")


def process_images(dataset, processor, config: ImageClassificationData):
    """`pixel_values` from the images and `labels` from the label column."""
    from ..extras import require_extra

    require_extra("image classification", *TASK.packages)
    require_columns(dataset, [config.image_column, config.label_column], "data")

    def encode(batch):
        encoded = processor(images=[_rgb(image) for image in batch[config.image_column]])
        return {"pixel_values": encoded["pixel_values"], "labels": batch[config.label_column]}

    return dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc="Processing images")


def collator(processor):
    from transformers import default_data_collator

    return default_data_collator  # every image is processed to the same size


def evaluate(model, processor, dataset, config: ImageClassificationData) -> dict[str, float]:
    rows = process_images(dataset, processor, config)
    return predict_classes(model, rows, collator(processor), config.eval_batch_size)


def probe_batch(processor) -> dict:
    """Four fixed 32 x 32 images (gradients and a checkerboard), processed: the reload check's probe batch."""
    import numpy as np
    from PIL import Image

    ramp = np.linspace(0, 255, 32, dtype=np.float32)
    planes = [np.add.outer(ramp, ramp) / 2, np.add.outer(ramp, 255 - ramp) / 2,
              np.indices((32, 32)).sum(0) % 2 * 255.0, np.full((32, 32), 128.0)]
    images = [Image.fromarray(np.stack([p, p[::-1], p.T], -1).astype(np.uint8)) for p in planes]
    return dict(processor(images=images, return_tensors="pt"))


def random_inputs(model, batch_size: int, seq_len: int, generator) -> dict:
    """Random images of the model's size (`seq_len` does not apply)."""
    import torch

    size, channels = model.config.image_size, model.config.num_channels
    return {"pixel_values": torch.randn(batch_size, channels, size, size, generator=generator)}


def columns(config: ImageClassificationData) -> dict[str, str | None]:
    return {"data.image_column": config.image_column, "data.label_column": config.label_column}


TASK = Task(
    name="image-classification",
    auto_class="AutoModelForImageClassification",
    peft_auto_class="AutoPeftModel",  # peft has no class for image classifiers; its generic one loads the adapter
    pipeline_tag="image-classification",
    model_kind="image classifier",
    head_mapping="MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
    head_suffixes=("ForImageClassification",),
    logits="sequence",
    data_config=ImageClassificationData,
    columns=columns,
    prepare_train=process_images,
    collator=collator,
    evaluate=evaluate,
    main_metric="accuracy",
    count_labels=num_labels,
    processor_class="AutoImageProcessor",
    probe_batch=probe_batch,
    random_inputs=random_inputs,
    head_noun="classification head",
    packages=("PIL",),  # images are PIL images (datasets' Image feature decodes to them)
)
