"""Data: loading with `datasets` (local files or the Hub); each task prepares the rows (`hf_modelopt.tasks`)."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from .errors import RecipeError, UserError

DATA_DIR_VARIABLE = "HF_MODELOPT_DATA_DIR"

# File suffix -> (datasets builder, extra load_dataset arguments)
FILE_FORMATS = {
    ".tsv": ("csv", {"delimiter": "\t", "quoting": 3}),  # quoting=3: quotes are part of SST-2 sentences
    ".csv": ("csv", {}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
    ".txt": ("text", {}),
}
SPLIT_KEYS = {"train": "train_file", "eval": "eval_file"}


class DataConfig(BaseModel):
    """Where the data is and how much of it is read: what every task shares (the recipe's `data:`).

    Each task extends it with its own columns and lengths (`Task.data_config`: `TextClassificationData`,
    `QuestionAnsweringData`, ...), and a recipe's `data:` is validated with its task's class: a key another task
    reads (`doc_stride` in a classification recipe) is refused, naming it.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    # The default in a recipe file is the file's own folder, filled in by `load_recipe` (which also resolves a
    # relative data_dir against the file that wrote it): an installed package has no folder of its own to offer.
    data_dir: str = Field(
        default_factory=lambda: os.environ.get(DATA_DIR_VARIABLE, "."),
        description="Folder that `train_file` / `eval_file` are relative to. Relative, it resolves against the "
        "folder of the recipe file that sets it (like `extends:`); set with --set or from Python, against the "
        "current directory. Default: $HF_MODELOPT_DATA_DIR, else the recipe file's folder (from Python: the current "
        "directory).",
    )
    train_file: str | None = Field(None, description="Training data: .tsv, .csv, .json(l), .parquet or .txt.")
    eval_file: str | None = Field(None, description="Evaluation data, same formats as `train_file`.")
    dataset: str | None = Field(None, description="A Hub dataset name, used instead of files (e.g. `glue`).")
    dataset_config: str | None = Field(None, description="The Hub dataset's configuration (e.g. `sst2`).")
    train_split: str = Field("train", description="Split of `dataset` used for training.")
    eval_split: str = Field("validation", description="Split of `dataset` used for evaluation.")
    max_length: int = Field(128, gt=0, description="Tokens per example (classification) or per training block.")
    max_train_samples: int | None = Field(None, gt=0, description="Use only the first N training examples.")
    max_eval_samples: int | None = Field(None, gt=0, description="Use only the first N evaluation examples.")
    eval_fraction: float | None = Field(
        None, gt=0, lt=1, description="Hold out this fraction of the training rows (the last ones) as evaluation "
        "data, instead of eval_file / eval_split.",
    )
    eval_batch_size: int = Field(32, gt=0, description="Batch size of the evaluate stage.")

    def resolve(self, name: str | None) -> Path | None:
        return None if name is None else Path(self.data_dir).expanduser() / name


# Columns that several tasks read, declared once; a task's data class inherits the ones it reads.
class TextColumn(DataConfig):
    text_column: str = Field("text", description="Column holding the input text.")


class LabelColumn(DataConfig):
    label_column: str = Field("label", description="Column holding integer class labels (classification).")


class DataError(UserError):
    """The data cannot be used: a missing file or column, or an empty split."""


def data_files(config: DataConfig) -> dict[str, Path]:
    """The configured local files by split ("train", "eval"), resolved against `data_dir`."""
    files = {split: config.resolve(getattr(config, key)) for split, key in SPLIT_KEYS.items()}
    return {split: path for split, path in files.items() if path is not None}


def check_data(config: DataConfig, needed_splits: set[str], source: str) -> None:
    """Fail before any work when a needed split has no source or a file is missing or of unknown type."""
    for split, path in data_files(config).items():
        key = f"data.{SPLIT_KEYS[split]}"
        if path.suffix not in FILE_FORMATS:
            raise RecipeError(source, key, f"unsupported file type {path.suffix!r}; expected one of "
                                           f"{', '.join(FILE_FORMATS)}")
        if not path.is_file():
            hint = " (set data.data_dir or $HF_MODELOPT_DATA_DIR)" if not Path(config.data_dir).is_dir() else ""
            raise RecipeError(source, key, f"file not found: {path}{hint}")
    if config.eval_fraction is not None:
        needed_splits = (needed_splits - {"eval"}) | {"train"}  # evaluation rows come from the training data
    if config.dataset is None:
        for split in sorted(needed_splits - set(data_files(config))):
            raise RecipeError(source, f"data.{SPLIT_KEYS[split]}",
                              "a stage needs this split: set the file, or data.dataset for a Hub dataset")


def has_split(config: DataConfig, split: str) -> bool:
    """Whether the data configuration provides the "train" or "eval" split."""
    if config.dataset is not None or split in data_files(config):
        return True
    return split == "eval" and config.eval_fraction is not None and "train" in data_files(config)


def load_split(config: DataConfig, split: str):
    """Load the "train" or "eval" split as a `datasets.Dataset`, truncated to max_*_samples."""
    if config.eval_fraction is not None:  # both splits come from the training data, disjoint
        rows = _load_raw(config, "train")
        held_out = max(1, int(len(rows) * config.eval_fraction))
        first_eval_row = len(rows) - held_out
        dataset = rows.select(range(first_eval_row, len(rows)) if split == "eval" else range(first_eval_row))
    else:
        dataset = _load_raw(config, split)
    limit = config.max_train_samples if split == "train" else config.max_eval_samples
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    if len(dataset) == 0:
        raise DataError(f"data: the {split} split is empty")
    return dataset


def _load_raw(config: DataConfig, split: str):
    import datasets

    path = data_files(config).get(split)
    if path is not None:
        builder, kwargs = FILE_FORMATS[path.suffix]
        origin = str(path)
        try:
            dataset = datasets.load_dataset(builder, data_files={split: str(path)}, split=split, **kwargs)
        except ValueError as err:  # datasets refuses files without rows ("corresponds to no data")
            empty = "corresponds to no data" in str(err)
            problem = "is empty: the file holds no rows" if empty else f"cannot be read ({err})"
            raise DataError(f"{origin}: the {split} split {problem}") from None
    elif config.dataset is not None:
        hub_split = config.train_split if split == "train" else config.eval_split
        dataset = datasets.load_dataset(config.dataset, config.dataset_config, split=hub_split)
        origin = f"{config.dataset}[{hub_split}]"
    else:
        raise DataError(f"data.{SPLIT_KEYS[split]}: no {split} data configured")
    if len(dataset) == 0:
        raise DataError(f"{origin}: the {split} split is empty")
    return dataset


def require_columns(dataset, columns: list[str | None], origin: str) -> None:
    for column in columns:
        if column is not None and column not in dataset.column_names:
            raise DataError(f"{origin}: column {column!r} not found; the data has {dataset.column_names} "
                            f"(set the task's column keys in data:, e.g. data.text_column / data.label_column)")


def num_labels(dataset, config: LabelColumn) -> int:
    labels = dataset.unique(config.label_column)
    if not all(isinstance(label, int) and label >= 0 for label in labels):
        raise DataError(f"column {config.label_column!r} must hold integer class ids >= 0, found {labels[:5]}")
    return max(labels) + 1
