"""hf-modelopt: distill, prune and quantize 🤗 Transformers models from YAML recipes.

Importing the package is cheap: the public names below load their modules (and torch / transformers)
only when first used.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "Recipe": "recipe",
    "RecipeError": "recipe",
    "load_recipe": "recipe",
    "validate_recipe": "recipe",
    "run_recipe": "pipeline",
    "register_stage": "stages",
    "StageConfig": "stages",
    "ModelState": "stages",
    "StageContext": "stages",
    "FinetuneConfig": "train",
    "EvaluateConfig": "metrics",
    "evaluate_model": "metrics",
    "ExportConfig": "export.save",
    "export_model": "export.save",
    "load_exported": "export.formats",
    "push_export": "export.hub",
    "inspect_model": "inspection",
    "UserError": "errors",
    "DistillationConfig": "distill.config",
    "StudentConfig": "distill.config",
    "DistillationTrainer": "distill.trainer",
    "student_from_teacher": "distill.student",
    "dispatch_teacher": "distill.placement",
    "KnowledgeDistillationConfig": "distill.config",
    "AugmentationConfig": "distill.augment",
    "augmented_sentences": "distill.augment",
    "PruningConfig": "prune.config",
    "ScheduleConfig": "prune.config",
    "PruneStageConfig": "prune.config",
    "StructuredPruneStageConfig": "prune.config",
    "OneShotPruneStageConfig": "prune.config",
    "PruningCallback": "prune.callback",
    "cubic_sparsity": "prune.schedule",
    "prune_oneshot_": "prune.oneshot",
    "remove_heads_and_neurons_": "prune.structured",
    "gradient_importance": "prune.structured",
    "magnitude_importance": "prune.structured",
    "save_sparse": "export.sparse",
    "verify_reload": "export.verify",
    "QuantizationConfig": "quant.config",
    "SensitivityConfig": "quant.config",
    "RecoveryConfig": "quant.config",
    "quantize": "quant.bnb",
    "save_quantized": "quant.bnb",
    "StorageQuantizationConfig": "quant.config",
    "save_with_quantized_storage": "quant.storage",
    "run_benchmark": "benchmark",
    "run_tasks": "parallel",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hf_modelopt' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


def __dir__():
    return __all__


# `from_pretrained` learns hf-modelopt's formats (sparse checkpoints, structurally pruned shapes) as soon
# as transformers loads, without this import loading transformers.
from .export.loading import register_when_transformers_loads as _register  # noqa: E402

_register()
