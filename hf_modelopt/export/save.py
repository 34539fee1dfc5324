"""The final export: a model, verified, with its record and model card, in the output folder (`export_model`).

`OUTPUT/` receives the model (safetensors, config, tokenizer, or an adapter), `recipe.yaml` (the recipe that
produced it, when given), `metrics.json` (the run's evaluate stages), `plots/` (loss curves and the PNG files stages
made: `plots.py`), `README.md` (the model card: `card.py`) and `export.json` (what was exported and measured, and the
manifest of files: size and sha256 of each: `record.py`).

The export is told what produced the model by a `Provenance` (plain data: task, base model, data, stage records,
recipe data to show); it knows no recipe and no stage. Order of work, so that a killed or failed export never looks
finished and never costs a user's file:

1. everything is written to a staging folder inside the output folder, `OUTPUT/.hf-modelopt-export/` (a saved
   model is copied or reflinked, never hard-linked: a user editing the export must not change the stage cache, nor
   the reverse);
2. the staging folder is reloaded in a fresh process (`verify.py`), its logits compared with the model in
   memory, and its metrics, size, parameters, sparsity and latency re-measured; the card is written from
   those figures only;
3. the commit (`commit.py`): each file renamed into place, `export.json` last.

Never touched: files a user added (they are in no manifest), files of the previous export that a user
changed, anything outside `OUTPUT/` (every path is resolved and checked: `hf_modelopt.files`), the stage
folders. Paths written into recipe.yaml, metrics.json, export.json and the card are the Hub id, or relative
to `OUTPUT/` for local folders: nothing in the export names the machine's absolute paths.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..files import copy_file, remove_inside
from .commit import commit_export, staging_dir
from .record import (
    EXPORT_RECORD,
    Provenance,
    eval_data_description,
    file_manifest,
    local_paths,
    metric_records,
    stage_sections,
    stage_summaries,
    without_local_paths,
)

logger = logging.getLogger("hf_modelopt")

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

    def needs_model_in_memory(self, saved: bool) -> bool:
        """Whether `export_model` needs the model in memory: to verify it, to write it sparse, or because it was
        never saved (`saved`: it is in a folder `export_model` can copy)."""
        return self.verify or self.sparse or not saved


def _write_model(model, tokenizer, saved_folder: Path | None, folder: Path, sparse: bool) -> None:
    from .compressed import save_compressed

    if sparse or saved_folder is None:
        save_compressed(model, folder, tokenizer, sparse=sparse)
    else:
        for file in Path(saved_folder).iterdir():
            if file.is_file() and not file.is_symlink():
                copy_file(file, folder / file.name)  # a copy (or reflink): the export and the stage stay apart


def _compare_with_run(remeasured: dict, run_metrics: dict | None) -> None:
    for name, value in (run_metrics or {}).items():
        again = remeasured.get(name)
        if isinstance(value, float) and again is not None and abs(again - value) > 1e-6 * max(1.0, abs(value)):
            logger.warning("%s re-measured on the export: %.6g; the run's evaluate stage measured %.6g",
                           name, again, value)


def export_model(model, tokenizer, output_dir, provenance: Provenance, config: ExportConfig | None = None,
                 saved_folder=None) -> dict:
    """Export `model` (with `tokenizer`) into `output_dir` (see the module docstring); returns the export record.

    `saved_folder`: a folder the model is already saved in, copied as it is unless `config.sparse`; `model` may then
    be None when `config.needs_model_in_memory(saved=True)` is false (no verification, no sparse writing).
    """
    from .. import __version__
    from ..formats.detect import detect_format
    from .card import base_license, render_model_card
    from .plots import write_plots
    from .verify import MeasureRequest, verify_reload

    config = config or ExportConfig()
    if model is None and config.needs_model_in_memory(saved=saved_folder is not None):
        raise ValueError("export_model needs the model in memory (to verify it, to write it sparse, or because no "
                         "saved_folder holds it)")
    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    staging = staging_dir(output_dir)
    remove_inside(staging, output_dir)  # leftovers of a killed export
    staging.mkdir()
    history = list(provenance.history)
    paths = local_paths(provenance, output_dir)
    try:
        _write_model(model, tokenizer, saved_folder, staging, config.sparse)
        # The exported recipe names local folders relative to the export (run it from there).
        recipe_yaml = None
        if provenance.recipe_data is not None:
            recipe_yaml = yaml.safe_dump(without_local_paths(provenance.recipe_data, paths), sort_keys=False)
            (staging / "recipe.yaml").write_text(recipe_yaml)
        (staging / "metrics.json").write_text(json.dumps(without_local_paths(metric_records(history), paths),
                                                         indent=2))
        export_format = detect_format(staging)
        # The JSON reports stages declare (`report_files`) that came with the exported model (saved beside it).
        reports = {name: json.loads((staging / name).read_text()) for r in history
                   for name in r.get("report_files") or () if name.endswith(".json") and (staging / name).is_file()}
        spec = provenance.base_model
        evaluations = [r for r in history if r.get("produces_metrics") and r.get("metrics")]
        before = next((r for r in evaluations if r["model"] == spec.name_or_path), None)
        final = [r for r in evaluations if r["model"] == provenance.model_description]
        record = {
            "hf_modelopt": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "task": provenance.task,
            "description": provenance.description,
            "format": {"name": export_format.name, "loads_with": export_format.loads_with},
            "base_model": {"name_or_path": spec.name_or_path, "gguf_file": spec.gguf_file, "revision": spec.revision,
                           "is_local": spec.is_local, "license": base_license(spec)},
            "eval_data": eval_data_description(provenance.task, provenance.data),
            "stages": stage_summaries(history),
            "before": {"stage": before["name"], "metrics": before["metrics"]} if before else None,
            "run_metrics": final[-1]["metrics"] if final else None,
            "plots": write_plots(history, provenance.stages_dir, staging),
            "stage_sections": stage_sections(history, provenance.stages_dir),
            "reports": reports,
        }
        if config.verify:
            logger.info("export: reloading %s in a fresh process and re-measuring it", output_dir.name)
            request = MeasureRequest(provenance.data, spec, config.compare_base, config.latency_repeats)
            check = verify_reload(staging, model, tokenizer, provenance.task, timeout=MEASURE_TIMEOUT_S,
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
        record = without_local_paths(record, paths)
        render_model_card(record, recipe_yaml, load_from=str(output_dir)).save(staging / "README.md")
        record["files"] = file_manifest(staging)
        (staging / EXPORT_RECORD).write_text(json.dumps(record, indent=2))
        commit_export(staging, output_dir)
    except BaseException:
        if staging.is_dir():
            remove_inside(staging, output_dir)
        raise
    logger.info("Exported the final model to %s (%s)", output_dir,
                "verified in a fresh process" if config.verify else "not verified: verify is off")
    if config.push_to_hub is not None:
        from .hub import push_export

        push_export(output_dir, config.push_to_hub.repo_id, private=config.push_to_hub.private)
    return record
