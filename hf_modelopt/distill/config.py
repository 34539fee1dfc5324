"""`DistillationConfig`: what the `distill` stage and `DistillationTrainer` are told."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..stages import StageConfig
from .augment import AugmentationConfig


class StudentConfig(BaseModel):
    """Where the student comes from: layers kept from the teacher, or a model of its own."""

    model_config = ConfigDict(extra="forbid")
    layers: list[int] | None = Field(
        None, description="Teacher layers the student keeps, in order (e.g. [0, 2, 4]); weights are copied."
    )
    every: int | None = Field(None, gt=0, description="Keep every n-th teacher layer, from layer 0.")
    name_or_path: str | None = Field(None, description="A separate student model (Hub id or folder).")

    @model_validator(mode="after")
    def _one_source(self):
        given = [key for key in ("layers", "every", "name_or_path") if getattr(self, key) is not None]
        if len(given) != 1:
            raise ValueError(f"set exactly one of layers, every, name_or_path (got {given or 'none'})")
        if self.layers is not None and (not self.layers or min(self.layers) < 0):
            raise ValueError(f"layers must be a non-empty list of layer indices >= 0, got {self.layers}")
        return self


class KnowledgeDistillationConfig(BaseModel):
    """The distillation loss and its data: what `DistillationTrainer` is told.

    The loss is a weighted sum: `kd_weight`·soft-target KL at `temperature` (× T²) + `ce_weight`·task
    cross-entropy + `hidden_weight`·hidden-state MSE + `cosine_weight`·hidden-state cosine +
    `attention_weight`·attention-map KL or MSE. Terms with weight 0 are not computed. Stages that train
    with KD (`distill`, `prune`, ...) validate their `distillation` settings into this class.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    temperature: float = Field(2.0, gt=0, description="Softmax temperature of the soft-target KL.")
    kd_weight: float = Field(1.0, ge=0, description="Weight of the soft-target KL (Hinton).")
    ce_weight: float = Field(0.0, ge=0, description="Weight of the hard-label cross-entropy.")
    hidden_weight: float = Field(0.0, ge=0, description="Weight of the hidden-state MSE (TinyBERT).")
    cosine_weight: float = Field(0.0, ge=0, description="Weight of the hidden-state cosine loss (DistilBERT).")
    attention_weight: float = Field(0.0, ge=0, description="Weight of the attention-map loss (MiniLM / TinyBERT).")
    attention_loss: Literal["kl", "mse"] = Field("kl", description="Attention-map loss: KL (MiniLM) or MSE.")
    layer_map: dict[int, int] | None = Field(
        None, description="Student layer -> teacher layer for hidden / attention losses. Default: a kept layer "
        "maps to the last teacher layer it stands in for (layers [0, 2, 4] of 6 -> {0: 1, 1: 3, 2: 5}), "
        "else evenly spaced teacher layers, last to last.",
    )
    top_k: int | None = Field(
        None, gt=0, description="Keep only the teacher's k largest logits per position (live and cached KD alike).",
    )
    cache_teacher_logits: bool = Field(
        False, description="Compute the teacher's (top-k) logits over the training set once, store them as "
        "safetensors in the stage folder, and train from them instead of running the teacher.",
    )
    transfer_file: str | None = Field(
        None, description="Unlabelled text (relative to data.data_dir, one example per line) added to the "
        "training set for KD only (classification).",
    )
    max_transfer_samples: int | None = Field(None, gt=0, description="Use only the first N transfer lines.")
    augmentation: AugmentationConfig | None = Field(
        None, description="Perturbed copies of the labelled training sentences (n-grams, masked words) added "
        "to the training set for KD only (classification; Tang et al. 2019).",
    )
    teacher_device_map: Literal["auto", "balanced", "balanced_low_0", "sequential"] | None = Field(
        None, description="For a teacher too big for one device: spread its layers over the GPUs, then CPU RAM, "
        "then disk (accelerate big-model inference; `from_pretrained(device_map=...)` strategies). One process, "
        "or several with cache_teacher_logits (the main process alone runs the teacher).",
    )
    teacher_max_memory: dict[int | str, int | str] | None = Field(
        None, description="With teacher_device_map: memory the teacher may take per device, e.g. "
        "{0: 20GiB, 1: 20GiB, cpu: 64GiB}; what does not fit is offloaded to disk. Default: what is free.",
    )

    def check_against(self, recipe, stage_training: dict[str, Any], key: str) -> None:
        """Transfer text must exist; it and augmentation are for classification; the logit cache excludes
        evaluation in training.

        `key` is where these settings sit in the recipe (for the error message).
        """
        from ..recipe import RecipeError

        if self.transfer_file is not None:
            if recipe.task != "text-classification":
                raise RecipeError(recipe.source, f"{key}.transfer_file",
                                  "for classification only; for causal LMs add the text to data.train_file")
            path = recipe.data.resolve(self.transfer_file)
            if not path.is_file():
                raise RecipeError(recipe.source, f"{key}.transfer_file", f"file not found: {path}")
        if self.augmentation is not None and recipe.task != "text-classification":
            raise RecipeError(recipe.source, f"{key}.augmentation", "for classification only: a causal LM's "
                              "training text is its own target")
        evaluates = {**recipe.training, **stage_training}.get("eval_strategy", "no") not in ("no", None)
        if self.cache_teacher_logits and evaluates:
            raise RecipeError(recipe.source, f"{key}.cache_teacher_logits", "the cache covers the training set "
                              "only; set training.eval_strategy to 'no' in this stage or turn the cache off")
        from ..distributed import world_size

        if self.teacher_device_map and world_size() > 1 and not self.cache_teacher_logits:
            raise RecipeError(recipe.source, f"{key}.teacher_device_map", f"{world_size()} processes would each "
                              "spread a teacher over the same devices; set cache_teacher_logits: true (the main "
                              "process alone runs the teacher) or run one process")

    @model_validator(mode="after")
    def _some_loss(self):
        weights = (self.kd_weight, self.ce_weight, self.hidden_weight, self.cosine_weight, self.attention_weight)
        if not any(weights):
            raise ValueError("all loss weights are 0: set kd_weight, ce_weight, hidden_weight, ... above 0")
        if self.cache_teacher_logits and (self.hidden_weight or self.cosine_weight or self.attention_weight):
            raise ValueError("cache_teacher_logits caches logits only: hidden / cosine / attention losses need "
                             "the live teacher (set their weights to 0 or turn the cache off)")
        if self.teacher_max_memory is not None and self.teacher_device_map is None:
            raise ValueError("teacher_max_memory is read only with teacher_device_map: set that too")
        return self


class DistillationConfig(StageConfig, KnowledgeDistillationConfig):
    """The `distill` stage: knowledge distillation of the incoming model (the teacher) into a student."""

    student: StudentConfig = Field(description="How the student is built.")
    training: dict[str, Any] = Field(
        default_factory=dict, description="TrainingArguments for this stage only, over the recipe's `training:`.",
    )
    requires_data = ("train",)

    def check_after(self, earlier) -> None:
        from ..train import refuse_training_after

        refuse_training_after("distill", earlier)

    def preflight(self, recipe) -> None:
        """Transfer text must exist (classification only); token-level KD needs one vocabulary."""
        self.check_against(recipe, self.training, "distill")
        if self.student.name_or_path:
            self._check_student_labels(recipe)
        if recipe.task == "causal-lm" and self.student.name_or_path:
            from ..modeling import load_tokenizer
            from ..recipe import ModelConfig
            from .stage import check_same_vocabulary

            student = ModelConfig(name_or_path=self.student.name_or_path)
            check_same_vocabulary(load_tokenizer(recipe.model), load_tokenizer(student))

    def _check_student_labels(self, recipe) -> None:
        """A separate student must suit the task and, as a classifier, name its classes as the teacher does."""
        from ..data import check_data_contents
        from ..modeling import check_model_for_task
        from ..recipe import ModelConfig, RecipeError

        labels = check_data_contents(recipe.data, recipe.task, {"train"}, recipe.source)
        key = "distill.student.name_or_path"
        student = check_model_for_task(ModelConfig(name_or_path=self.student.name_or_path), recipe.task, labels,
                                       key, recipe.source)
        teacher = check_model_for_task(recipe.model, recipe.task, labels, "model.name_or_path", recipe.source)
        if recipe.task != "text-classification":
            return

        def named(config) -> dict[int, str] | None:  # None: the default LABEL_0, LABEL_1, ... (no names given)
            names = {int(i): str(label) for i, label in (config.id2label or {}).items()}
            return None if all(label == f"LABEL_{i}" for i, label in names.items()) else names

        if named(teacher) and named(student) and named(teacher) != named(student):
            raise RecipeError(recipe.source, key, f"the student's classes {named(student)} are not the teacher's "
                              f"{named(teacher)}: soft targets would teach the wrong classes")
