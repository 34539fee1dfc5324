"""The `distill` recipe stage: the incoming model is the teacher; the stage's output is the student.

Also the KD training that the pruning stages share (`train_with_distillation`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pydantic import Field

from ..distill.config import KnowledgeDistillationConfig, StudentConfig
from ..distributed import world_size
from ..errors import RecipeError, UserError
from . import ModelState, StageConfig, StageContext, ensure_loaded, register_stage
from .train import refuse_training_after

logger = logging.getLogger("hf_modelopt")


class VocabularyMismatchError(UserError):
    """Teacher and student tokenize differently, so token-level KD would compare unrelated distributions."""


def check_kd_settings(kd: KnowledgeDistillationConfig, recipe, stage_training: dict[str, Any], key: str) -> None:
    """Transfer text must exist; it and augmentation are for classification; the logit cache excludes
    evaluation in training; a teacher spread over devices runs in one process (or builds the cache).

    `key` is where these settings sit in the recipe (for the error message).
    """
    from ..compat import task_refusal
    from ..tasks import get_task

    task = get_task(recipe.task)
    if kd.transfer_file is not None:
        if not task.accepts_unlabelled_text:
            raise RecipeError(recipe.source, f"{key}.transfer_file",
                              "for classification only; for causal LMs add the text to data.train_file")
        path = recipe.data.resolve(kd.transfer_file)
        if not path.is_file():
            raise RecipeError(recipe.source, f"{key}.transfer_file", f"file not found: {path}")
    if kd.augmentation is not None and not task.accepts_unlabelled_text:
        raise RecipeError(recipe.source, f"{key}.augmentation", "for classification only: a causal LM's "
                          "training text is its own target")
    if kd.cache_teacher_logits and (refusal := task_refusal("teacher logit cache", recipe.task)):
        raise RecipeError(recipe.source, f"{key}.cache_teacher_logits", refusal)
    if kd.needs_hidden_states and (refusal := task_refusal("distillation of hidden states", recipe.task)):
        weights = [name for name in ("hidden_weight", "cosine_weight", "attention_weight") if getattr(kd, name)]
        raise RecipeError(recipe.source, f"{key}.{weights[0]}", refusal)
    evaluates = {**recipe.training, **stage_training}.get("eval_strategy", "no") not in ("no", None)
    if kd.cache_teacher_logits and evaluates:
        raise RecipeError(recipe.source, f"{key}.cache_teacher_logits", "the cache covers the training set "
                          "only; set training.eval_strategy to 'no' in this stage or turn the cache off")
    if kd.teacher_device_map and world_size() > 1 and not kd.cache_teacher_logits:
        raise RecipeError(recipe.source, f"{key}.teacher_device_map", f"{world_size()} processes would each "
                          "spread a teacher over the same devices; set cache_teacher_logits: true (the main "
                          "process alone runs the teacher) or run one process")


class DistillStageConfig(StageConfig, KnowledgeDistillationConfig):
    """The `distill` stage: knowledge distillation of the incoming model (the teacher) into a student."""

    student: StudentConfig = Field(description="How the student is built.")
    training: dict[str, Any] = Field(
        default_factory=dict, description="TrainingArguments for this stage only, over the recipe's `training:`.",
    )
    requires_data = ("train",)

    def check_after(self, earlier) -> None:
        refuse_training_after("distill", earlier)

    def preflight(self, recipe) -> None:
        """Transfer text must exist (classification only); token-level KD needs one vocabulary."""
        from ..tasks import get_task

        check_kd_settings(self, recipe, self.training, "distill")
        if self.student.decoder_layers is not None:
            _check_has_decoder(recipe, self.student.decoder_layers)
        if self.student.name_or_path:
            self._check_student_labels(recipe)
        if get_task(recipe.task).logits in ("decoder-token", "seq2seq-token") and self.student.name_or_path:
            from ..modeling import ModelConfig, load_tokenizer

            student = ModelConfig(name_or_path=self.student.name_or_path)
            check_same_vocabulary(load_tokenizer(recipe.model), load_tokenizer(student))

    def _check_student_labels(self, recipe) -> None:
        """A separate student must suit the task and, as a classifier, name its classes as the teacher does."""
        from ..modeling import ModelConfig, check_model_for_task
        from ..tasks import check_data_contents, get_task

        labels = check_data_contents(recipe.data, recipe.task, {"train"}, recipe.source)
        key = "distill.student.name_or_path"
        student = check_model_for_task(ModelConfig(name_or_path=self.student.name_or_path), recipe.task, labels,
                                       key, recipe.source)
        teacher = check_model_for_task(recipe.model, recipe.task, labels, "model.name_or_path", recipe.source)
        if get_task(recipe.task).count_labels is None:
            return

        def named(config) -> dict[int, str] | None:  # None: the default LABEL_0, LABEL_1, ... (no names given)
            names = {int(i): str(label) for i, label in (config.id2label or {}).items()}
            return None if all(label == f"LABEL_{i}" for i, label in names.items()) else names

        if named(teacher) and named(student) and named(teacher) != named(student):
            raise RecipeError(recipe.source, key, f"the student's classes {named(student)} are not the teacher's "
                              f"{named(teacher)}: soft targets would teach the wrong classes")


def _check_has_decoder(recipe, decoder_layers: list[int]) -> None:
    """`student.decoder_layers` needs an encoder-decoder teacher (the recipe's model; earlier stages keep its type)
    with those decoder layers."""
    from transformers import AutoConfig

    spec = recipe.model
    kwargs = {"trust_remote_code": spec.trust_remote_code, "revision": spec.revision}
    if spec.gguf_file:
        kwargs["gguf_file"] = spec.gguf_file
    config = AutoConfig.from_pretrained(spec.name_or_path, **kwargs)
    key = "distill.student.decoder_layers"
    if not getattr(config, "is_encoder_decoder", False):
        raise RecipeError(recipe.source, key, f"{spec.name_or_path} is a {config.model_type!r} model without a "
                          "decoder stack: remove decoder_layers (layers / every choose its layers)")
    count = next((getattr(config, name) for name in ("num_decoder_layers", "decoder_layers")
                  if isinstance(getattr(config, name, None), int)), None)
    bad = [i for i in decoder_layers if count is not None and i >= count]
    if bad:
        raise RecipeError(recipe.source, key, f"{bad} out of range: the teacher's decoder has layers 0..{count - 1}")


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
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("="):
            continue
        for sentence in line.split(" . "):
            if len(sentence.split()) >= 4:
                sentences.append(sentence.strip().rstrip(" .") + " .")
                if limit is not None and len(sentences) >= limit:
                    return sentences
    return sentences


def _with_kd_only_text(train, recipe, config: KnowledgeDistillationConfig, mask_token: str | None):
    """Append the unlabelled KD examples (label -100) to the raw training split: transfer sentences, then
    perturbed copies of the labelled sentences."""
    import datasets

    from ..distill.augment import augmented_sentences

    sentences = []
    if config.transfer_file:
        path = recipe.data.resolve(config.transfer_file)  # checked in DistillationConfig.preflight
        sentences = transfer_sentences(path, config.max_transfer_samples)
        logger.info("distill: %d unlabelled transfer sentences from %s added for KD", len(sentences), path)
    if config.augmentation is not None:
        copies = augmented_sentences(list(train[recipe.data.text_column]), config.augmentation, mask_token)
        logger.info("distill: %d perturbed copies of the %d labelled sentences added for KD", len(copies), len(train))
        sentences += copies
    columns = {recipe.data.text_column: sentences, recipe.data.label_column: [-100] * len(sentences)}
    extra = datasets.Dataset.from_dict(columns).cast(train.features)
    return datasets.concatenate_datasets([train.select_columns(list(columns)), extra])


def train_with_distillation(teacher, student, tokenizer, config: KnowledgeDistillationConfig,
                            stage_training: dict, context: StageContext, copied_from=None, callbacks=()):
    """Train `student` against the frozen `teacher` with `config`'s loss; returns the finished trainer.

    Shared by every stage that trains with KD (`distill`, `prune`, ...); `callbacks` go to the Trainer.
    """
    from ..data import load_split
    from ..distill.cache import CachedTeacherCollator, TeacherLogitCache, build_teacher_logit_cache
    from ..distill.placement import placed_teacher
    from ..distill.trainer import DistillationTrainer, default_layer_map
    from ..distributed import is_main_process, wait_for_everyone
    from .train import train_and_record, training_arguments, training_data

    recipe = context.settings
    layer_map = config.layer_map or default_layer_map(
        student.config.num_hidden_layers, teacher.config.num_hidden_layers, copied_from)
    if config.attention_weight:  # attention maps are only returned by the eager implementation
        teacher.set_attn_implementation("eager")
        student.set_attn_implementation("eager")

    raw_train = load_split(recipe.data, "train")
    if config.transfer_file or config.augmentation is not None:
        raw_train = _with_kd_only_text(raw_train, recipe, config, tokenizer.mask_token)
    train, evaluation, collator = training_data(recipe, tokenizer, raw_train=raw_train)
    train = train.add_column("example_index", list(range(len(train))))
    args = training_arguments(recipe, {**stage_training, "remove_unused_columns": False},
                              context.checkpoint_dir)
    # With teacher_device_map the teacher is spread over the devices, by the one process that runs it: under
    # several processes check_against allows it only with the logit cache, which the main process builds.
    spread = config if config.teacher_device_map and is_main_process() else None
    with placed_teacher(teacher, spread, context.stage_dir):
        teacher_for_trainer = teacher
        if config.cache_teacher_logits:
            # One cache, written by the main process; the others wait for it and read the same file.
            path = context.shared_stage_dir / "teacher_logits.safetensors"
            if is_main_process():
                build_teacher_logit_cache(teacher, train, collator, path, config.top_k,
                                          batch_size=recipe.data.eval_batch_size)
            wait_for_everyone()
            collator = CachedTeacherCollator(collator, TeacherLogitCache(path))
            teacher_for_trainer = None  # the teacher is not needed any more: every logit comes from the cache
        trainer = DistillationTrainer(
            model=student,
            teacher=teacher_for_trainer,
            task=recipe.task,
            distillation=config,
            layer_map=layer_map if teacher_for_trainer is not None else {},
            args=args,
            train_dataset=train,
            eval_dataset=evaluation if args.eval_strategy != "no" else None,
            data_collator=collator,
            processing_class=tokenizer,
            callbacks=list(callbacks),
        )
        train_and_record(trainer, context)
    if config.attention_weight:  # (trainer.model: the student, or its gathered copy when it was sharded)
        trainer.model.set_attn_implementation(recipe.model.attn_implementation or "sdpa")
    return trainer


@register_stage("distill", DistillStageConfig, card_tags=("distilled",))
def distill_stage(state: ModelState, config: DistillStageConfig, context: StageContext) -> ModelState:
    from ..distill.student import layer_stacks, student_from_teacher
    from ..modeling import ModelConfig, load_model

    recipe = context.settings
    ensure_loaded(state, recipe)
    teacher, tokenizer = state.model, state.tokenizer
    copied_from = None
    if config.student.name_or_path:
        # (a causal-LM student's vocabulary was compared with the teacher's in DistillationConfig.preflight)
        spec = ModelConfig(name_or_path=config.student.name_or_path)
        student = load_model(spec, recipe.task, num_labels=getattr(teacher.config, "num_labels", None))
    else:
        decoder_layers = config.student.decoder_layers
        stacks = layer_stacks(teacher)
        if decoder_layers is not None and not any(stack.is_decoder for stack in stacks):
            raise UserError(f"distill.student.decoder_layers: the teacher ({type(teacher).__name__}) has no decoder "
                            "stack: remove decoder_layers")
        student, copied_from = student_from_teacher(teacher, config.student.layers, config.student.every,
                                                    decoder_layers=decoder_layers)
        logger.info("distill: student keeps teacher layers %s of %d", copied_from, teacher.config.num_hidden_layers)
        if decoder_layers is not None:
            logger.info("distill: student keeps teacher decoder layers %s", decoder_layers)
    trainer = train_with_distillation(teacher, student, tokenizer, config, config.training, context, copied_from)
    return ModelState(model=trainer.model, tokenizer=tokenizer)
