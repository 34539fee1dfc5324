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
from .errors import UserError
from .recipe import Recipe, RecipeError, Stage, load_recipe
from .stages import MODEL_SUBDIR, STAGES, ModelState, StageContext, link_or_copy, save_model_state

logger = logging.getLogger("hf_modelopt")

STAGE_RECORD = "stage.json"
ATTEMPT_RECORD = "attempt.json"  # written when a stage starts: the fingerprint its checkpoints belong to
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


def check_training_arguments(recipe: Recipe) -> None:
    """Build each training stage's `TrainingArguments` once, so that their own checks fail before any work."""
    from .stages.train import training_arguments

    for index, stage in enumerate(recipe.resolved_stages):
        training = getattr(stage.config, "training", None)
        if training is None:
            continue
        try:
            training_arguments(recipe, training, Path("unused"))
        except (ValueError, TypeError) as err:
            message = " ".join(str(err).split())  # one line
            raise RecipeError(recipe.source, f"stages[{index}].training" if training else "training", message) from None


def check_device_map(recipe: Recipe) -> None:
    """A model spread over devices by `model.device_map` belongs to one process; DDP / FSDP give each its own."""
    from .distributed import world_size

    if recipe.model.device_map is not None and world_size() > 1:
        raise RecipeError(recipe.source, "model.device_map", f"{world_size()} processes would each spread their own "
                          "copy of the model over the same devices; remove model.device_map under accelerate launch "
                          "(each process then holds the whole model on its device), or run in one process")


def check_packages(recipe: Recipe) -> None:
    """Refuse a recipe whose model, task or stages need an optional package that is not installed, naming the recipe
    key and the `pip install hf-modelopt[extra]` that brings it (`hf_modelopt.extras`)."""
    from .extras import MissingRecipeExtraError, missing_packages
    from .modeling import required_packages as model_packages
    from .tasks import get_task

    needs = [(key, feature, modules) for key, (feature, modules) in model_packages(recipe.model).items()]
    task = get_task(recipe.task)
    if task.packages:
        needs.append(("task", f"the {task.name} task", task.packages))
    for index, stage in enumerate(recipe.resolved_stages):
        for key, modules in stage.config.required_packages().items():
            feature = f"the {stage.type} stage" + (f"'s {key}" if key else "")
            needs.append((f"stages[{index}]" + (f".{key}" if key else ""), feature, modules))
    for key, feature, modules in needs:
        problem = missing_packages(modules)
        if problem is not None:
            raise MissingRecipeExtraError(recipe.source, key, f"{feature} {problem}")


def preflight(recipe: Recipe) -> None:
    """Everything that can be checked before work starts: optional packages first (nothing read or loaded before
    that), then data files and contents, the model and the stages."""
    from .data import check_data
    from .modeling import check_model_for_task
    from .tasks import check_data_contents

    check_packages(recipe)
    needed = {split for stage in recipe.resolved_stages for split in type(stage.config).requires_data}
    check_data(recipe.data, needed, recipe.source)
    check_model_available(recipe)
    labels = check_data_contents(recipe.data, recipe.task, needed, recipe.source)
    check_model_for_task(recipe.model, recipe.task, labels, "model.name_or_path", recipe.source)
    check_device_map(recipe)
    check_training_arguments(recipe)
    if recipe.model.trust_remote_code:
        logger.warning("model.trust_remote_code is on: Python code shipped with %s will run on this machine",
                       recipe.model.name_or_path)
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


def _link_or_copy_tree(source: Path, target: Path) -> None:
    shutil.copytree(source, target, copy_function=link_or_copy, ignore=shutil.ignore_patterns("checkpoints"))


class RunResult(dict):
    """`{"output_dir", "stages": [records], "metrics": [evaluate records]}` of a finished run."""


def check_output_dir(output_dir: Path, resume: bool = False, overwrite: bool = False) -> None:
    """The output-directory rule, checked before any work.

    A new or empty folder is used as is. A folder holding an earlier hf-modelopt run (a `stages/` folder)
    is used again: finished stages whose inputs are unchanged are reused, an unfinished one starts over,
    or continues from its last checkpoint with `resume`. Any other non-empty folder is refused unless
    `overwrite`: then files of the same name are replaced and nothing else is touched.
    """
    earlier_run = (output_dir / "stages").is_dir()
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"--output-dir {output_dir}: is a file, not a folder")
    if resume and not earlier_run:
        raise UserError(f"--resume: {output_dir} holds no earlier hf-modelopt run (no stages/ folder); "
                        "run without --resume")
    if not earlier_run and not overwrite and output_dir.is_dir() and any(output_dir.iterdir()):
        raise UserError(f"--output-dir {output_dir}: not empty and not an earlier hf-modelopt run; choose a new or "
                        "empty folder, or pass --overwrite to write into it")


def _plan(recipe: Recipe, stages: list[Stage]) -> list[tuple[Stage, str]]:
    """Each stage with its fingerprint (computable before anything runs: it depends on configs and inputs only)."""
    fingerprint = recipe_fingerprint(recipe)
    plan = []
    for stage in stages:
        stage_fp = stage_fingerprint(fingerprint, stage)
        plan.append((stage, stage_fp))
        if STAGES[stage.type].changes_model:
            fingerprint = stage_fp
    return plan


def _resume_point(recipe: Recipe, plan: list[tuple[Stage, str]], output_dir: Path,
                  rerun_from: str | None = None) -> tuple[str, Path] | None:
    """(stage name, checkpoint) to continue from: the first unfinished stage that has a complete checkpoint
    (from `rerun_from` on, a stage counts as unfinished whatever the stage cache holds)."""
    from .stages.train import last_checkpoint

    rerunning = False
    for stage, stage_fp in plan:
        stage_dir = output_dir / "stages" / stage.name
        rerunning = rerunning or stage.name == rerun_from
        if not STAGES[stage.type].cacheable or (not rerunning and _find_finished(stage_fp, stage_dir) is not None):
            continue
        checkpoint = last_checkpoint(stage_dir / "checkpoints")
        if checkpoint is None:
            continue
        try:
            started_with = json.loads((stage_dir / ATTEMPT_RECORD).read_text())["fingerprint"]
        except (OSError, ValueError, KeyError):
            started_with = None
        if started_with != stage_fp:
            raise RecipeError(recipe.source, "", f"--resume: the checkpoint of stage '{stage.name}' in {output_dir} "
                              "was made with other inputs (the recipe, its data or an earlier stage changed); run "
                              "without --resume to start that stage over")
        return stage.name, checkpoint
    logger.info("--resume: no unfinished stage has a checkpoint in %s; unfinished stages start over", output_dir)
    return None


def run_recipe(recipe: Recipe | str | os.PathLike, output_dir: str | os.PathLike, *, resume: bool = False,
               overwrite: bool = False, rerun_from: str | None = None) -> RunResult:
    """Run every stage of `recipe` (a `Recipe`, or the path of a recipe file), writing into `output_dir`; returns
    the stage records.

    `resume`: continue the stage an earlier run in `output_dir` left unfinished from its last checkpoint.
    `overwrite`: write into a non-empty folder that holds no earlier run (see `check_output_dir`).
    `rerun_from`: run the stage of that name and every later one even where the stage cache has them (to
    measure a stage again, or check that it reproduces); earlier stages are still reused.
    SIGINT / SIGTERM during training stop the run with a checkpoint (`hf_modelopt.interrupt`).
    Under `accelerate launch` with several processes only the main one writes (`hf_modelopt.distributed`).
    """
    from .distributed import init_distributed, is_main_process, process_index, wait_for_everyone
    from .interrupt import stop_cleanly_on_signals
    from .stages.export import ExportStageConfig
    from .stages.train import last_checkpoint

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    output_dir = Path(output_dir)
    main = is_main_process()
    if main:
        check_output_dir(output_dir, resume=resume, overwrite=overwrite)
    preflight(recipe)
    init_distributed()
    # Processes other than the main one write into a scratch folder of their own (see distributed.py).
    scratch = output_dir / f".process-{process_index()}" if not main else None
    stages = list(recipe.resolved_stages)
    if not any(stage.type == "export" for stage in stages):
        # The final model is always written; an explicit export stage only adds options.
        stages.append(Stage(type="export", name="export", config=ExportStageConfig()))
    plan = _plan(recipe, stages)
    if rerun_from is not None and rerun_from not in [stage.name for stage in stages]:
        raise UserError(f"--rerun-from {rerun_from}: the recipe has no stage of that name (stages: "
                        f"{', '.join(stage.name for stage in stages)})")
    rerunning = False
    resume_from = _resume_point(recipe, plan, output_dir, rerun_from) if resume else None
    (output_dir / "stages").mkdir(parents=True, exist_ok=True)

    model_name = recipe.model.name_or_path  # grows "-> stage" with every stage that changes the model
    state = ModelState(description=model_name)
    history: list[dict[str, Any]] = []
    with stop_cleanly_on_signals():
        for stage, stage_fp in plan:
            spec = STAGES[stage.type]
            stage_dir = output_dir / "stages" / stage.name
            wait_for_everyone()  # every process sees the same finished stages
            if not main and stage.type == "export":
                history.append({"type": "export", "name": stage.name, "metrics": None, "model": model_name})
                continue  # the export is the main process's alone
            context = StageContext(recipe=recipe, stage_name=stage.name,
                                   stage_dir=stage_dir if main else scratch / "stages" / stage.name,
                                   output_dir=output_dir if main else scratch, history=history,
                                   shared_stage_dir=stage_dir)
            rerunning = rerunning or stage.name == rerun_from
            finished = _find_finished(stage_fp, stage_dir) if spec.cacheable and not rerunning else None
            if finished is not None:
                if finished != stage_dir and main:
                    shutil.rmtree(stage_dir, ignore_errors=True)
                    _link_or_copy_tree(finished, stage_dir)
                record = {**_read_record(finished), "name": stage.name, "reused": True}  # this recipe's name for it
                logger.info("Stage '%s' reused from %s: inputs and config unchanged (fingerprint %s)",
                            stage.name, finished, stage_fp[:12])
                if spec.changes_model:
                    state = ModelState(path=finished / MODEL_SUBDIR)
                state.metrics = record.get("metrics")
            else:
                if resume_from is not None and resume_from[0] == stage.name:
                    context.resume_from_checkpoint = resume_from[1]  # its folder and checkpoints are kept
                else:
                    if last_checkpoint(context.stage_dir / "checkpoints") is not None:
                        logger.warning("Stage '%s': discarding the checkpoint of an interrupted attempt (--resume "
                                       "continues from it instead)", stage.name)
                    shutil.rmtree(context.stage_dir, ignore_errors=True)  # leftovers of an unfinished attempt
                if spec.cacheable:
                    context.stage_dir.mkdir(parents=True, exist_ok=True)
                    (context.stage_dir / ATTEMPT_RECORD).write_text(json.dumps({"fingerprint": stage_fp}))
                    wait_for_everyone()  # the shared checkpoint folder is cleared before any process trains
                logger.info("Stage '%s' (%s) starting", stage.name, stage.type)
                started = time.perf_counter()
                state.metrics = None
                state = spec.run(state, stage.config, context)
                if spec.changes_model and main and state.path != stage_dir / MODEL_SUBDIR:  # unless already saved
                    save_model_state(state, stage_dir / MODEL_SUBDIR)
                record = {"fingerprint": stage_fp, "type": stage.type, "name": stage.name,
                          "config": stage.config.model_dump(mode="json"), "metrics": state.metrics,
                          "seconds": round(time.perf_counter() - started, 1), "hf_modelopt": __version__}
                if spec.cacheable and main:
                    (stage_dir / STAGE_RECORD).write_text(json.dumps(record, indent=2))
                    _index_path(stage_fp).parent.mkdir(parents=True, exist_ok=True)
                    _index_path(stage_fp).write_text(json.dumps({"dir": str(stage_dir.resolve())}))
                    # Finished: its model is the output; checkpoints were only there to resume it.
                    shutil.rmtree(stage_dir / "checkpoints", ignore_errors=True)
                    (stage_dir / ATTEMPT_RECORD).unlink(missing_ok=True)
                logger.info("Stage '%s' finished in %.1f s", stage.name, record["seconds"])
            if spec.changes_model:
                model_name = f"{model_name} -> {stage.name}"
            record["model"] = state.description = model_name
            history.append(record)
    wait_for_everyone()
    if scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)
    return RunResult(output_dir=str(output_dir), stages=history,
                     metrics=[r for r in history if r["type"] == "evaluate"])
