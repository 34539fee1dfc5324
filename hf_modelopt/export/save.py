"""The final export: the model, verified, with its record and model card, in the output folder (`export_model`).

`OUTPUT/` receives the model (safetensors, config, tokenizer, or an adapter), `recipe.yaml` (resolved),
`metrics.json` (the run's evaluate stages), `plots/` (loss curves and the PNG files stages made),
`README.md` (the model card) and `export.json` (what was exported and measured, and the manifest of files).

Order of work, so that a killed or failed export never leaves a half export behind:

1. everything is written to a sibling staging folder, `.OUTPUT.export-tmp/`;
2. the staging folder is reloaded in a fresh process (`verify.py`), its logits compared with the model in
   memory, and its metrics, size, parameters, sparsity and latency re-measured; the card is written from
   those figures only;
3. the staging folder receives hard links of everything else in `OUTPUT/` (the stage folders), then the two
   folders are swapped in one atomic `renameat2(RENAME_EXCHANGE)`. Where that is not possible (not Linux,
   `OUTPUT` is a mount point or the current directory), the files are moved into `OUTPUT/` one by one with
   `export.json` removed first and written last: a folder without `export.json` is not a finished export.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..stages import ModelState, ensure_loaded, link_or_copy
from ..tasks import get_task
from .record import EXPORT_RECORD, read_export_record

logger = logging.getLogger("hf_modelopt")

PLOTS_DIR = "plots"
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
    plots = []
    folder = target / PLOTS_DIR
    folder.mkdir()
    for record in history:
        stage_dir = stages_dir / record["name"]
        logs = stage_dir / "log_history.json"
        pngs = sorted(stage_dir.glob("*.png"))
        if not logs.is_file() and not pngs:
            continue
        if logs.is_file():
            try:
                drawn = plot_loss_curves(json.loads(logs.read_text()), f"stage {record['name']} ({record['type']})",
                                         folder / f"{record['name']}-loss.png")
            except ImportError:
                logger.info("matplotlib is not installed: no loss curves in the card")
                drawn = False
            if drawn:
                plots.append({"path": f"{PLOTS_DIR}/{record['name']}-loss.png",
                              "title": f"training losses of stage {record['name']}"})
        for png in pngs:
            shutil.copy2(png, folder / f"{record['name']}-{png.name}")
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
    keep = ("name", "type", "model", "metrics", "config", "seconds")
    return [{k: r.get(k) for k in keep} for r in history]


def _metric_records(history: list[dict]) -> list[dict]:
    return [{"stage": r["name"], "model": r["model"], "metrics": r["metrics"]}
            for r in history if r["type"] == "evaluate"]


def _file_manifest(folder: Path) -> dict[str, int]:
    return {str(f.relative_to(folder).as_posix()): f.stat().st_size
            for f in sorted(folder.rglob("*")) if f.is_file() and f.name != EXPORT_RECORD}


# --------------------------------------------------------------------------- committing the staging folder


def staging_dir(output_dir: Path) -> Path:
    return output_dir.parent / f".{output_dir.name}.export-tmp"


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one step (Linux `renameat2(RENAME_EXCHANGE)`); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a C library without renameat2 (glibc < 2.28, musl < 1.2.?)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EXDEV, errno.EOPNOTSUPP, errno.EBUSY):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _can_swap(output_dir: Path) -> bool:
    """Swapping replaces the folder's inode: not for a mount point or a folder a shell may be sitting in."""
    cwd = Path.cwd().resolve()
    if cwd == output_dir or output_dir in cwd.parents:
        return False
    return output_dir.stat().st_dev == output_dir.parent.stat().st_dev


def _carry_over(output_dir: Path, staging: Path) -> None:
    """Hard-link into `staging` what `output_dir` holds besides the previous export's files (stage folders)."""
    previous = read_export_record(output_dir) or {}
    owned = {name.split("/")[0] for name in previous.get("files", {})} | {EXPORT_RECORD}
    replaced = {entry.name for entry in staging.iterdir()}
    for entry in output_dir.iterdir():
        if entry.name in owned or entry.name in replaced or entry.name == ".export-tmp":  # (older versions' staging)
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, staging / entry.name, symlinks=True, copy_function=link_or_copy)
        elif entry.is_symlink():
            os.symlink(os.readlink(entry), staging / entry.name)
        else:
            link_or_copy(entry, staging / entry.name)


def _move_in_place(staging: Path, output_dir: Path) -> None:
    """The fallback commit: remove the old marker, move files in, write the new marker last."""
    previous = read_export_record(output_dir) or {}
    (output_dir / EXPORT_RECORD).unlink(missing_ok=True)
    for name in previous.get("files", {}):  # files of the previous export that this one does not replace
        if not (staging / name).exists():
            (output_dir / name).unlink(missing_ok=True)
    for file in sorted(staging.rglob("*"), key=lambda f: f.name == EXPORT_RECORD):
        if not file.is_file():
            continue
        target = output_dir / file.relative_to(staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() and os.path.samefile(file, target):
            file.unlink()  # already in place (a hard link to the same weights): rename() would do nothing
        else:
            os.replace(file, target)
    shutil.rmtree(staging)


def commit_export(staging: Path, output_dir: Path) -> None:
    """Make the finished `staging` folder the export in `output_dir`, never leaving a half export."""
    if not output_dir.exists():
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        os.rename(staging, output_dir)
        return
    if _can_swap(output_dir):
        _carry_over(output_dir, staging)
        if _exchange(staging, output_dir):
            shutil.rmtree(staging)  # now the previous output folder; its stage files live on as hard links
            return
    _move_in_place(staging, output_dir)


# --------------------------------------------------------------------------- the export


def _write_model(state: ModelState, recipe, folder: Path, sparse: bool = False) -> None:
    from .compressed import save_compressed

    if sparse or state.path is None:  # (no path: no stage changed the model; the base model as loaded)
        ensure_loaded(state, recipe)
        save_compressed(state.model, folder, state.tokenizer, sparse=sparse)
    else:
        for file in state.path.iterdir():
            if file.is_file():
                link_or_copy(file, folder / file.name)


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
    staging = staging_dir(output_dir)
    shutil.rmtree(staging, ignore_errors=True)  # leftovers of a killed export
    staging.mkdir(parents=True)
    try:
        _write_model(state, recipe, staging, sparse=config.sparse)
        recipe_yaml = recipe.to_yaml()
        (staging / "recipe.yaml").write_text(recipe_yaml)
        (staging / "metrics.json").write_text(json.dumps(_metric_records(history), indent=2))
        export_format = detect_format(staging)
        quantization = staging / "quantization.json"  # the quantize stage's report, saved with its model
        spec = recipe.model
        evaluations = [r for r in history if r["type"] == "evaluate" and r.get("metrics")]
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
            "quantization": json.loads(quantization.read_text()) if quantization.is_file() else None,
        }
        if config.verify:
            ensure_loaded(state, recipe)  # the reference the reloaded logits must match
            logger.info("export: reloading %s in a fresh process and re-measuring it", output_dir.name)
            request = MeasureRequest(str(staging / "recipe.yaml"), config.compare_base, config.latency_repeats)
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
        render_model_card(record, recipe_yaml, load_from=str(output_dir)).save(staging / "README.md")
        record["files"] = _file_manifest(staging)
        (staging / EXPORT_RECORD).write_text(json.dumps(record, indent=2))  # last: the export is complete
        commit_export(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    state.path = output_dir
    logger.info("Exported the final model to %s (%s)", output_dir,
                "verified in a fresh process" if config.verify else "not verified: verify is off")
    if config.push_to_hub is not None:
        from .hub import push_export

        push_export(output_dir, config.push_to_hub.repo_id, private=config.push_to_hub.private)
    return record
