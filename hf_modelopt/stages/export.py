"""The `export` stage: `hf_modelopt.export.export_model` into the run's output folder (always the last stage)."""

from __future__ import annotations

from ..export.save import ExportConfig
from . import ModelState, RunSettings, StageConfig, StageContext, ensure_loaded, register_stage


class ExportStageConfig(StageConfig, ExportConfig):
    """The `export` stage: the final model, verified in a fresh process, with its card (see `ExportConfig`)."""

    def preflight(self, settings: RunSettings) -> None:
        if self.push_to_hub is None:
            return
        from huggingface_hub import constants, get_token

        from ..errors import RecipeError

        index = next(i for i, s in enumerate(settings.resolved_stages) if s.config is self)
        key = f"stages[{index}].push_to_hub"
        if constants.HF_HUB_OFFLINE:
            raise RecipeError(settings.source, key, "the Hub is offline (HF_HUB_OFFLINE=1): the export could not be "
                              "pushed; remove push_to_hub and run `hf-modelopt push OUTPUT --repo-id ...` later")
        if get_token() is None:
            raise RecipeError(settings.source, key, "no Hugging Face token: run `hf auth login` or set HF_TOKEN")


def provenance(state: ModelState, context: StageContext):
    """What the export is told about the run: the run's task, model, data and description, the stage records and
    the resolved recipe (written as recipe.yaml), as plain data."""
    import yaml

    from ..export.record import Provenance

    settings = context.settings
    return Provenance(
        task=settings.task, base_model=settings.model, data=settings.data, description=settings.description,
        model_description=state.description, history=list(context.history),
        recipe_data=yaml.safe_load(settings.recipe_yaml),
        stages_dir=context.output_dir / "stages",
    )


# It writes the final model and its card: later stages would change nothing exported.
@register_stage("export", ExportStageConfig, changes_model=False, writes_final_output=True)
def export_stage(state: ModelState, config: ExportStageConfig, context: StageContext) -> ModelState:
    from ..export.save import export_model

    if config.needs_model_in_memory(saved=state.path is not None):
        ensure_loaded(state, context.settings)
    export_model(state.model, state.tokenizer, context.output_dir, provenance(state, context), config,
                 saved_folder=state.path)
    state.path = context.output_dir
    return state
