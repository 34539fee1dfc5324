"""Running a recipe: pre-flight checks, then each stage in order, reusing stages whose inputs are unchanged.

Every stage writes to `OUTPUT/stages/<name>/`. A stage's fingerprint hashes everything it could depend
on: the model, task, data (file contents), training arguments, its own config and the fingerprint of the
stage before it. A finished stage records its fingerprint and the sha256 of every file it keeps in
`stage.json` (written last, so a crashed stage is never mistaken for a finished one) and in a cache index
(`$HF_MODELOPT_CACHE`, default `~/.cache/hf_modelopt`), so an identical stage in any later run, in any output
directory, is reused instead of recomputed: a teacher fine-tuned once serves every recipe. A reuse first
checks the hashes: a finished output whose files changed (or went missing, or were added) is never reused,
the stage is recomputed. Outputs reused from another folder are copied (reflinked where the file system can),
never hard-linked, so editing one folder never changes another.

The output folder is the run's own (`check_output_dir`, `claim_output_dir`):
- a run locks it (`fcntl.flock` on `OUTPUT/.hf-modelopt.lock`, released by the kernel when the process ends)
  and marks it (`OUTPUT/.hf-modelopt-run.json`) before writing anything; a second run into a locked folder is
  refused with one line naming the holder;
- a folder is an earlier run only when it carries that marker; a `stages/` folder alone does not make one;
- every deletion goes through `hf_modelopt.files.remove_inside`: the path is resolved and must stay inside
  the output folder; the run deletes only its own stage folders and records, and the export only files of its
  own manifest (see `hf_modelopt.export.save`), never a file a user added.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .errors import UserError
from .files import copy_tree, remove_inside, sha256_file
from .recipe import Recipe, RecipeError, Stage, load_recipe
from .stages import DEFAULT_FINAL_STAGE, MODEL_SUBDIR, STAGES, ModelState, RunSettings, StageContext, save_model_state

logger = logging.getLogger("hf_modelopt")

STAGE_RECORD = "stage.json"
ATTEMPT_RECORD = "attempt.json"  # written when a stage starts: the fingerprint its checkpoints belong to
RUN_MARKER = ".hf-modelopt-run.json"  # written when a run first claims a folder: "this folder is a run's"
LOCK_FILE = ".hf-modelopt.lock"  # flock()ed by the run writing into the folder; names that run
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
    settings = recipe.run_settings()
    for stage in recipe.resolved_stages:
        stage.config.preflight(settings)


# --------------------------------------------------------------------------- stage outputs


def _read_record(stage_dir: Path) -> dict | None:
    try:
        return json.loads((stage_dir / STAGE_RECORD).read_text())
    except (OSError, ValueError):
        return None


def _index_path(fingerprint: str) -> Path:
    return cache_root() / "stages" / f"{fingerprint}.json"


def _stage_files(stage_dir: Path) -> dict[str, str]:
    """sha256 of every file a finished stage keeps (its checkpoints and records aside), by relative path."""
    hashes = {}
    for file in sorted(stage_dir.rglob("*")):
        relative = file.relative_to(stage_dir)
        if relative.parts[0] == "checkpoints" or relative.as_posix() in (STAGE_RECORD, ATTEMPT_RECORD):
            continue
        if file.is_symlink() or file.is_file():
            hashes[relative.as_posix()] = sha256_file(file) if not file.is_symlink() else "symlink"
    return hashes


def _damage(candidate: Path, record: dict) -> str | None:
    """Why a finished stage's files are not those it finished with (content hashes of stage.json), or None."""
    recorded = record.get("files")
    if not isinstance(recorded, dict):
        return "its stage.json records no content hashes (made by an older hf-modelopt)"
    found = _stage_files(candidate)
    for name, digest in recorded.items():
        if name not in found:
            return f"{name} is missing"
        if found[name] != digest:
            return f"{name} changed since the stage finished (sha256 differs)"
    added = sorted(set(found) - set(recorded))
    return f"{added[0]} was added after the stage finished" if added else None


def _find_finished(fingerprint: str, stage_dir: Path, stage_name: str = "",
                   checked: dict | None = None) -> Path | None:
    """A finished output of this exact stage whose files are intact: in this run's folder, else anywhere the
    cache index knows. A damaged one (a file changed, missing or added since it finished) is never reused.

    `checked`: this run's answers so far, by stage folder, so that `--resume` (which looks for the first unfinished
    stage first) hashes each stage's files once, not twice."""
    if checked is not None and stage_dir in checked:
        return checked[stage_dir]
    found = _find_intact(fingerprint, stage_dir, stage_name)
    if checked is not None:
        checked[stage_dir] = found
    return found


def _find_intact(fingerprint: str, stage_dir: Path, stage_name: str) -> Path | None:
    candidates = [stage_dir]
    try:
        candidates.append(Path(json.loads(_index_path(fingerprint).read_text())["dir"]))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    for candidate in candidates:
        record = _read_record(candidate)
        if not record or record.get("fingerprint") != fingerprint:
            continue
        damage = _damage(candidate, record)
        if damage is None:
            return candidate
        logger.warning("Stage '%s': the finished output in %s is not reused: %s; it is recomputed", stage_name,
                       candidate, damage)
    return None


class RunResult(dict):
    """`{"output_dir", "stages": [records], "metrics": [records of the stages that produce metrics]}` of a finished
    run."""


def check_output_dir(output_dir: Path, resume: bool = False, overwrite: bool = False) -> None:
    """The output-folder rule, checked before any work (nothing is written here).

    A new or empty folder is used as is. A folder holding an earlier hf-modelopt run (its run marker,
    `.hf-modelopt-run.json`) is used again: finished stages whose inputs are unchanged are reused, an unfinished
    one starts over, or continues from its last checkpoint with `resume`. Any other non-empty folder is refused
    unless `overwrite`: then files of the export's names are replaced and nothing else is touched; a `stages/`
    folder the run did not make is refused even then (the run would write into it).
    """
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"--output-dir {output_dir}: is a file, not a folder")
    earlier_run = (output_dir / RUN_MARKER).is_file()
    if resume and not earlier_run:
        raise UserError(f"--resume: {output_dir} holds no earlier hf-modelopt run (no {RUN_MARKER}); "
                        "run without --resume")
    # (a lock file alone is what a run killed between locking and marking the folder leaves: still empty)
    if earlier_run or not output_dir.is_dir() or not any(p.name != LOCK_FILE for p in output_dir.iterdir()):
        return
    if (output_dir / "stages").exists():
        raise UserError(f"--output-dir {output_dir}: has a stages/ folder but no {RUN_MARKER}, so it is not an "
                        "hf-modelopt run folder (or one made before run markers); choose a new or empty folder")
    if not overwrite:
        raise UserError(f"--output-dir {output_dir}: not empty and not an earlier hf-modelopt run; choose a new or "
                        "empty folder, or pass --overwrite to write into it")


def claim_output_dir(output_dir: Path) -> int:
    """Lock `output_dir` for this run (creating it) and mark it as a run folder; returns the lock's descriptor.

    The lock is an `fcntl.flock` on `OUTPUT/.hf-modelopt.lock`: the kernel releases it when the process ends,
    however it ends, so a killed run never leaves a stale lock. The file names its holder (pid, host, start),
    for the message another run gets. Release with `os.close(descriptor)`.
    """
    import fcntl
    import socket

    output_dir.mkdir(parents=True, exist_ok=True)
    # O_NOFOLLOW: a symlink planted in the lock file's place is not followed (its target is never truncated).
    try:
        descriptor = os.open(output_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as err:
        raise UserError(f"--output-dir {output_dir}: cannot open its lock file {LOCK_FILE} ({err.strerror}); "
                        "remove it if it is a link, or choose another folder") from None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = json.loads(os.read(descriptor, 4096) or b"{}")
        except ValueError:
            holder = {}
        holder = holder if isinstance(holder, dict) else {}
        os.close(descriptor)
        raise UserError(f"--output-dir {output_dir}: in use by another hf-modelopt run (pid {holder.get('pid', '?')} "
                        f"on {holder.get('host', '?')}, started {holder.get('started', '?')}); wait for it to end, "
                        "or choose another folder") from None
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    marker = output_dir / RUN_MARKER
    if not marker.is_file():
        temporary = output_dir / f"{RUN_MARKER}.tmp"
        temporary.write_text(json.dumps({"hf_modelopt": __version__, "created": started}))
        os.replace(temporary, marker)  # (replaces a symlink in its place rather than following it)
    # The holder's name last: whoever reads it finds the folder marked.
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started}).encode(),
              0)
    return descriptor


def _checkpoint_damage(checkpoint: Path) -> str | None:
    """What is wrong with a Trainer checkpoint's files (truncated, not the format their name says), or None.

    Checked before `--resume` loads it, so that a damaged checkpoint is one line, not a traceback mid-run:
    JSON files must parse, safetensors files must be as long as their header says, torch files (zip archives)
    must pass their CRC checks.
    """
    import zipfile

    for file in sorted(checkpoint.rglob("*")):
        name = file.relative_to(checkpoint).as_posix()
        if file.is_symlink():
            return f"{name} is a symlink"
        if not file.is_file():
            continue
        try:
            if file.suffix == ".json":
                json.loads(file.read_text())
            elif file.suffix == ".safetensors":
                with file.open("rb") as handle:
                    length = int.from_bytes(handle.read(8), "little")
                    if not 2 <= length <= file.stat().st_size - 8:
                        return f"{name} is not a safetensors file (truncated or overwritten)"
                    header = json.loads(handle.read(length))
                ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
                if 8 + length + max(ends, default=0) != file.stat().st_size:
                    return f"{name} is truncated (its header describes {8 + length + max(ends, default=0)} bytes)"
            elif file.suffix in (".pt", ".pth", ".bin"):
                with zipfile.ZipFile(file) as archive:
                    if archive.testzip() is not None:
                        return f"{name} is damaged (a CRC check failed)"
        except (OSError, ValueError, KeyError, TypeError, IndexError, zipfile.BadZipFile) as err:
            return f"{name} cannot be read ({type(err).__name__}: {' '.join(str(err).split())[:80]})"
    return None


@contextlib.contextmanager
def _released(lock: int | None):
    """Hold the output folder's lock (from `claim_output_dir`) until the block ends, however it ends."""
    try:
        yield
    finally:
        if lock is not None:
            os.close(lock)


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
                  rerun_from: str | None = None, checked: dict | None = None) -> tuple[str, Path] | None:
    """(stage name, checkpoint) to continue from: the first unfinished stage that has a complete checkpoint
    (from `rerun_from` on, a stage counts as unfinished whatever the stage cache holds)."""
    from .stages.train import last_checkpoint

    rerunning = False
    for stage, stage_fp in plan:
        stage_dir = output_dir / "stages" / stage.name
        rerunning = rerunning or stage.name == rerun_from
        if not STAGES[stage.type].cacheable:
            continue
        if not rerunning and _find_finished(stage_fp, stage_dir, stage.name, checked) is not None:
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
        damage = _checkpoint_damage(checkpoint)
        if damage is not None:
            raise UserError(f"--resume: the checkpoint {checkpoint} is damaged: {damage}; run without --resume to "
                            f"start stage '{stage.name}' over (its checkpoints are then discarded)")
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

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    output_dir = Path(output_dir)
    main = is_main_process()
    if main:
        check_output_dir(output_dir, resume=resume, overwrite=overwrite)
    preflight(recipe)
    init_distributed()
    stages = _stages_to_run(recipe)
    plan = _plan(recipe, stages)
    if rerun_from is not None and rerun_from not in [stage.name for stage in stages]:
        raise UserError(f"--rerun-from {rerun_from}: the recipe has no stage of that name (stages: "
                        f"{', '.join(stage.name for stage in stages)})")
    checked: dict[Path, Path | None] = {}  # stage folder -> its intact finished output (hashed once)
    resume_from = _resume_point(recipe, plan, output_dir, rerun_from, checked) if resume else None
    # From here on the folder is this run's: locked (a second run into it is refused) and marked as a run folder.
    lock = claim_output_dir(output_dir) if main else None
    (output_dir / "stages").mkdir(parents=True, exist_ok=True)
    # Processes other than the main one write into a scratch folder of their own (see distributed.py).
    run = _Run(recipe.run_settings(), output_dir, main, None if main else output_dir / f".process-{process_index()}",
               checked, resume_from)
    with _released(lock), stop_cleanly_on_signals():
        _run_stages(run, plan, rerun_from)
    wait_for_everyone()
    if run.scratch is not None:
        remove_inside(run.scratch, output_dir)
    return RunResult(output_dir=str(output_dir), stages=run.history,
                     metrics=[r for r in run.history if r["produces_metrics"]])


def _stages_to_run(recipe: Recipe) -> list[Stage]:
    """The recipe's stages; the default final stage appended when none writes the final output: the final model is
    always written, an explicit final stage only adds options."""
    stages = list(recipe.resolved_stages)
    if not any(STAGES[stage.type].writes_final_output for stage in stages):
        stages.append(Stage(type=DEFAULT_FINAL_STAGE, name=DEFAULT_FINAL_STAGE,
                            config=STAGES[DEFAULT_FINAL_STAGE].config_cls()))
    return stages


@dataclass
class _Run:
    """What the stages of one run share: where this process writes, and the records so far."""

    settings: RunSettings
    output_dir: Path
    main: bool  # the main process writes the output folder
    scratch: Path | None  # any other process's own folder (None in the main process)
    checked: dict[Path, Path | None]  # stage folder -> its intact finished output (`_find_finished`)
    resume_from: tuple[str, Path] | None  # (stage name, checkpoint) that `--resume` continues
    history: list[dict[str, Any]] = field(default_factory=list)

    def context(self, stage: Stage) -> StageContext:
        shared = self.output_dir / "stages" / stage.name
        return StageContext(settings=self.settings, stage_name=stage.name,
                            stage_dir=shared if self.main else self.scratch / "stages" / stage.name,
                            output_dir=self.output_dir if self.main else self.scratch, history=self.history,
                            shared_stage_dir=shared)


def _run_stages(run: _Run, plan: list[tuple[Stage, str]], rerun_from: str | None) -> None:
    """Each stage in order: reused when an intact finished output of it exists (and it is before `rerun_from`),
    else run; its record (with the stage contract's fields, for the export) appended to `run.history`."""
    from .distributed import wait_for_everyone

    model_name = run.settings.model.name_or_path  # grows "-> stage" with every stage that changes the model
    state = ModelState(description=model_name)
    rerunning = False
    for stage, stage_fp in plan:
        spec = STAGES[stage.type]
        stage_dir = run.output_dir / "stages" / stage.name
        wait_for_everyone()  # every process sees the same finished stages
        if not run.main and spec.writes_final_output:
            run.history.append({"type": stage.type, "name": stage.name, "metrics": None, "model": model_name,
                                **spec.record_fields()})
            continue  # the final folder is the main process's alone
        rerunning = rerunning or stage.name == rerun_from
        finished = (_find_finished(stage_fp, stage_dir, stage.name, run.checked) if spec.cacheable and not rerunning
                    else None)
        if finished is not None:
            state, record = _reuse_stage(run, stage, stage_fp, finished, state)
        else:
            state, record = _run_stage(run, stage, stage_fp, state)
        if spec.changes_model:
            model_name = f"{model_name} -> {stage.name}"
        record["model"] = state.description = model_name
        # The stage's contract, from the registry as it is now (a reused stage.json may predate it): the export
        # reads these plain fields, never the registry.
        record.update(spec.record_fields())
        run.history.append(record)


def _reuse_stage(run: _Run, stage: Stage, stage_fp: str, finished: Path, state: ModelState):
    """Take a finished output of this stage (`finished`, in this run's folder or another) as the stage's: copied into
    this run's folder; returns the model state after it and the stage's record."""
    stage_dir = run.output_dir / "stages" / stage.name
    record = {**_read_record(finished), "name": stage.name, "reused": True}  # this recipe's name for it
    if finished != stage_dir and run.main:
        remove_inside(stage_dir, run.output_dir)
        # Copied (or reflinked), never hard-linked: editing one copy must not change the other.
        copy_tree(finished, stage_dir, ignore=shutil.ignore_patterns("checkpoints", ATTEMPT_RECORD))
    logger.info("Stage '%s' reused from %s: inputs and config unchanged, files intact (fingerprint %s)",
                stage.name, finished, stage_fp[:12])
    if STAGES[stage.type].changes_model:
        state = ModelState(path=(stage_dir if run.main else finished) / MODEL_SUBDIR)
    state.metrics = record.get("metrics")
    return state, record


def _run_stage(run: _Run, stage: Stage, stage_fp: str, state: ModelState):
    """Run the stage on `state` (continuing its checkpoint under `--resume`), save its model and, in the main process,
    record it as finished; returns the model state after it and the stage's record."""
    from .distributed import wait_for_everyone
    from .stages.train import last_checkpoint

    spec = STAGES[stage.type]
    context = run.context(stage)
    if run.resume_from is not None and run.resume_from[0] == stage.name:
        context.resume_from_checkpoint = run.resume_from[1]  # its folder and checkpoints are kept
    else:
        if last_checkpoint(context.stage_dir / "checkpoints") is not None:
            logger.warning("Stage '%s': discarding the checkpoint of an interrupted attempt (--resume continues from "
                           "it instead)", stage.name)
        remove_inside(context.stage_dir, run.output_dir)  # leftovers of an unfinished attempt
    if spec.cacheable:
        context.stage_dir.mkdir(parents=True, exist_ok=True)
        (context.stage_dir / ATTEMPT_RECORD).write_text(json.dumps({"fingerprint": stage_fp}))
        wait_for_everyone()  # the shared checkpoint folder is cleared before any process trains
    logger.info("Stage '%s' (%s) starting", stage.name, stage.type)
    started = time.perf_counter()
    state.metrics = None
    state = spec.run(state, stage.config, context)
    stage_dir = context.shared_stage_dir
    if spec.changes_model and run.main and state.path != stage_dir / MODEL_SUBDIR:  # unless already saved
        save_model_state(state, stage_dir / MODEL_SUBDIR)
    record = {"fingerprint": stage_fp, "type": stage.type, "name": stage.name,
              "config": stage.config.model_dump(mode="json"), "metrics": state.metrics,
              "seconds": round(time.perf_counter() - started, 1), "hf_modelopt": __version__}
    if spec.cacheable and run.main:
        _record_finished(stage_dir, record, run.output_dir)
    logger.info("Stage '%s' finished in %.1f s", stage.name, record["seconds"])
    return state, record


def _record_finished(stage_dir: Path, record: dict, output_dir: Path) -> None:
    """Mark a stage finished: content hashes of what it keeps (a later reuse checks them: a changed file is never
    reused) and its record in stage.json, written last (without it the stage is unfinished); the cache index entry;
    then its checkpoints go (its model is the output; they were only there to resume it)."""
    record["files"] = _stage_files(stage_dir)
    (stage_dir / STAGE_RECORD).write_text(json.dumps(record, indent=2))
    index = _index_path(record["fingerprint"])
    index.parent.mkdir(parents=True, exist_ok=True)
    index.write_text(json.dumps({"dir": str(stage_dir.resolve())}))
    remove_inside(stage_dir / "checkpoints", output_dir)
    remove_inside(stage_dir / ATTEMPT_RECORD, output_dir)
