"""The final export: the model, verified, with its record and model card, in the output folder (`export_model`).

`OUTPUT/` receives the model (safetensors, config, tokenizer, or an adapter), `recipe.yaml` (resolved),
`metrics.json` (the run's evaluate stages), `plots/` (loss curves and the PNG files stages made),
`README.md` (the model card) and `export.json` (what was exported and measured, and the manifest of files:
size and sha256 of each).

Order of work, so that a killed or failed export never looks finished and never costs a user's file:

1. everything is written to a staging folder inside the output folder, `OUTPUT/.hf-modelopt-export/` (the
   stage outputs are copied or reflinked, never hard-linked: a user editing the export must not change the
   stage cache, nor the reverse);
2. the staging folder is reloaded in a fresh process (`verify.py`), its logits compared with the model in
   memory, and its metrics, size, parameters, sparsity and latency re-measured; the card is written from
   those figures only;
3. the commit (`commit_export`): the files the export may own are noted in
   `OUTPUT/.hf-modelopt-export-pending.json` (the previous manifest, an interrupted commit's list and the new
   manifest, with their hashes); `export.json` is removed; each new file is renamed into place (replacing the
   file of that name, nothing else); files of the previous export that the new one lacks are removed only if
   they are inside the folder and unchanged since exported (same sha256); `export.json` is renamed in last.
   A folder without `export.json` is not a finished export; a killed commit is finished by the next one.

Never touched: files a user added (they are in no manifest), files of the previous export that a user
changed, anything outside `OUTPUT/` (every path is resolved and checked: `hf_modelopt.files`), the stage
folders. Paths written into recipe.yaml, metrics.json, export.json and the card are the Hub id, or relative
to `OUTPUT/` for local folders: nothing in the export names the machine's absolute paths.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..errors import UserError
from ..files import UnsafePathError, copy_file, inside, remove_inside, sha256_file
from ..stages import ModelState, ensure_loaded
from ..tasks import get_task
from .record import EXPORT_RECORD, read_export_record

logger = logging.getLogger("hf_modelopt")

PLOTS_DIR = "plots"
STAGING = ".hf-modelopt-export"  # OUTPUT/.hf-modelopt-export/: the export being written and verified
PENDING = ".hf-modelopt-export-pending.json"  # the files an unfinished commit may have put in OUTPUT/
VERIFY_RECIPE = ".verify-recipe.yaml"  # the recipe with local paths, for the fresh process only
# Never an export's file, whatever a manifest says: the run's own folders and records.
NOT_EXPORT_FILES = ("stages", ".hf-modelopt")
MEASURE_TIMEOUT_S = 3 * 3600  # the fresh process evaluates the whole eval set: minutes for a real LM


class HubPushConfig(BaseModel):
    """Where the export stage uploads a verified export."""

    model_config = ConfigDict(extra="forbid")
    repo_id: str = Field(description="Hub model repository ORG/NAME; created if missing.")
    private: bool = Field(False, description="Create the repository as private (an existing one is left as is).")

    @field_validator("repo_id")
    @classmethod
    def _valid_repo_id(cls, value: str) -> str:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(value)
        except HFValidationError as err:
            raise ValueError(f"not a valid Hub repository id ({err})") from None
        return value


class ExportConfig(BaseModel):
    """Write the final model to the output folder, loadable with `from_pretrained(OUTPUT)`, with its card."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    verify: bool = Field(
        True, description="Reload the export in a fresh process, check its logits against the model in memory "
        "and re-measure its metrics, size, parameters, sparsity and latency for the card. Only a verified export "
        "can be pushed to the Hub.",
    )
    compare_base: bool = Field(
        True, description="Also load the recipe's base model in that process, for the card's before column.")
    latency_repeats: int = Field(
        10, ge=0, description="Timed forward passes per model (batch 32 x 64 tokens) for the card's latency; "
        "0 leaves latency out.",
    )
    push_to_hub: HubPushConfig | None = Field(
        None, description="Upload the verified export to this Hub repository (`repo_id`, `private`).")
    sparse: bool = Field(
        False, description="Write pruned Linear weights in the compressed sparse format (kept values + bitmask; "
        "loads with from_pretrained after `import hf_modelopt`) instead of dense weights with zeros.",
    )


# --------------------------------------------------------------------------- plots


def plot_loss_curves(log_history: list[dict], title: str, target: Path) -> bool:
    """Every logged `*loss` (train, eval, KD terms) against the step, as a PNG; False if nothing to plot."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    keys = sorted({k for entry in log_history for k in entry if k.endswith("loss") and k != "train_loss"})
    if not keys:
        return False
    figure = Figure(figsize=(6.4, 3.6), layout="tight")
    axes = figure.subplots()
    for key in keys:
        points = [(entry["step"], entry[key]) for entry in log_history if key in entry and "step" in entry]
        axes.plot(*zip(*points), marker="." if len(points) < 30 else None, label=key)
    axes.set(title=title, xlabel="step", ylabel="loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.savefig(target, dpi=100)
    return True


def write_plots(history: list[dict], stages_dir: Path, target: Path) -> list[dict]:
    """Loss curves from the stages' trainer logs and the PNG files stages wrote, into `target/plots/`."""
    from ..extras import missing_packages

    plots = []
    folder = target / PLOTS_DIR
    folder.mkdir()
    for record in history:
        stage_dir = stages_dir / record["name"]
        logs = stage_dir / "log_history.json"
        pngs = sorted(png for png in stage_dir.glob("*.png") if png.is_file() and not png.is_symlink())
        if not logs.is_file() and not pngs:
            continue
        if logs.is_file():
            # The curves only illustrate the card: without matplotlib the export goes on without them.
            problem = missing_packages(("matplotlib",))
            if problem is None:
                drawn = plot_loss_curves(json.loads(logs.read_text()), f"stage {record['name']} ({record['type']})",
                                         folder / f"{record['name']}-loss.png")
            else:
                logger.info("loss curves left out of the card: drawing them %s", problem)
                drawn = False
            if drawn:
                plots.append({"path": f"{PLOTS_DIR}/{record['name']}-loss.png",
                              "title": f"training losses of stage {record['name']}"})
        for png in pngs:
            copy_file(png, folder / f"{record['name']}-{png.name}")
            plots.append({"path": f"{PLOTS_DIR}/{record['name']}-{png.name}",
                          "title": f"{png.stem.replace('_', ' ')} (stage {record['name']})"})
    if not plots:
        folder.rmdir()
    return plots


# --------------------------------------------------------------------------- the record


def _eval_data_description(recipe) -> str:
    data = recipe.data
    if data.eval_fraction is not None:
        where = f"the last {data.eval_fraction:.0%} of `{data.train_file or data.dataset}`"
    elif data.eval_file:
        where = f"`{data.eval_file}`"
    else:
        where = f"`{data.dataset}` ({data.eval_split})"
    limits = [f"first {data.max_eval_samples} examples" if data.max_eval_samples else "",
              *get_task(recipe.task).eval_notes(data)]
    limits = [text for text in limits if text]
    return where + (f" ({', '.join(limits)})" if limits else "")


def _stage_summaries(history: list[dict]) -> list[dict]:
    # (with the stage contract's fields the card reads: changes_model, produces_metrics, card_tags, report_files)
    keep = ("name", "type", "model", "metrics", "config", "seconds", "changes_model", "produces_metrics", "card_tags",
            "report_files")
    return [{k: r.get(k) for k in keep} for r in history]


def _metric_records(history: list[dict]) -> list[dict]:
    return [{"stage": r["name"], "model": r["model"], "metrics": r["metrics"]}
            for r in history if r.get("produces_metrics")]


def _file_manifest(folder: Path) -> dict[str, dict]:
    """Size and sha256 of every file in `folder` (the staging folder) but export.json."""
    return {f.relative_to(folder).as_posix(): {"size": f.stat().st_size, "sha256": sha256_file(f)}
            for f in sorted(folder.rglob("*")) if f.is_file() and f.name != EXPORT_RECORD}


def _local_paths(recipe, output_dir: Path) -> dict[str, str]:
    """Local paths the recipe names (base model, data, other model folders) -> the same path relative to
    `output_dir`, as the export writes them: an absolute path of this machine is never exported."""
    found: dict[str, str] = {}

    def add(value) -> None:
        if not isinstance(value, str) or not value or "\n" in value:
            return
        path = Path(value).expanduser()
        try:
            if not path.exists():
                return  # a Hub id, a name, a missing file: kept as given
        except OSError:
            return
        relative = os.path.relpath(path.resolve(), output_dir)
        for form in {value, str(path), str(path.absolute()), str(path.resolve())}:
            found[form] = relative

    def walk(value) -> None:
        if isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)
        elif isinstance(value, str) and os.sep in value:  # (a bare word may name a folder in the cwd by chance)
            add(value)

    data = recipe.data
    for value in (data.data_dir, data.train_file and str(data.resolve(data.train_file)),
                  data.eval_file and str(data.resolve(data.eval_file))):
        add(value)
    if recipe.model.is_local:
        add(recipe.model.name_or_path)
    walk([stage.config.model_dump(mode="json") for stage in recipe.resolved_stages])
    return found


def _without_local_paths(value, paths: dict[str, str]):
    """`value` (JSON-like) with every local path of `paths` written relative to the export folder: a string
    that is one, starts with one (a model chain `/x/bert -> finetune`) or contains an absolute one."""
    if isinstance(value, dict):
        return {key: _without_local_paths(item, paths) for key, item in value.items()}
    if isinstance(value, list):
        return [_without_local_paths(item, paths) for item in value]
    if not isinstance(value, str):
        return value
    if value in paths:
        return paths[value]
    for local in sorted(paths, key=len, reverse=True):
        if value.startswith(local + " ") or (os.path.isabs(local) and len(local) > 1 and local in value):
            value = value.replace(local, paths[local])
    return value


# --------------------------------------------------------------------------- committing the staging folder


def staging_dir(output_dir: Path) -> Path:
    return Path(output_dir) / STAGING


def _hashes(entry) -> set[str]:
    """The sha256 values a manifest entry allows: `{"size", "sha256"}` (export.json), a list (pending file);
    none for an older export.json's bare sizes, whose files are then never removed."""
    if isinstance(entry, dict) and isinstance(entry.get("sha256"), str):
        return {entry["sha256"]}
    if isinstance(entry, list):
        return {item for item in entry if isinstance(item, str)}
    return set()


def _owned_files(output_dir: Path) -> dict[str, set[str]]:
    """Files the export may own in `output_dir`, with the hashes it wrote them with: the previous export's
    manifest and the list of an interrupted commit."""
    owned: dict[str, set[str]] = {}
    pending = None
    try:
        pending = json.loads((output_dir / PENDING).read_text())
    except (OSError, ValueError):
        pass
    for source in (read_export_record(output_dir), pending):
        files = source.get("files") if isinstance(source, dict) else None
        for name, entry in (files.items() if isinstance(files, dict) else ()):
            if isinstance(name, str):
                owned.setdefault(name, set()).update(_hashes(entry))
    return owned


def _remove_if_unchanged(output_dir: Path, name: str, hashes: set[str]) -> None:
    """Remove a file of an earlier export if it is inside `output_dir`, a regular file and unchanged since it
    was exported; then the folders it leaves empty (plots/). Anything else stays, with a log line."""
    try:
        path = inside(output_dir / name, output_dir)
    except UnsafePathError:
        logger.warning("export.json lists %r, which is outside %s: left alone", name, output_dir)
        return
    if path.is_symlink() or not path.is_file() or path.relative_to(output_dir).parts[0].startswith(NOT_EXPORT_FILES):
        return  # gone, replaced by the user (a link, a folder), or never an export's file
    if sha256_file(path) not in hashes:
        logger.info("export: kept %s: it is not the file the previous export wrote (changed since, or recorded "
                    "without a hash by an older version)", name)
        return
    remove_inside(path, output_dir)
    folder = path.parent
    while folder != output_dir and not any(folder.iterdir()):
        folder.rmdir()
        folder = folder.parent


def _write_json(path: Path, data) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data))
    os.replace(temporary, path)


def commit_export(staging: Path, output_dir: Path) -> None:
    """Make the finished `staging` folder (inside `output_dir`) the export in `output_dir` (module docstring, 3.)."""
    output_dir = Path(output_dir).resolve()
    staging = Path(staging)
    new = read_export_record(staging)["files"]
    # Every target first, before anything changes: an export file never goes outside the folder, through a
    # symlinked folder, nor in place of a folder the user has there.
    targets = {}
    for name in new:
        target = inside(output_dir / name, output_dir)
        if target.is_dir() and not target.is_symlink():
            raise UserError(f"{target}: a folder is where the export writes its file {name}; move it away and "
                            "export again (--rerun-from export)")
        blocking = next((p for p in target.relative_to(output_dir).parents if (output_dir / p).is_file()), None)
        if blocking is not None:
            raise UserError(f"{output_dir / blocking}: a file is where the export needs a folder (for {name}); move "
                            "it away and export again (--rerun-from export)")
        targets[name] = target
    owned = _owned_files(output_dir)
    for name, entry in new.items():
        owned.setdefault(name, set()).update(_hashes(entry))
    _write_json(output_dir / PENDING, {"files": {name: sorted(hashes) for name, hashes in owned.items()}})
    remove_inside(EXPORT_RECORD, output_dir)  # first: from here on the folder is no finished export
    for name, target in targets.items():
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / name, target)
    for name, hashes in owned.items():
        if name not in new:
            _remove_if_unchanged(output_dir, name, hashes)
    os.replace(staging / EXPORT_RECORD, output_dir / EXPORT_RECORD)  # last: the export is complete
    remove_inside(PENDING, output_dir)
    remove_inside(staging, output_dir)


# --------------------------------------------------------------------------- the export


def _write_model(state: ModelState, recipe, folder: Path, sparse: bool = False) -> None:
    from .compressed import save_compressed

    if sparse or state.path is None:  # (no path: no stage changed the model; the base model as loaded)
        ensure_loaded(state, recipe)
        save_compressed(state.model, folder, state.tokenizer, sparse=sparse)
    else:
        for file in state.path.iterdir():
            if file.is_file() and not file.is_symlink():
                copy_file(file, folder / file.name)  # a copy (or reflink): the export and the stage stay apart


def _compare_with_run(remeasured: dict, run_metrics: dict | None) -> None:
    for name, value in (run_metrics or {}).items():
        again = remeasured.get(name)
        if isinstance(value, float) and again is not None and abs(again - value) > 1e-6 * max(1.0, abs(value)):
            logger.warning("%s re-measured on the export: %.6g; the run's evaluate stage measured %.6g",
                           name, again, value)


def export_model(state: ModelState, recipe, output_dir, history: list[dict] = (),
                 config: ExportConfig | None = None) -> dict:
    """Export `state`'s model into `output_dir` (see the module docstring); returns the export record."""
    from .. import __version__
    from ..formats.detect import detect_format
    from .card import base_license, render_model_card, stage_sections
    from .verify import MeasureRequest, verify_reload

    config = config or ExportConfig()
    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    staging = staging_dir(output_dir)
    remove_inside(staging, output_dir)  # leftovers of a killed export
    staging.mkdir()
    local_paths = _local_paths(recipe, output_dir)
    try:
        _write_model(state, recipe, staging, sparse=config.sparse)
        # The exported recipe names local folders relative to the export (run it from there); the fresh process
        # gets the recipe as it ran, in a file that is not part of the export.
        recipe_data = yaml.safe_load(recipe.recipe_yaml)
        recipe_yaml = yaml.safe_dump(_without_local_paths(recipe_data, local_paths), sort_keys=False)
        (staging / "recipe.yaml").write_text(recipe_yaml)
        (staging / VERIFY_RECIPE).write_text(recipe.recipe_yaml)
        metric_records = _without_local_paths(_metric_records(history), local_paths)
        (staging / "metrics.json").write_text(json.dumps(metric_records, indent=2))
        export_format = detect_format(staging)
        # The JSON reports stages declare (`report_files`) that came with the exported model (saved beside it).
        reports = {name: json.loads((staging / name).read_text()) for r in history for name in r.get("report_files", ())
                   if name.endswith(".json") and (staging / name).is_file()}
        spec = recipe.model
        evaluations = [r for r in history if r.get("produces_metrics") and r.get("metrics")]
        before = next((r for r in evaluations if r["model"] == spec.name_or_path), None)
        final = [r for r in evaluations if r["model"] == state.description]
        record = {
            "hf_modelopt": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "task": recipe.task,
            "description": recipe.description,
            "format": {"name": export_format.name, "loads_with": export_format.loads_with},
            "base_model": {"name_or_path": spec.name_or_path, "gguf_file": spec.gguf_file, "revision": spec.revision,
                           "is_local": spec.is_local, "license": base_license(spec)},
            "eval_data": _eval_data_description(recipe),
            "stages": _stage_summaries(history),
            "before": {"stage": before["name"], "metrics": before["metrics"]} if before else None,
            "run_metrics": final[-1]["metrics"] if final else None,
            "plots": write_plots(history, output_dir / "stages", staging),
            "stage_sections": stage_sections(history, output_dir / "stages"),
            "reports": reports,
        }
        if config.verify:
            ensure_loaded(state, recipe)  # the reference the reloaded logits must match
            logger.info("export: reloading %s in a fresh process and re-measuring it", output_dir.name)
            request = MeasureRequest(str(staging / VERIFY_RECIPE), config.compare_base, config.latency_repeats)
            check = verify_reload(staging, state.model, state.tokenizer, recipe.task, timeout=MEASURE_TIMEOUT_S,
                                  measure=request)
            measured = check.measurements
            record.update(reload_check={"passed": True, "max_abs_diff": check.max_abs_diff,
                                        "tolerance": check.tolerance, "seconds": check.seconds},
                          metrics=measured["metrics"], figures=measured["figures"],
                          latency_setup=measured["latency_setup"], base_error=measured["base_error"])
            _compare_with_run(measured["metrics"], record["run_metrics"])
        else:
            record.update(reload_check={"passed": False, "skipped": True}, metrics=record["run_metrics"],
                          figures=None, latency_setup=None, base_error=None)
        remove_inside(staging / VERIFY_RECIPE, output_dir)
        record = _without_local_paths(record, local_paths)
        render_model_card(record, recipe_yaml, load_from=str(output_dir)).save(staging / "README.md")
        record["files"] = _file_manifest(staging)
        (staging / EXPORT_RECORD).write_text(json.dumps(record, indent=2))
        commit_export(staging, output_dir)
    except BaseException:
        if staging.is_dir():
            remove_inside(staging, output_dir)
        raise
    state.path = output_dir
    logger.info("Exported the final model to %s (%s)", output_dir,
                "verified in a fresh process" if config.verify else "not verified: verify is off")
    if config.push_to_hub is not None:
        from .hub import push_export

        push_export(output_dir, config.push_to_hub.repo_id, private=config.push_to_hub.private)
    return record
