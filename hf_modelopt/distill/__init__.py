"""Knowledge distillation: a teacher's outputs train a smaller student.

`distill(teacher, student, tokenizer, rows, config, training_args)`, KD in one call (what the recipe stages call
too); `DistillationTrainer` (a `transformers.Trainer` whose loss is the distillation loss, `DistillationConfig`),
the losses as pure functions, students built from their teacher's layers, a teacher-logit cache, a teacher spread
over devices when it is too big for one, and perturbed copies of the labelled sentences as extra KD inputs.
"""

from .augment import AugmentationConfig, augmented_sentences
from .cache import TeacherLogitCache, build_teacher_logit_cache
from .config import DistillationConfig, KnowledgeDistillationConfig, StudentConfig
from .distill import (
    DistillationSettingError,
    VocabularyMismatchError,
    check_distillation,
    check_same_vocabulary,
    distill,
    transfer_sentences,
)
from .losses import attention_kl, attention_mse, hidden_cosine, hidden_mse, soft_target_kl, sparse_soft_target_kl
from .placement import dispatch_teacher
from .student import student_from_teacher

__all__ = [
    "distill", "check_distillation", "check_same_vocabulary", "transfer_sentences", "DistillationSettingError",
    "VocabularyMismatchError",
    "AugmentationConfig", "DistillationConfig", "KnowledgeDistillationConfig", "StudentConfig", "TeacherLogitCache",
    "augmented_sentences",
    "build_teacher_logit_cache", "dispatch_teacher",
    "student_from_teacher", "soft_target_kl", "sparse_soft_target_kl", "hidden_mse", "hidden_cosine",
    "attention_kl", "attention_mse", "DistillationTrainer",
]


def __getattr__(name):
    # The trainer pulls in transformers' Trainer: load it on first use only.
    if name == "DistillationTrainer":
        from .trainer import DistillationTrainer

        return DistillationTrainer
    raise AttributeError(name)
