"""Running a recipe: pre-flight checks, then each stage in order, reusing stages whose inputs are unchanged.

Every stage writes to `OUTPUT/stages/<name>/`. A stage's fingerprint hashes everything it could depend
on: the model, task, data (file contents), training arguments, its own config and the fingerprint of the
stage before it. A finished stage records its fingerprint in `stage.json` (written last, so a crashed
stage is never mistaken for a finished one) and in a cache index (`$HF_MODELOPT_CACHE`, default
`~/.cache/hf_modelopt`), so an identical stage in any later run, in any output directory, is reused
instead of recomputed: a teacher fine-tuned once serves every recipe.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from . import __version__
from .recipe import Recipe, RecipeError, Stage
from .stages import STAGES, ModelState, StageContext

logger = logging.getLogger("hf_modelopt")

STAGE_RECORD = "stage.json"
MODEL_SUBDIR = "model"
# Content hashes for data files up to this size; larger files are identified by size and mtime.
HASH_FILES_UP_TO = 64 << 20


def cache_root() -> Path:
    return Path(os.environ.get("HF_MODELOPT_CACHE", Path.home() / ".cache" / "hf_modelopt"))


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _file_identity(path: Path) -> str:
    stat = path.stat()
    if stat.st_size > HASH_FILES_UP_TO:
        return f"{stat.st_size}:{stat.st_mtime_ns}"
    return hashlib.sha256(path.read_bytes()).hexdigest()


def recipe_fingerprint(recipe: Recipe) -> str:
    """What every stage depends on: model, task, data (by content) and training arguments."""
    from .data import data_files

    model_files: dict[str, str] = {}
    if recipe.model.is_local and Path(recipe.model.name_or_path).is_dir():
        for file in sorted(Path(recipe.model.name_or_path).rglob("*")):
            if file.is_file():
                stat = file.stat()
                model_files[str(file)] = f"{stat.st_size}:{stat.st_mtime_ns}"
    data = {split: _file_identity(path) for split, path in data_files(recipe.data).items()}
    # Defaults are left out, so that a new config field (with a default that keeps behaviour) does not
    # invalidate every finished stage.
    return _digest(__version__, recipe.model.model_dump(exclude_defaults=True), model_files, recipe.task,
                   recipe.data.model_dump(exclude_defaults=True, exclude={"data_dir"}), data, recipe.training)


def stage_fingerprint(previous: str, stage: Stage) -> str:
    return _digest(previous, stage.type, stage.config.model_dump(exclude={"name"}, exclude_defaults=True))


# --------------------------------------------------------------------------- pre-flight


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def check_model_available(recipe: Recipe) -> None:
    spec = recipe.model
    if spec.is_local:
        folder = Path(spec.name_or_path).expanduser()
        if not folder.exists():
            raise RecipeError(recipe.source, "model.name_or_path", f"folder not found: {folder}")
        if spec.gguf_file and not (folder / spec.gguf_file).is_file():
            raise RecipeError(recipe.source, "model.gguf_file", f"file not found: {folder / spec.gguf_file}")
        return
    if _hub_offline():
        from huggingface_hub import try_to_load_from_cache

        needed = spec.gguf_file or "config.json"
        if not isinstance(try_to_load_from_cache(spec.name_or_path, needed, revision=spec.revision), str):
            raise RecipeError(
                recipe.source, "model.gguf_file" if spec.gguf_file else "model.name_or_path",
                f"{spec.name_or_path}/{needed} is not in the Hugging Face cache and the Hub is offline "
                "(run `python scripts/prepare_offline_models.py` for the example models, or go online)",
            )


def preflight(recipe: Recipe) -> None:
    """Everything that can be checked before work starts: data files and the model's availability."""
    from .data import check_data

    needed = {split for stage in recipe.resolved_stages for split in type(stage.config).requires_data}
    check_data(recipe.data, needed, recipe.source)
    check_model_available(recipe)
    for stage in recipe.resolved_stages:
        stage.config.preflight(recipe)


# --------------------------------------------------------------------------- stage outputs


def _read_record(stage_dir: Path) -> dict | None:
    try:
        return json.loads((stage_dir / STAGE_RECORD).read_text())
    except (OSError, ValueError):
        return None


def _index_path(fingerprint: str) -> Path:
    return cache_root() / "stages" / f"{fingerprint}.json"


def _find_finished(fingerprint: str, stage_dir: Path) -> Path | None:
    """A finished output of this exact stage: in this run's folder, else anywhere the cache index knows."""
    candidates = [stage_dir]
    try:
        candidates.append(Path(json.loads(_index_path(fingerprint).read_text())["dir"]))
    except (OSError, ValueError, KeyError):
        pass
    for candidate in candidates:
        record = _read_record(candidate)
        if record and record.get("fingerprint") == fingerprint:
            return candidate
    return None


def link_or_copy(source, target) -> None:
    """Hard-link a file (no second copy of the weights on the same file system), else copy it."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _link_or_copy_tree(source: Path, target: Path) -> None:
    shutil.copytree(source, target, copy_function=link_or_copy, ignore=shutil.ignore_patterns("checkpoints"))


def save_model_state(state: ModelState, folder: Path) -> None:
    """Save model (safetensors) and tokenizer so `from_pretrained(folder)` loads them."""
    from .quant.bnb import check_savable

    check_savable(state.model)  # a 4-bit model that ran on CPU would save as garbage
    state.model.save_pretrained(folder)
    if state.tokenizer is not None:
        state.tokenizer.save_pretrained(folder)
    state.path = folder


class RunResult(dict):
    """`{"output_dir", "stages": [records], "metrics": [evaluate records]}` of a finished run."""


def run_recipe(recipe: Recipe, output_dir: str | os.PathLike) -> RunResult:
    """Run every stage of `recipe`, writing into `output_dir`; returns the stage records."""
    from .export.save import ExportConfig

    preflight(recipe)
    output_dir = Path(output_dir)
    stages = list(recipe.resolved_stages)
    if not any(stage.type == "export" for stage in stages):
        # The final model is always written; an explicit export stage only adds options.
        stages.append(Stage(type="export", name="export", config=ExportConfig()))
    (output_dir / "stages").mkdir(parents=True, exist_ok=True)

    model_name = recipe.model.name_or_path  # grows "-> stage" with every stage that changes the model
    state = ModelState(description=model_name)
    fingerprint = recipe_fingerprint(recipe)
    history: list[dict[str, Any]] = []
    for stage in stages:
        spec = STAGES[stage.type]
        stage_dir = output_dir / "stages" / stage.name
        stage_fp = stage_fingerprint(fingerprint, stage)
        context = StageContext(recipe=recipe, stage_name=stage.name, stage_dir=stage_dir,
                               output_dir=output_dir, history=history)
        finished = _find_finished(stage_fp, stage_dir) if spec.cacheable else None
        if finished is not None:
            if finished != stage_dir:
                shutil.rmtree(stage_dir, ignore_errors=True)
                _link_or_copy_tree(finished, stage_dir)
            record = {**_read_record(stage_dir), "name": stage.name}  # the name this recipe gives it
            logger.info("Stage '%s' reused from %s: inputs and config unchanged (fingerprint %s)",
                        stage.name, finished, stage_fp[:12])
            if spec.changes_model:
                state = ModelState(path=stage_dir / MODEL_SUBDIR)
            state.metrics = record.get("metrics")
        else:
            shutil.rmtree(stage_dir, ignore_errors=True)  # leftovers of an unfinished attempt
            if spec.cacheable:
                stage_dir.mkdir(parents=True)
            logger.info("Stage '%s' (%s) starting", stage.name, stage.type)
            started = time.perf_counter()
            state.metrics = None
            state = spec.run(state, stage.config, context)
            if spec.changes_model and state.path != stage_dir / MODEL_SUBDIR:  # unless the stage saved it
                save_model_state(state, stage_dir / MODEL_SUBDIR)
            record = {"fingerprint": stage_fp, "type": stage.type, "name": stage.name,
                      "config": stage.config.model_dump(mode="json"), "metrics": state.metrics,
                      "seconds": round(time.perf_counter() - started, 1), "hf_modelopt": __version__}
            if spec.cacheable:
                (stage_dir / STAGE_RECORD).write_text(json.dumps(record, indent=2))
                _index_path(stage_fp).parent.mkdir(parents=True, exist_ok=True)
                _index_path(stage_fp).write_text(json.dumps({"dir": str(stage_dir.resolve())}))
            logger.info("Stage '%s' finished in %.1f s", stage.name, record["seconds"])
        if spec.changes_model:
            fingerprint = stage_fp
            model_name = f"{model_name} -> {stage.name}"
        record["model"] = state.description = model_name
        history.append(record)
    return RunResult(output_dir=str(output_dir), stages=history,
                     metrics=[r for r in history if r["type"] == "evaluate"])
