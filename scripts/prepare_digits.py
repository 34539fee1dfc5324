#!/usr/bin/env python
"""Write the handwritten digits of scikit-learn and a small untrained ViT, for the `recipes/digits-vit/` recipes.

The data: `sklearn.datasets.load_digits()`, 1,797 real 8 x 8 grey images of the digits 0-9 (UCI "Optical
Recognition of Handwritten Digits", 43 writers), shipped inside the scikit-learn wheel, so nothing is
downloaded. Each image is scaled from 0-16 to 0-255 and upscaled 4x with nearest-neighbour resampling to a
32 x 32 RGB image (every 8 x 8 patch of the ViT below is 2 x 2 original pixels). A fixed stratified split
(`--eval-fraction`, default 20 %, shuffled with `--seed`) gives

    OUT_DIR/digits/train.parquet        1,437 rows   (image: datasets Image feature, label: int64 0-9)
    OUT_DIR/digits/validation.parquet     360 rows

The model: `OUT_DIR/vit-tiny/`, a ViT image classifier built from a config (hidden size 128, 4 layers,
4 heads, FFN 256, 32 x 32 images in 16 patches of 8 x 8, 10 labels with id2label "0".."9"; 0.56 M parameters),
initialised with `--seed` and saved with `save_pretrained` beside a `ViTImageProcessor` for 32 x 32 images.
No pretrained ViT can be downloaded here, so the recipes train it from scratch.

OUT_DIR is yours (e.g. `digits-data`, ignored by git); the recipes expect `digits-data` at the repository
root, run from there, or `--set data.data_dir=OUT_DIR --set model.name_or_path=OUT_DIR/vit-tiny`.

Usage: python scripts/prepare_digits.py OUT_DIR [--seed 0] [--eval-fraction 0.2]
Needs scikit-learn and pillow: pip install 'hf-modelopt[tasks]'.
"""

from __future__ import annotations

import argparse
from pathlib import Path

IMAGE_SIZE = 32  # pixels per side after upscaling the 8 x 8 originals
VIT_CONFIG = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256,
                  image_size=IMAGE_SIZE, patch_size=8, num_channels=3)


def digit_images(images) -> list:
    """8 x 8 arrays of 0-16 -> 32 x 32 RGB PIL images, nearest-neighbour, so no pixel is invented."""
    import numpy as np
    from PIL import Image

    grey = (np.asarray(images, dtype=np.float32) * (255 / 16)).round().astype(np.uint8)
    return [Image.fromarray(g, mode="L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.NEAREST).convert("RGB")
            for g in grey]


def write_digits(folder: Path, seed: int, eval_fraction: float) -> dict[str, int]:
    """The stratified train / validation split as parquet files; returns the rows per split."""
    from datasets import Dataset, Features, Image, Value
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    train_ids, eval_ids = train_test_split(range(len(digits.target)), test_size=eval_fraction, random_state=seed,
                                           stratify=digits.target)
    features = Features({"image": Image(), "label": Value("int64")})
    folder.mkdir(parents=True, exist_ok=True)
    rows = {}
    for split, ids in (("train", train_ids), ("validation", eval_ids)):
        ids = sorted(ids)  # the split is fixed by the seed; the file order need not be shuffled
        dataset = Dataset.from_dict({"image": digit_images(digits.images[ids]),
                                     "label": [int(label) for label in digits.target[ids]]}, features=features)
        dataset.to_parquet(folder / f"{split}.parquet")
        rows[split] = len(dataset)
    return rows


def write_vit(folder: Path, seed: int) -> int:
    """A randomly initialised ViT classifier for 10 digits and its image processor; returns its parameters."""
    import torch
    from transformers import AutoModelForImageClassification, ViTConfig, ViTImageProcessor

    labels = [str(digit) for digit in range(10)]
    config = ViTConfig(**VIT_CONFIG, num_labels=10, id2label=dict(enumerate(labels)),
                       label2id={label: i for i, label in enumerate(labels)})
    torch.manual_seed(seed)
    model = AutoModelForImageClassification.from_config(config)
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(folder)
    return model.num_parameters()


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="Folder to write digits/ and vit-tiny/ into (e.g. digits-data).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the split and of the ViT's initialisation.")
    parser.add_argument("--eval-fraction", type=float, default=0.2, help="Share of the images held out for "
                        "validation, stratified by digit.")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = make_parser().parse_args(argv)
    if not 0 < args.eval_fraction < 1:
        raise SystemExit(f"--eval-fraction must be between 0 and 1, got {args.eval_fraction}")
    rows = write_digits(args.out_dir / "digits", args.seed, args.eval_fraction)
    parameters = write_vit(args.out_dir / "vit-tiny", args.seed)
    print(f"{args.out_dir / 'digits'}: {rows['train']} train and {rows['validation']} validation images; "
          f"{args.out_dir / 'vit-tiny'}: ViT with {parameters / 1e6:.2f} M parameters (untrained)")


if __name__ == "__main__":
    main()
