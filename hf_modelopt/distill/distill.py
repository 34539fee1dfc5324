"""`distill`: knowledge distillation of a teacher into a student in one call, for a script as for a recipe.

`DistillationTrainer` changes the loss and nothing else; `distill` does everything around it that KD needs,
and the recipe stages (`distill`, and `prune` / `prune_structured` / `minitron` with `distillation:`) call it
too: the settings checked against the task, the vocabulary check of token-level KD, KD-only text rows (transfer
text, perturbed copies), the raw rows prepared as the task prepares them (`hf_modelopt.tasks.training_rows`), the
teacher-logit cache (one file, written by the main process), a teacher spread over devices, the layer map, eager
attention for attention losses, and the training itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from ..errors import UserError
from .config import DistillationConfig, KnowledgeDistillationConfig

logger = logging.getLogger("hf_modelopt")

# Task logits compared token by token (`Task.logits`): teacher and student must share one vocabulary.
TOKEN_LEVEL_LOGITS = ("decoder-token", "seq2seq-token")
CACHE_FILE = "teacher_logits.safetensors"


class DistillationSettingError(UserError):
    """A KD setting the task or the run cannot honour; `key` names the setting (a `KnowledgeDistillationConfig`
    field), `reason` says why and how to fix it. The recipe stages report it under their own key."""

    def __init__(self, key: str, reason: str):
        self.key, self.reason = key, reason
        super().__init__(f"{key}: {reason}")


class VocabularyMismatchError(UserError):
    """Teacher and student tokenize differently, so token-level KD would compare unrelated distributions."""


def check_distillation(config: KnowledgeDistillationConfig, task: str, data=None, *, evaluates: bool = False) -> None:
    """Refuse, before any work, what `task` or the run cannot do with `config`.

    Transfer text and perturbed copies are unlabelled examples: only for tasks that accept them (classification),
    and the transfer file must exist (`data.data_dir` resolves a relative one). The logit cache holds one logits
    tensor per training example, cut to the input's length: not for span or encoder-decoder logits, and not with
    evaluation during training (`evaluates`; it covers the training set only). Hidden-state and attention losses
    compare one stack of layers: not for encoder-decoders. A teacher spread over devices runs in one process, or
    several with the cache (the main process alone runs the teacher).

    Raises:
        DistillationSettingError: naming the setting (`err.key`) and the fix.
    """
    from ..compat import task_refusal
    from ..distributed import world_size
    from ..tasks import get_task

    spec = get_task(task)
    data = spec.data_settings(data)
    if config.transfer_file is not None:
        if not spec.accepts_unlabelled_text:
            raise DistillationSettingError("transfer_file", f"for classification only (task is {task}); a causal LM's "
                                           "training text is its own target: add the text to the training data")
        path = data.resolve(config.transfer_file)
        if not path.is_file():
            raise DistillationSettingError("transfer_file", f"file not found: {path}")
    if config.augmentation is not None and not spec.accepts_unlabelled_text:
        raise DistillationSettingError("augmentation", f"for classification only (task is {task}): a causal LM's "
                                       "training text is its own target")
    # What the task alone rules out is declared once, in compat's TASK_SUPPORT (the trainer reads it too).
    if config.generated_text is not None and (refusal := task_refusal("distillation on teacher-written text", task)):
        raise DistillationSettingError("generated_text", refusal)
    if config.cache_teacher_logits and (refusal := task_refusal("teacher logit cache", task)):
        raise DistillationSettingError("cache_teacher_logits", refusal)
    if config.needs_hidden_states and (refusal := task_refusal("distillation of hidden states", task)):
        weight = next(name for name in ("hidden_weight", "cosine_weight", "attention_weight") if getattr(config, name))
        raise DistillationSettingError(weight, refusal)
    if config.cache_teacher_logits and evaluates:
        raise DistillationSettingError("cache_teacher_logits", "the cache covers the training set only: evaluate "
                                       "after training (eval_strategy 'no') or turn the cache off")
    if config.teacher_device_map and world_size() > 1 and not config.cache_teacher_logits:
        raise DistillationSettingError("teacher_device_map", f"{world_size()} processes would each spread a teacher "
                                       "over the same devices; turn cache_teacher_logits on (the main process alone "
                                       "runs the teacher) or run one process")


def check_same_vocabulary(teacher_tokenizer, student_tokenizer) -> None:
    """Refuse token-level KD between tokenizers that differ; the message names the first difference."""
    teacher_vocab, student_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if teacher_vocab == student_vocab:
        return
    teacher_by_id = {i: t for t, i in teacher_vocab.items()}
    student_by_id = {i: t for t, i in student_vocab.items()}
    for token_id in range(max(len(teacher_by_id), len(student_by_id))):
        a, b = teacher_by_id.get(token_id), student_by_id.get(token_id)
        if a != b:
            raise VocabularyMismatchError(
                f"teacher and student vocabularies differ at token id {token_id}: teacher {a!r}, student {b!r} "
                f"(sizes {len(teacher_vocab)} and {len(student_vocab)}); token-level KD needs the same tokenizer")
    raise VocabularyMismatchError("teacher and student vocabularies differ in token ids beyond their sizes")


def transfer_sentences(path: Path, limit: int | None = None) -> list[str]:
    """Unlabelled sentences from a text file: one per line, long paragraphs split at ' . ' (WikiText style).

    Headings (`= Title =`) and fragments under four words are skipped.
    """
    sentences = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("="):
            continue
        for sentence in line.split(" . "):
            if len(sentence.split()) >= 4:
                sentences.append(sentence.strip().rstrip(" .") + " .")
                if limit is not None and len(sentences) >= limit:
                    return sentences
    return sentences


def with_kd_only_text(train, config: KnowledgeDistillationConfig, data, mask_token: str | None):
    """The raw training rows (text and label columns) followed by the unlabelled KD examples (label -100):
    transfer sentences, then perturbed copies of the labelled sentences."""
    import datasets

    from .augment import augmented_sentences

    sentences = []
    if config.transfer_file:
        path = data.resolve(config.transfer_file)  # (checked by check_distillation)
        sentences = transfer_sentences(path, config.max_transfer_samples)
        logger.info("distill: %d unlabelled transfer sentences from %s added for KD", len(sentences), path)
    if config.augmentation is not None:
        copies = augmented_sentences(list(train[data.text_column]), config.augmentation, mask_token)
        logger.info("distill: %d perturbed copies of the %d labelled sentences added for KD", len(copies), len(train))
        sentences += copies
    columns = {data.text_column: sentences, data.label_column: [-100] * len(sentences)}
    labelled = train.select_columns(list(columns))
    extra = datasets.Dataset.from_dict(columns).cast(labelled.features)
    return datasets.concatenate_datasets([labelled, extra])


@contextmanager
def eager_attention(*models) -> Iterator[None]:
    """Within the block `models` use the eager attention implementation, the one that returns attention maps;
    afterwards each gets its own implementation back."""
    before = [(model, model.config._attn_implementation) for model in models]
    for model, _ in before:
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        for model, implementation in before:
            model.set_attn_implementation(implementation)


def distill(teacher, student, tokenizer, train_data, config: DistillationConfig, training_args, *,
            task: str | None = None, data=None, eval_data=None, student_tokenizer=None,
            copied_from: list[int] | None = None, work_dir=None, shared_dir=None, callbacks=(),
            run_training: Callable | None = None):
    """Train `student` against the frozen `teacher` with `config`'s loss on `train_data`; returns the trainer.

    What the recipe's `distill` stage (and the pruning stages' `distillation:`) do, beyond reading the recipe:
    `train_data` (raw rows) is prepared as the task prepares training rows, so a script and a recipe train on
    identical rows. The student is trained in place; `trainer.model` is the trained student (a gathered copy
    when the student was sharded by FSDP2 / ZeRO-3 and `run_training` gathers it).

    Args:
        teacher: the frozen teacher model (put in eval mode; never trained).
        student: the model to train: e.g. from `student_from_teacher`, or a separate model of the same task.
        tokenizer: the teacher's processor (tokenizer, or image processor), which prepares every row.
        train_data: a `datasets.Dataset` of raw rows (e.g. text and label columns, named by `data`).
        config: a `KnowledgeDistillationConfig` (the loss, plus the logit cache, transfer text, augmentation,
            teacher placement), or a `DistillationConfig` (the loss alone).
        training_args: `transformers.TrainingArguments`; `remove_unused_columns` is turned off (in a copy): the
            rows carry `example_index`, which the logit cache is keyed by.
        task: a registered task name (`hf_modelopt.tasks.TASKS`); default: from the student's class.
        data: the task's data settings naming the columns and lengths of the rows (`Task.data_settings`; default
            for classification: columns `text` and `label`, 128 tokens); a relative `transfer_file` resolves
            against its `data_dir`.
        eval_data: raw evaluation rows, prepared the same way (the trainer's `eval_dataset`).
        student_tokenizer: a separate student's own tokenizer; token-level KD (causal LM, seq2seq) refuses one
            whose vocabulary differs from `tokenizer`'s (`VocabularyMismatchError`).
        copied_from: the teacher layers the student's layers were copied from (`student_from_teacher`'s second
            result): the default layer map of hidden-state / attention losses follows them.
        work_dir: scratch folder of the teacher layers offloaded to disk (`teacher_device_map`) and of the logit
            cache; default `training_args.output_dir`.
        shared_dir: the folder every process reads the logit cache from (the main process writes it); default
            `work_dir`. Under several processes with separate work folders, the main process's.
        callbacks: `TrainerCallback`s for the trainer (e.g. a `PruningCallback`).
        run_training: runs the trainer (default `trainer.train()`); the recipe runner passes its own, which
            resumes, records the log and gathers a sharded student.

    Raises:
        DistillationSettingError: a setting the task or the run cannot honour (see `check_distillation`).
        VocabularyMismatchError: token-level KD with a `student_tokenizer` of another vocabulary.

    Example:
        student, copied_from = student_from_teacher(teacher, layers=[0, 2, 4])
        trainer = distill(teacher, student, tokenizer, rows, KnowledgeDistillationConfig(ce_weight=0.5),
                          TrainingArguments("out", max_steps=600), data=DataConfig(text_column="sentence"),
                          copied_from=copied_from)
    """
    import dataclasses

    from ..compat import require_support
    from ..distributed import is_main_process, wait_for_everyone
    from ..tasks import get_task, infer_task, training_rows
    from .cache import CachedTeacherCollator, TeacherLogitCache, build_teacher_logit_cache
    from .placement import placed_teacher
    from .trainer import DistillationTrainer, default_layer_map

    for model in (student, teacher):
        require_support("distillation", model)
    if not isinstance(config, KnowledgeDistillationConfig):
        config = KnowledgeDistillationConfig(**config.model_dump())
    task = task or infer_task(student)
    data = get_task(task).data_settings(data)
    check_distillation(config, task, data, evaluates=training_args.eval_strategy != "no" or eval_data is not None)
    if student_tokenizer is not None and get_task(task).logits in TOKEN_LEVEL_LOGITS:
        check_same_vocabulary(tokenizer, student_tokenizer)
    if training_args.remove_unused_columns:
        training_args = dataclasses.replace(training_args, remove_unused_columns=False)
    work_dir = Path(work_dir if work_dir is not None else training_args.output_dir)
    shared_dir = Path(shared_dir) if shared_dir is not None else work_dir

    if config.transfer_file or config.augmentation is not None:
        train_data = with_kd_only_text(train_data, config, data, getattr(tokenizer, "mask_token", None))
    if config.generated_text is not None:
        from .generate import with_teacher_text

        train_data = with_teacher_text(train_data, teacher, tokenizer, config.generated_text, data, shared_dir)
    train, evaluation, collator = training_rows(task, tokenizer, train_data, eval_data, data)
    train = train.add_column("example_index", list(range(len(train))))
    layer_map = config.layer_map or default_layer_map(
        student.config.num_hidden_layers, teacher.config.num_hidden_layers, copied_from)
    # With teacher_device_map the teacher is spread over the devices by the one process that runs it: under
    # several processes check_distillation allows it only with the logit cache, which the main process builds.
    spread = config if config.teacher_device_map and is_main_process() else None
    with (eager_attention(teacher, student) if config.attention_weight else nullcontext(),
          placed_teacher(teacher, spread, work_dir)):
        teacher_for_trainer = teacher
        if config.cache_teacher_logits:
            # One cache, written by the main process; the others wait for it and read the same file.
            path = shared_dir / CACHE_FILE
            if is_main_process():
                shared_dir.mkdir(parents=True, exist_ok=True)
                build_teacher_logit_cache(teacher, train, collator, path, config.top_k, batch_size=data.eval_batch_size)
            wait_for_everyone()
            collator = CachedTeacherCollator(collator, TeacherLogitCache(path))
            teacher_for_trainer = None  # the teacher is not needed any more: every logit comes from the cache
        trainer = DistillationTrainer(
            model=student,
            teacher=teacher_for_trainer,
            task=task,
            distillation=config,
            layer_map=layer_map if teacher_for_trainer is not None else {},
            args=training_args,
            train_dataset=train,
            eval_dataset=evaluation,
            data_collator=collator,
            processing_class=tokenizer,
            callbacks=list(callbacks),
        )
        (run_training or (lambda trained: trained.train()))(trainer)
    if config.attention_weight and trainer.model is not student:  # a gathered copy of a sharded student
        trainer.model.set_attn_implementation(student.config._attn_implementation)
    return trainer
