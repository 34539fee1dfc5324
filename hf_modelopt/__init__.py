"""hf-modelopt: distill, prune and quantize 🤗 Transformers models, from your own Trainer scripts or YAML recipes.

    from hf_modelopt import DistillationTrainer, DistillationConfig, PruningCallback, PruningConfig, prune_, quantize

Each technique is one verb or class taking its own config; the recipe runner (`run_recipe`, `hf-modelopt run`)
is a thin layer over the same functions. Everything else lives in the sub-packages: `distill`, `prune`, `quant`
(techniques), `formats` (on-disk formats), `export` (writing models), `stages` (the recipe stages), `recipe`.

Importing the package is cheap: the names below load their modules (and torch / transformers) only when first
used.
"""

__version__ = "0.2.0"

_EXPORTS = {
    "DistillationTrainer": "distill.trainer",
    "DistillationConfig": "distill.config",
    "PruningCallback": "prune.callback",
    "PruningConfig": "prune.config",
    "StructuredPruningConfig": "prune.config",
    "OneShotPruningConfig": "prune.config",
    "prune_": "prune.prune",
    "QuantizationConfig": "quant.config",
    "quantize": "quant.quantize",
    "save_compressed": "export.compressed",
    "evaluate_model": "metrics",
    "load_recipe": "recipe",
    "run_recipe": "pipeline",
    "register_stage": "stages",
    "UserError": "errors",
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
from .formats.hf_modelopt import register_when_transformers_loads as _register  # noqa: E402

_register()
