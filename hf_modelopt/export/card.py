"""Model cards rendered with huggingface_hub's `ModelCard` from the templates in `templates/` beside this
module (package data, so that an installed wheel has them).

The card is a view of the export record (`export.json`): every figure in its results table was measured
on the exported folder reloaded in a fresh process (see `verify.py`), so rendering it again later (for a
Hub push, with the repository id in the loading code) gives the same numbers.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..formats.detect import EXPORT_FORMATS, ExportFormat, loading_code
from ..inspection import human_bytes
from ..tasks import get_task

logger = logging.getLogger("hf_modelopt")

# Package data beside this module: found the same way in a checkout, an editable install and a wheel.
TEMPLATES = Path(__file__).resolve().parent / "templates"
COUNT_METRICS = ("eval_samples", "eval_tokens")  # sizes of the evaluation data, not quality figures
LOADING_NOTES = {
    "transformers": "It loads with plain transformers (no hf-modelopt needed).",
    "hf_modelopt": "It loads with transformers after `import hf_modelopt`, which registers the loading hooks "
                   "of this format with transformers (`pip install hf-modelopt`).",
    "peft": "It is a peft adapter: peft loads it together with the base model named in `adapter_config.json` "
            "(`pip install peft`).",
}


def base_license(spec) -> str | None:
    """The base model's license, from its model card or config (local folder or HF cache; no download)."""
    from huggingface_hub import ModelCard

    from .measure import base_model_folder

    folder = base_model_folder(spec)
    if folder is None:
        return None
    readme = folder / "README.md"
    if readme.is_file():
        try:
            found = ModelCard.load(readme).data.to_dict().get("license")
            if found:
                return found
        except Exception as err:  # a malformed upstream card must not fail the export
            logger.warning("could not read the license from %s: %s", readme, err)
    try:
        import json

        return json.loads((folder / "config.json").read_text()).get("license")
    except (OSError, ValueError):
        return None


def card_tags(stages: list[dict]) -> list[str]:
    """`hf-modelopt`, what was done (the `card_tags` each stage record carries: `distilled`, `pruned`,
    `quantized`) and the method names (the types of the stages that changed the model, and their `method`)."""
    methods = []
    for record in stages:
        if not record.get("changes_model"):
            continue
        methods.append(record["type"])
        method = (record.get("config") or {}).get("method")
        if isinstance(method, str):
            methods.append(method)
    techniques = [tag for record in stages for tag in record.get("card_tags") or ()]
    return list(dict.fromkeys(["hf-modelopt", *techniques, *methods]))


def _format_number(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _percent(value) -> str:
    return "-" if value is None else f"{value:.2%}"


def _milliseconds(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def results_rows(record: dict) -> list[dict]:
    """The before / after table: metrics, weights on disk, parameters, sparsity, CPU latency."""
    figures = record.get("figures") or {}
    base, export = figures.get("base") or {}, figures.get("export") or {}
    before_metrics = (record.get("before") or {}).get("metrics") or {}
    after_metrics = record.get("metrics") or {}
    rows = [{"label": name, "before": _format_number(before_metrics.get(name)), "after": _format_number(value)}
            for name, value in after_metrics.items() if name not in COUNT_METRICS]
    rows.append({"label": "weights on disk", "before": human_bytes(base.get("size_on_disk_bytes")),
                 "after": human_bytes(export.get("size_on_disk_bytes"))})
    rows.append({"label": "parameters", "before": _format_number(base.get("parameters")),
                 "after": _format_number(export.get("parameters"))})
    rows.append({"label": "sparsity (exactly-zero Linear weights)", "before": _percent(base.get("linear_sparsity")),
                 "after": _percent(export.get("linear_sparsity"))})
    setup = record.get("latency_setup")
    if setup:
        rows.append({"label": f"{setup['device'].upper()} latency, batch {setup['batch_size']} × {setup['seq_len']} "
                              "tokens (ms)",
                     "before": _milliseconds(base.get("latency_ms")), "after": _milliseconds(export.get("latency_ms"))})
    return rows


def _export_format(record: dict) -> ExportFormat:
    name = record["format"]["name"]
    known = next((f for f in EXPORT_FORMATS if f.name == name), None)
    return known or ExportFormat(name, record["format"]["loads_with"], lambda folder: False)


def render_model_card(record: dict, recipe_yaml: str | None, load_from: str, template: str = "default.md"):
    """A `ModelCard` for an export, from its record (`export.json`); `load_from` goes into the loading code;
    `recipe_yaml`, the settings that produced the model (None: the card has no recipe section)."""
    from huggingface_hub import ModelCard, ModelCardData

    base = record["base_model"]
    stages = record["stages"]
    changed = [r for r in stages if r.get("changes_model")]
    tags = card_tags(stages)
    export_format = _export_format(record)
    relation = None
    if changed:
        relation = ("adapter" if export_format.loads_with == "peft"
                    else "quantized" if "quantized" in tags else "finetune")
    task = get_task(record["task"])
    card_data = ModelCardData(
        base_model=None if base["is_local"] else base["name_or_path"],
        base_model_relation=relation if not base["is_local"] else None,
        license=base.get("license"),
        library_name="peft" if export_format.loads_with == "peft" else "transformers",
        pipeline_tag=task.pipeline_tag,
        tags=tags,
    )
    check = record["reload_check"]
    before = record.get("before")
    evaluations = [r for r in stages if r.get("produces_metrics") and r.get("metrics")]
    run_metric_names = list(dict.fromkeys(k for r in evaluations for k in r["metrics"]))
    setup = record.get("latency_setup")
    base_name = base["name_or_path"] + (f" ({base['gguf_file']})" if base.get("gguf_file") else "")
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATES / template),
        model_name=f"{Path(base['name_or_path']).name} ({', '.join(r['type'] for r in changed) or 'exported'})",
        summary=f"A `{record['task']}` model ({export_format.description or export_format.name}).",
        base_model=base_name,
        base_model_url=base["name_or_path"] if base["is_local"] else f"https://huggingface.co/{base['name_or_path']}",
        description=record.get("description", "").strip(),
        verified=check.get("passed", False),
        max_abs_diff=f"{check.get('max_abs_diff', 0):.2g}",
        eval_data=record["eval_data"],
        before_stage=before["stage"] if before else None,
        results=results_rows(record),
        base_error=record.get("base_error"),
        latency_setup=setup,
        run_metric_names=run_metric_names,
        run_rows=[{"model": f"`{r['model']}` (stage `{r['name']}`)",
                   "values": [_format_number(r["metrics"].get(k)) for k in run_metric_names]} for r in evaluations],
        plots=record.get("plots", []),
        stage_sections=record.get("stage_sections", []),
        reports=record.get("reports") or {},
        loading_note=LOADING_NOTES[export_format.loads_with] + "".join(
            f" It needs `{package}` installed (`pip install {package}`)." for package in export_format.requires),
        load_code=loading_code(export_format, task.auto_class, load_from, task.peft_auto_class,
                               task.processor_class),
        stage_list=", ".join(f"`{r['name']}` ({r['type']})" for r in stages),
        recipe_yaml=recipe_yaml,
        hf_modelopt_version=record["hf_modelopt"],
    )
