"""The tasks hf-modelopt serves: one module per task, each defining a `Task`, and the one registry `TASKS`.

A task says which transformers Auto class loads its models, which `data:` settings it reads (its `DataConfig`
subclass, `Task.data_config`), how raw data rows become training rows, how a model is evaluated and which
metric ranks models (`Task.main_metric`), how knowledge distillation compares its logits (`Task.logits`), which
columns the data must have and which pipeline tag its model cards carry. Everything that differs between tasks
asks `TASKS` (or `get_task`) instead of testing the task's name.

A new task: a module here defining `TASK = Task(...)`, added to `TASKS` below.
"""

from __future__ import annotations

from . import (
    causal_lm,
    image_classification,
    question_answering,
    seq2seq,
    text_classification,
    token_classification,
)
from .causal_lm import CausalLMData  # noqa: F401  (re-exported: each task's data settings)
from .image_classification import ImageClassificationData  # noqa: F401
from .question_answering import QuestionAnsweringData  # noqa: F401
from .seq2seq import Seq2SeqData  # noqa: F401
from .task import PROBE_TEXTS, LogitsShape, Task, text_probe_batch  # noqa: F401  (re-exported)
from .text_classification import TextClassificationData  # noqa: F401
from .token_classification import TokenClassificationData  # noqa: F401

TASKS: dict[str, Task] = {task.name: task for task in (
    text_classification.TASK, causal_lm.TASK, token_classification.TASK, question_answering.TASK,
    seq2seq.TASK, image_classification.TASK,
)}


def get_task(name: str) -> Task:
    """The registered task called `name`; a `ValueError` naming the known ones otherwise."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; expected one of: {', '.join(TASKS)}") from None


def training_rows(task: str, processor, train, evaluation=None, data=None):
    """Raw rows -> what a trainer of `task` trains on: `(train_rows, eval_rows, collator)`.

    `train` / `evaluation` are `datasets.Dataset`s of raw rows (`evaluation` may be None: `eval_rows` is then
    None); `data` is the task's data settings naming their columns and lengths (`Task.data_settings`: default, the
    task's defaults). The recipe's
    stages and the technique functions (`hf_modelopt.distill.distill`) both prepare their rows here, so a script
    and a recipe train on identical rows.
    """
    spec = get_task(task)
    data = spec.data_settings(data)
    rows = spec.prepare_train(train, processor, data)
    eval_rows = spec.prepare_train(evaluation, processor, data) if evaluation is not None else None
    return rows, eval_rows, spec.collator(processor)


def model_task(model) -> str | None:
    """The registered task a model's class is built for (`BertForTokenClassification` -> "token-classification"),
    or None (`BertModel`, a masked LM, a class of a head no task serves)."""
    name = _class_name(model)
    return next((task.name for task in TASKS.values() if task.recognises(name)), None)


def infer_task(model) -> str:
    """`model_task`, or a `ValueError` asking for the task."""
    task = model_task(model)
    if task is None:
        raise ValueError(f"cannot tell the task of a {_class_name(model)}: pass task= (one of {', '.join(TASKS)})")
    return task


def _class_name(model) -> str:
    return type(getattr(model, "get_base_model", lambda: model)()).__name__  # a peft model: the model inside


def check_data_contents(config, task: str, splits: set[str], source: str) -> int | None:
    """Load each split in `splits` once, before any work: an empty split or a column the data lacks is named.

    Returns the number of classes in the labels (tasks with class labels: of the training split if loaded,
    else the evaluation split), else None.
    """
    from ..data import data_files, has_split, load_split
    from ..errors import RecipeError

    spec = get_task(task)
    labels = None
    for split in sorted(splits, reverse=True):  # "train" first: its labels define the classes
        if not has_split(config, split):
            continue
        dataset = load_split(config, split)
        path = data_files(config).get("train" if config.eval_fraction is not None else split)
        origin = str(path) if path is not None else f"{config.dataset} ({split})"
        for key, column in spec.columns(config).items():
            if column is not None and column not in dataset.column_names:
                raise RecipeError(source, key, f"column {column!r} not found in {origin}; its columns are: "
                                               f"{', '.join(dataset.column_names)}")
        if spec.count_labels is not None and labels is None:
            labels = spec.count_labels(dataset, config)
    return labels
