"""The `minitron` recipe stage: Minitron width / depth pruning of a causal LM (`prune_minitron_`, through `prune_`)
from calibration blocks of the recipe's training text, then, with `distillation:`, recovery by KD from the unpruned
model, in one stage (prune -> recover).

The stage folder holds `minitron.json` (shapes, parameter counts, the kept blocks and heads, the per-block
importance, the search table), `importance.safetensors` (every score and every kept index, as tensors) and
`card.md`, the section the export's model card shows for this stage.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from pydantic import Field

from ..distill.config import KnowledgeDistillationConfig
from ..errors import RecipeError, UserError
from ..prune.minitron import MinitronConfig
from . import (
    STAGE_CARD_SECTION,
    ModelState,
    StageConfig,
    StageContext,
    ensure_loaded,
    gets_recipe_model,
    meta_model,
    register_stage,
)
from .kd import TEACHER_HELP, check_kd_settings, check_teacher_stage, kd_teacher, train_with_distillation
from .train import TRAINING_HELP, refuse_training_after

logger = logging.getLogger("hf_modelopt")

STAGE_TYPE = "minitron"


class MinitronStageConfig(StageConfig, MinitronConfig):
    """The `minitron` stage: prune a causal LM to a uniform smaller shape (or the best shape within
    `target_params`) by activation importance on calibration blocks of the training text; with `distillation:`,
    then recover by KD from the unpruned incoming model."""

    calibration_batch_size: int = Field(4, gt=0, description="Calibration blocks per batch (the stage scores "
                                        "calibration_batches batches from the start of the training split).")
    calibration_length: int | None = Field(None, gt=1, description="Tokens per calibration block; default: "
                                           "data.max_length, the training blocks' length.")
    distillation: KnowledgeDistillationConfig | None = Field(
        None, description="After pruning, train by knowledge distillation from the unpruned incoming model (a frozen "
        "copy; forward KL on the logits, optionally top_k and the on-disk teacher-logit cache: the `distill` "
        "stage's loss). Without it the stage only prunes.",
    )
    teacher: str | None = Field(None, description=TEACHER_HELP)
    perplexity_every_steps: int | None = Field(
        None, gt=0, description="With distillation: measure the held-out perplexity (the evaluate stage's windows of "
        "the recipe's evaluation split) before KD, every N optimizer steps and after the last: the curve against KD "
        "tokens goes into the log history, minitron.json and a plot on the card.",
    )
    training: dict[str, Any] = Field(default_factory=dict, description=TRAINING_HELP)
    requires_data = ("train",)

    def check_after(self, earlier) -> None:
        if self.distillation is not None:
            refuse_training_after(STAGE_TYPE, earlier)
        check_teacher_stage(self, earlier)

    def preflight(self, recipe) -> None:
        """Causal LMs only; and when no earlier stage changes the model, the recipe's model (built on the meta
        device from its config: no weights are read) must be a supported family, and the shape or budget must be
        reachable, so a bad one is refused before any stage runs."""
        from ..tasks import get_task

        if get_task(recipe.task).logits != "decoder-token":
            raise RecipeError(recipe.source, STAGE_TYPE, f"Minitron pruning is for causal LMs (task is {recipe.task}); "
                              "use prune_structured for other tasks")
        if self.distillation is not None:
            check_kd_settings(self.distillation, recipe, self.training, f"{STAGE_TYPE}.distillation")
        if self.perplexity_every_steps is not None:
            from ..data import has_split

            if self.distillation is None:
                raise RecipeError(recipe.source, f"{STAGE_TYPE}.perplexity_every_steps", "measures the KD recovery: "
                                  "set distillation too, or remove it")
            if not has_split(recipe.data, "eval"):
                raise RecipeError(recipe.source, f"{STAGE_TYPE}.perplexity_every_steps", "needs held-out text: set "
                                  "data.eval_file or data.eval_fraction")
        if not gets_recipe_model(recipe, self):
            return  # the model this stage gets is known only when it runs: the stage checks it before it scores
        try:
            check_prunable(meta_model(recipe.model, recipe.task), self)
        except UserError as err:
            raise RecipeError(recipe.source, STAGE_TYPE, str(err)) from None


def check_prunable(model, config: MinitronConfig) -> None:
    """What `prune_minitron_` refuses before it scores: the family, then the shape or the budget (`UserError`)."""
    from ..prune.minitron.search import target_shapes

    target_shapes(model, config)


def calibration_loader(recipe, tokenizer, config: MinitronStageConfig):
    """Batches of `calibration_batch_size` blocks from the start of the training split (never the held-out
    part: with `data.eval_fraction` the training split excludes it)."""
    from ..data import load_split
    from ..prune.oneshot import calibration_batches
    from ..tasks.causal_lm import tokenize_causal_lm

    data = recipe.data
    if config.calibration_length is not None:
        data = data.model_copy(update={"max_length": config.calibration_length})
    blocks = tokenize_causal_lm(load_split(recipe.data, "train"), tokenizer, data)
    wanted = config.calibration_batches * config.calibration_batch_size
    if len(blocks) < wanted:
        logger.warning("%s: the training text holds %d calibration blocks of %d tokens, fewer than the %d asked for",
                       STAGE_TYPE, len(blocks), data.max_length, wanted)
    return list(calibration_batches(blocks, wanted, config.calibration_batch_size)), data.max_length


def report_record(report: dict, calibration: dict) -> dict:
    """The JSON-ready part of `prune_minitron_`'s report: shapes, counts, kept blocks and heads, per-block
    importance and the search rows (the per-neuron and per-channel values go to the safetensors file)."""
    importance, plan = report["importance"], report["plan"]
    per_block = [{"layer": i, "lm_loss_skipped": float(importance.lm_loss_without_layer[i]),
                  "block_influence": float(importance.block_influence[i]),
                  "head_scores": [round(float(v), 6) for v in importance.heads[i]],
                  "mean_neuron_score": float(importance.neurons[i].mean())} for i in range(len(importance.neurons))]
    return {"shape_before": report["shape_before"], "shape_after": report["shape_after"],
            "parameters_before": report["parameters_before"], "parameters_after": report["parameters_after"],
            "depth_importance": report["depth_importance"], "dropped_layers": report["dropped_layers"],
            "kept_layers": plan.kept_layers, "kept_kv_groups": plan.kept_kv_groups, "kept_heads": plan.kept_heads,
            "calibration": {**calibration, "tokens": importance.tokens, "lm_loss": importance.lm_loss},
            "importance": per_block, "search": report["search"]}


def importance_tensors(report: dict) -> dict:
    """Every score and every kept index as tensors (safetensors), keyed by what they are."""
    import torch

    importance, plan = report["importance"], report["plan"]
    return {"neuron_scores": torch.stack(importance.neurons), "head_scores": torch.stack(importance.heads),
            "kv_group_scores": torch.stack(importance.kv_groups), "hidden_channel_scores": importance.hidden,
            "lm_loss_without_layer": importance.lm_loss_without_layer,
            "block_influence": importance.block_influence,
            "kept_layers": torch.tensor(plan.kept_layers), "kept_neurons": torch.tensor(plan.kept_neurons),
            "kept_hidden_channels": torch.tensor(plan.kept_hidden)}


def card_section(record: dict, report: dict, recovery: dict | None) -> str:
    """The markdown the export's model card shows for this stage."""
    before, after = record["shape_before"], record["shape_after"]
    shape = " · ".join(f"`{key}` {before[key]} → {after[key]}" for key in after)
    calibration = record["calibration"]
    lines = [f"Minitron width / depth pruning ([Muralidharan et al. 2024](https://arxiv.org/abs/2407.14679)): "
             f"{record['parameters_before']:,} → {record['parameters_after']:,} parameters; {shape}.",
             "",
             f"Importance from activations on {calibration['tokens']:,} calibration tokens ({calibration['batches']} "
             f"batches of {calibration['batch_size']} × {calibration['length']}-token blocks from the start of the "
             f"training text); blocks chosen by `{record['depth_importance']}`; blocks removed: "
             f"{record['dropped_layers'] or 'none'}."]
    if report["search_table"]:
        lines += ["", "Shape search (calibration LM loss right after pruning, lowest taken):", "", "```",
                  report["search_table"], "```"]
    lines += ["", "Per-block importance (LM loss with the block skipped, Block Influence, mean head and neuron "
              "scores):", "", "```", report["importance_table"], "```"]
    if recovery:
        lines += ["", f"Recovered by KD from the unpruned model: {recovery['steps']} steps, {recovery['tokens']:,} "
                  f"training tokens."]
        if recovery.get("perplexity_curve"):
            lines += ["", "Held-out perplexity against KD tokens: " + ", ".join(
                f"{p['tokens_trained']:,}: {p['held_out_perplexity']:.2f}" for p in recovery["perplexity_curve"]) + "."]
    return "\n".join(lines) + "\n"


def perplexity_callback(recipe, tokenizer, every_steps: int):
    """The held-out perplexity curve of the KD recovery, on the evaluate stage's windows of the evaluation split."""
    from ..data import load_split
    from ..tasks.causal_lm import eval_token_ids
    from ..tasks.held_out import HeldOutPerplexityCallback

    data = recipe.data
    return HeldOutPerplexityCallback(eval_token_ids(load_split(data, "eval"), tokenizer, data), data.eval_window,
                                     data.eval_batch_size, every_steps, data.max_length)


@register_stage(STAGE_TYPE, MinitronStageConfig, card_tags=("pruned",))
def minitron_stage(state: ModelState, config: MinitronStageConfig, context: StageContext) -> ModelState:
    from safetensors.torch import save_file

    from ..distributed import is_main_process
    from ..prune.prune import prune_

    recipe = context.settings
    ensure_loaded(state, recipe)
    model, tokenizer = state.model, state.tokenizer
    check_prunable(model, config)  # (again: an earlier stage may have changed the model since preflight)
    batches, length = calibration_loader(recipe, tokenizer, config)
    teacher = kd_teacher(model, config, context) if config.distillation is not None else None
    logger.info("%s: scoring on %d calibration batches of %d x %d tokens", context.stage_name, len(batches),
                config.calibration_batch_size, length)
    report = prune_(model, config, batches)  # (a stage config is its technique's config, plus stage fields)
    record = report_record(report, {"batches": len(batches), "batch_size": config.calibration_batch_size,
                                    "length": length})
    if report["search_table"]:
        logger.info("%s: shape search\n%s", context.stage_name, report["search_table"])
    recovery = None
    if teacher is not None:
        callbacks = [perplexity_callback(recipe, tokenizer, config.perplexity_every_steps)] \
            if config.perplexity_every_steps else []
        trainer = train_with_distillation(teacher, model, tokenizer, config.distillation, config.training, context,
                                          copied_from=report["plan"].kept_layers, callbacks=callbacks)
        model = trainer.model
        from ..tasks.held_out import perplexity_curve, tokens_trained

        steps = trainer.state.global_step
        recovery = {"steps": steps, "tokens": tokens_trained(trainer.args, steps, recipe.data.max_length)}
        if callbacks:
            recovery["perplexity_curve"] = perplexity_curve(trainer.state.log_history)
        record["recovery"] = recovery
    if is_main_process():
        (context.stage_dir / "minitron.json").write_text(json.dumps(record, indent=2))
        save_file({k: v.contiguous() for k, v in importance_tensors(report).items()},
                  context.stage_dir / "importance.safetensors")
        (context.stage_dir / STAGE_CARD_SECTION).write_text(card_section(record, report, recovery))
    state = ModelState(model=model, tokenizer=tokenizer)
    state.metrics = {"parameters": report["parameters_after"], "parameters_before": report["parameters_before"],
                     "calibration_lm_loss_before": report["importance"].lm_loss, **report["shape_after"]}
    if recovery:
        state.metrics.update(kd_steps=recovery["steps"], kd_tokens=recovery["tokens"])
    return state
