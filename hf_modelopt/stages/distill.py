"""The `distill` recipe stage: the incoming model is the teacher; the stage's output is the student.

The stage builds the student (layers kept from the teacher, or a separate model) and calls
`hf_modelopt.distill.distill`, which does the KD work (`stages/kd.py` passes it the recipe's data and training).
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import Field

from ..distill.config import KnowledgeDistillationConfig, StudentConfig
from ..errors import RecipeError, UserError
from . import ModelState, StageConfig, StageContext, ensure_loaded, register_stage
from .kd import check_kd_settings, train_with_distillation
from .train import TRAINING_HELP, refuse_training_after

logger = logging.getLogger("hf_modelopt")


class DistillStageConfig(StageConfig, KnowledgeDistillationConfig):
    """The `distill` stage: knowledge distillation of the incoming model (the teacher) into a student."""

    student: StudentConfig = Field(description="How the student is built.")
    training: dict[str, Any] = Field(default_factory=dict, description=TRAINING_HELP)
    requires_data = ("train",)

    def check_after(self, earlier) -> None:
        refuse_training_after("distill", earlier)

    def preflight(self, recipe) -> None:
        """Transfer text must exist (classification only); token-level KD needs one vocabulary."""
        from ..distill.distill import TOKEN_LEVEL_LOGITS, check_same_vocabulary
        from ..tasks import get_task

        check_kd_settings(self, recipe, self.training, "distill")
        if self.student.decoder_layers is not None:
            _check_has_decoder(recipe, self.student.decoder_layers)
        if self.student.name_or_path:
            self._check_student_labels(recipe)
        if get_task(recipe.task).logits in TOKEN_LEVEL_LOGITS and self.student.name_or_path:
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


@register_stage("distill", DistillStageConfig, card_tags=("distilled",))
def distill_stage(state: ModelState, config: DistillStageConfig, context: StageContext) -> ModelState:
    from ..distill.student import layer_stacks, student_from_teacher
    from ..modeling import ModelConfig, load_model

    recipe = context.settings
    ensure_loaded(state, recipe)
    teacher, tokenizer = state.model, state.tokenizer
    copied_from = None
    if config.student.name_or_path:
        # (a causal-LM student's vocabulary was compared with the teacher's in DistillStageConfig.preflight)
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
