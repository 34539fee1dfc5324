"""`export.json`, the record of a finished export (written last: a folder without it is not a finished export), and
`Provenance`, what the export is told about the run that produced the model (plain data: no recipe, no stage state).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data import DataConfig
from ..files import sha256_file
from ..modeling import ModelConfig
from ..tasks import get_task

EXPORT_RECORD = "export.json"
# A markdown section a stage may write into its folder (`STAGES_DIR/<stage name>/`); the card shows it under the
# stage's name.
STAGE_CARD_SECTION = "card.md"


@dataclass
class Provenance:
    """What produced the model being exported, as the export record and the model card show it.

    Whoever runs the export (the recipe's export stage, or a script) fills it in; `export_model` reads nothing else.
    """

    task: str  # a task name of `hf_modelopt.tasks`
    base_model: ModelConfig  # the model the run started from: the card's base model and "before" column
    data: DataConfig  # where the evaluation data is: the fresh process re-measures the metrics on it
    description: str = ""  # shown at the top of the card
    model_description: str = ""  # the chain of stages that produced the model (the `model` of its evaluate records)
    # The records of the stages that ran, in order (plain dicts: name, type, model, metrics, config, seconds).
    history: list[dict[str, Any]] = field(default_factory=list)
    # The settings that produced the model as JSON-like data (a recipe's resolved mapping), written as recipe.yaml
    # and shown in the card; None: neither.
    recipe_data: dict[str, Any] | None = None
    # The folder holding each stage's folder (`<stages_dir>/<name>/`: trainer logs, PNG plots, STAGE_CARD_SECTION).
    stages_dir: Path | None = None


def read_export_record(folder) -> dict | None:
    """The `export.json` of a finished export in `folder`, or None."""
    try:
        return json.loads((Path(folder) / EXPORT_RECORD).read_text())
    except (OSError, ValueError):
        return None


def eval_data_description(task: str, data: DataConfig) -> str:
    """Where the evaluation data comes from, with the limits the task's evaluation puts on it (for the card)."""
    if data.eval_fraction is not None:
        where = f"the last {data.eval_fraction:.0%} of `{data.train_file or data.dataset}`"
    elif data.eval_file:
        where = f"`{data.eval_file}`"
    else:
        where = f"`{data.dataset}` ({data.eval_split})"
    limits = [f"first {data.max_eval_samples} examples" if data.max_eval_samples else "",
              *get_task(task).eval_notes(data)]
    limits = [text for text in limits if text]
    return where + (f" ({', '.join(limits)})" if limits else "")


def stage_summaries(history: list[dict]) -> list[dict]:
    # (with the stage contract's fields the card reads: changes_model, produces_metrics, card_tags, report_files)
    keep = ("name", "type", "model", "metrics", "config", "seconds", "changes_model", "produces_metrics", "card_tags",
            "report_files")
    return [{k: r.get(k) for k in keep} for r in history]


def metric_records(history: list[dict]) -> list[dict]:
    return [{"stage": r["name"], "model": r["model"], "metrics": r["metrics"]}
            for r in history if r.get("produces_metrics")]


def stage_sections(history: list[dict], stages_dir: Path | None) -> list[dict]:
    """The markdown sections stages wrote for the card (`STAGE_CARD_SECTION` in their folders), in run order."""
    sections = []
    for record in history if stages_dir is not None else ():
        section = Path(stages_dir) / record["name"] / STAGE_CARD_SECTION
        if section.is_file():
            sections.append({"stage": record["name"], "type": record["type"], "markdown": section.read_text().strip()})
    return sections


def file_manifest(folder: Path) -> dict[str, dict]:
    """Size and sha256 of every file in `folder` (the staging folder) but export.json."""
    return {f.relative_to(folder).as_posix(): {"size": f.stat().st_size, "sha256": sha256_file(f)}
            for f in sorted(folder.rglob("*")) if f.is_file() and f.name != EXPORT_RECORD}


def local_paths(provenance: Provenance, output_dir: Path) -> dict[str, str]:
    """Local paths the run names (base model, data, other model folders in the settings and stage configs) -> the
    same path relative to `output_dir`, as the export writes them: an absolute path of this machine is never
    exported."""
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

    data = provenance.data
    for value in (data.data_dir, data.train_file and str(data.resolve(data.train_file)),
                  data.eval_file and str(data.resolve(data.eval_file))):
        add(value)
    if provenance.base_model.is_local:
        add(provenance.base_model.name_or_path)
    walk([provenance.recipe_data, [record.get("config") for record in provenance.history]])
    return found


def without_local_paths(value, paths: dict[str, str]):
    """`value` (JSON-like) with every local path of `paths` written relative to the export folder: a string
    that is one, starts with one (a model chain `/x/bert -> finetune`) or contains an absolute one."""
    if isinstance(value, dict):
        return {key: without_local_paths(item, paths) for key, item in value.items()}
    if isinstance(value, list):
        return [without_local_paths(item, paths) for item in value]
    if not isinstance(value, str):
        return value
    if value in paths:
        return paths[value]
    for local in sorted(paths, key=len, reverse=True):
        if value.startswith(local + " ") or (os.path.isabs(local) and len(local) > 1 and local in value):
            value = value.replace(local, paths[local])
    return value
