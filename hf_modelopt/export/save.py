"""The `export` stage: the final model, `recipe.yaml`, `metrics.json` and `README.md` in the output folder."""

from __future__ import annotations

import json
import logging
import os
import shutil

from ..stages import ModelState, StageConfig, StageContext, register_stage

logger = logging.getLogger("hf_modelopt")


class ExportConfig(StageConfig):
    """Write the final model to the output folder, loadable with `from_pretrained(OUTPUT)`."""


def _metric_records(history: list[dict]) -> list[dict]:
    return [{"stage": r["name"], "model": r["model"], "metrics": r["metrics"]}
            for r in history if r["type"] == "evaluate"]


@register_stage("export", ExportConfig, changes_model=False, cacheable=False)
def export_stage(state: ModelState, config: ExportConfig, context: StageContext) -> ModelState:
    from ..modeling import ensure_loaded
    from ..pipeline import link_or_copy, save_model_state
    from .card import render_model_card

    output_dir = context.output_dir
    staging = output_dir / ".export-tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    if state.path is None:  # no stage changed the model: export the base model as loaded
        ensure_loaded(state, context.recipe)
        save_model_state(state, staging)
    else:
        for file in state.path.iterdir():
            if file.is_file():
                link_or_copy(file, staging / file.name)
    (staging / "recipe.yaml").write_text(context.recipe.to_yaml())
    (staging / "metrics.json").write_text(json.dumps(_metric_records(context.history), indent=2))
    render_model_card(context.recipe, context.history, staging).save(staging / "README.md")
    # Everything was written first; moving files into place is quick and never leaves a half-written file.
    for file in staging.iterdir():
        target = output_dir / file.name
        if target.exists() and os.path.samefile(file, target):
            file.unlink()  # already in place (a hard link to the same weights): rename() would do nothing
        else:
            os.replace(file, target)
    staging.rmdir()
    state.path = output_dir
    logger.info("Exported the final model to %s", output_dir)
    return state
