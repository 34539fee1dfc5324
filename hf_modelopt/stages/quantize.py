"""The quantization recipe stages, thin layers over `hf_modelopt.quant`: `quantize` (`quantize()` with its optional
sensitivity scan and KD recovery, saved with `save_compressed` and reloaded in a fresh process) and
`quantize_storage` (group-wise int8 / NF4 storage on disk, `hf_modelopt.formats`)."""

from __future__ import annotations

import json
import logging

from pydantic import Field

from ..quant.config import QuantizationConfig, StorageQuantizationConfig
from . import MODEL_SUBDIR, ModelState, StageConfig, StageContext, ensure_loaded, register_stage

logger = logging.getLogger("hf_modelopt")

REPORT_FILE = "quantization.json"


class QuantizeStageConfig(StageConfig, QuantizationConfig):
    """The `quantize` stage: bitsandbytes quantization of the incoming model (see `QuantizationConfig`).

    The quantized model is saved as it was before any forward pass, then reloaded in a fresh process whose
    logits must equal the in-memory model's.
    """

    verify: bool = Field(
        True, description="Reload the saved model in a fresh process and require equal logits before succeeding.",
    )
    verify_tolerance: float = Field(
        1e-4, gt=0, description="Absolute and relative tolerance of the reload check's logit comparison.",
    )

    def check_after(self, earlier) -> None:
        # (finetune / distill / prune after a quantize stage are refused by their own check_after, train.py)
        for stage in earlier:
            if stage.type == "quantize":
                raise ValueError(f"stage '{stage.name}' before it already quantized the model with bitsandbytes; "
                                 "quantizing bnb weights again is not supported: keep one quantize stage")

    def required_packages(self) -> dict[str, tuple[str, ...]]:
        needs = {"": ("bitsandbytes",)}
        if self.recovery is not None:
            needs["recovery"] = ("peft",)  # LoRA adapters
        if self.sensitivity is not None:
            needs["sensitivity"] = ("matplotlib",)  # its report's plot
        return needs

    def preflight(self, recipe) -> None:
        """Training data that the scan and the recovery need, checked before any stage runs."""
        from ..compat import task_refusal
        from ..data import has_split
        from ..errors import RecipeError

        stages = recipe.resolved_stages
        index = next((i for i, stage in enumerate(stages) if stage.config is self), None)
        if index is None:
            return
        calibrated = next((key for key in ("sensitivity", "recovery") if getattr(self, key) is not None), None)
        if calibrated and (refusal := task_refusal("quantization with calibration", recipe.task)):
            raise RecipeError(recipe.source, f"stages[{index}].{calibrated}", refusal)
        for key, part in (("sensitivity", self.sensitivity), ("recovery", self.recovery)):
            if part is not None and not has_split(recipe.data, "train"):
                raise RecipeError(recipe.source, f"stages[{index}].{key}",
                                  "needs training data (calibration text): set data.train_file or data.dataset")


class StorageStageConfig(StageConfig, StorageQuantizationConfig):
    """The `quantize_storage` stage: store the weights in 8 or 4 bits on disk (see `StorageQuantizationConfig`).

    The model the next stages get is the dequantized one, so evaluations measure what users load.
    """

    verify: bool = Field(True, description="Reload the saved folder in a fresh process and require the logits of "
                         "the dequantized model before succeeding.")

    def check_after(self, earlier) -> None:
        for stage in earlier:
            if stage.type == "quantize":
                raise ValueError(f"stage '{stage.name}' before it already quantized the model with bitsandbytes: "
                                 "its integer weights cannot be stored again; keep one of the two stages")
            if isinstance(stage.config, StorageStageConfig):
                # This stage gets the earlier one's dequantized weights: storing them again rounds them a second
                # time (the error of both), while the export's format and report state only the last settings.
                raise ValueError(f"stage '{stage.name}' before it already stored the weights quantized: storing "
                                 "the dequantized weights again would round them twice; keep one quantize_storage "
                                 "stage")

    def required_packages(self) -> dict[str, tuple[str, ...]]:
        # compressed-tensors is asked for even where the model turns out to need hf-modelopt's format (known only
        # once the model is loaded): format: hf_modelopt runs without it.
        return {"format": ("compressed_tensors",)} if self.format == "compressed-tensors" else {}


def calibration_loader(recipe, tokenizer, batch_size: int):
    """The training split, tokenized for the task, in order: the scan reads its first rows, the recovery trains
    on all of it (Trainer re-batches and shuffles the loader's dataset)."""
    from torch.utils.data import DataLoader

    from .train import training_data

    train, _, collator = training_data(recipe, tokenizer)
    return DataLoader(train, batch_size=batch_size, collate_fn=collator, shuffle=False)


# Why no stage may train every weight after `quantize` (the end of "stage 'q' before it ..."): LoRA adapters it can.
BITSANDBYTES_UNTRAINABLE = ("quantized them with bitsandbytes, which cannot be trained in place (its `recovery:` "
                            "settings train LoRA adapters on them instead)")


@register_stage("quantize", QuantizeStageConfig, untrainable_output=BITSANDBYTES_UNTRAINABLE,
                card_tags=("quantized",), report_files=(REPORT_FILE,))
def quantize_stage(state: ModelState, config: QuantizeStageConfig, context: StageContext) -> ModelState:
    from ..export.compressed import save_compressed
    from ..export.verify import verify_reload
    from ..quant.quantize import quantize
    from ..quant.sensitivity import write_sensitivity_report
    from .train import train_and_record, training_arguments

    recipe = context.settings
    ensure_loaded(state, recipe)
    reference, tokenizer = state.model.eval(), state.tokenizer
    calibration = training_args = None
    if config.sensitivity is not None or config.recovery is not None:
        batch_size = config.sensitivity.batch_size if config.sensitivity is not None else 8
        calibration = calibration_loader(recipe, tokenizer, batch_size)
    if config.recovery is not None:
        training_args = training_arguments(recipe, {**config.recovery.training, "remove_unused_columns": False,
                                                    "eval_strategy": "no"}, context.checkpoint_dir)
    model = quantize(reference, config, calibration, training_args=training_args,
                     run_training=lambda trainer: train_and_record(trainer, context), work_dir=context.stage_dir)
    report, scan = model.quantization_report, model.sensitivity_results
    if config.recovery is not None:  # the adapters name the recipe's model as their base, not a scratch folder
        model.peft_config["default"].base_model_name_or_path = recipe.model.name_or_path
    if scan is not None:
        write_sensitivity_report(scan, context.stage_dir, config.method)
    folder = context.stage_dir / MODEL_SUBDIR
    save_compressed(model, folder, tokenizer)  # the 4-bit base as it was before any CPU forward pass
    summary = {**report.to_dict(), "double_quant": config.double_quant, "compute_dtype": config.compute_dtype,
               "recovered_with_lora": config.recovery is not None,
               "sensitivity": None if scan is None else {
                   "granularity": config.sensitivity.granularity, "kept_units": [r.unit for r in scan if r.kept],
                   "table": "sensitivity.md", "plot": "sensitivity.png"}}
    footprint = model.get_memory_footprint()  # with the adapters, when recovered
    metrics = {"footprint_mb": round(footprint / 1e6, 2),
               "reference_footprint_mb": round(report.reference_footprint_bytes / 1e6, 2),
               "footprint_ratio": round(footprint / report.reference_footprint_bytes, 4),
               "quantized_layers": len(report.quantized), "skipped_layers": len(report.skipped)}
    if config.verify:
        check = verify_reload(folder, model, tokenizer, recipe.task,
                              atol=config.verify_tolerance, rtol=config.verify_tolerance)
        metrics["reload_max_abs_diff"] = check.max_abs_diff
        logger.info("quantize: %s reloads in a fresh process with equal logits (max |diff| %.2g)",
                    folder, check.max_abs_diff)
    summary["metrics"] = metrics
    # The report travels with the model (the export copies the folder's files; the card reads it).
    for target in (context.stage_dir, folder):
        (target / REPORT_FILE).write_text(json.dumps(summary, indent=2))
    if scan is not None:
        for name in ("sensitivity.md", "sensitivity.png", "sensitivity.json"):
            (folder / name).write_bytes((context.stage_dir / name).read_bytes())
    logger.info("quantize: %s, footprint %.1f MB (%.2f x full precision), %d layers kept in full precision",
                config.method, metrics["footprint_mb"], metrics["footprint_ratio"], metrics["skipped_layers"])
    # No model in memory: later stages load the saved folder, so nothing repacked can ever be saved again.
    return ModelState(path=folder, tokenizer=tokenizer, metrics=metrics)


@register_stage("quantize_storage", StorageStageConfig, card_tags=("quantized",),
                report_files=(REPORT_FILE,))
def quantize_storage_stage(state: ModelState, config: StorageStageConfig,
                           context: StageContext) -> ModelState:
    from ..distributed import is_main_process
    from ..export.compressed import storage_format
    from ..export.verify import verify_reload
    from ..formats.detect import detect_format, weights_size_on_disk

    ensure_loaded(state, context.settings)
    model, tokenizer = state.model.eval(), state.tokenizer
    options = dict(linear_bits=config.linear_bits, embedding_bits=config.embedding_bits,
                   group_size=config.group_size, skip=tuple(config.skip_modules))
    full_precision_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    folder = context.stage_dir / MODEL_SUBDIR
    chosen, _ = storage_format(model, config)  # (it warns when compressed-tensors cannot hold the model)
    # Written by the main process; then every process's model gets what `from_pretrained` gives back, so the
    # next stages measure what users load.
    report = (_store_compressed_tensors if chosen == "compressed-tensors" else _store_groupwise)(
        model, folder, tokenizer, options, write=is_main_process())
    metrics = {"linear_bits": config.linear_bits, "embedding_bits": config.embedding_bits}
    if is_main_process():
        stored = weights_size_on_disk(folder)
        metrics.update(full_precision_mb=round(full_precision_bytes / 1e6, 2), stored_mb=round(stored / 1e6, 2),
                       stored_ratio=round(stored / full_precision_bytes, 4))
        export_format = detect_format(folder)
        summary = {"method": "storage", "format": export_format.name, "loads_with": export_format.loads_with,
                   **options, "skip": list(options.pop("skip")), **report.to_dict(), "metrics": metrics}
        for target in (context.stage_dir, folder):
            (target / REPORT_FILE).write_text(json.dumps(summary, indent=2))
        if config.verify:
            check = verify_reload(folder, model, tokenizer, context.settings.task)
            metrics["reload_max_abs_diff"] = check.max_abs_diff
        loader = "plain transformers with compressed-tensors installed" if chosen == "compressed-tensors" else \
            "transformers after `import hf_modelopt`"
        logger.info("quantize_storage: %d weights stored quantized (%s, %s), %.1f MB on disk (%.2f x full precision); "
                    "they load back in full precision with %s", len(report.formats),
                    ", ".join(sorted(set(report.formats.values()))), export_format.name, metrics["stored_mb"],
                    metrics["stored_ratio"], loader)
    return ModelState(model=model, tokenizer=tokenizer, path=folder, metrics=metrics)


def _store_compressed_tensors(model, folder, tokenizer, options, write: bool):
    from ..formats.compressed_tensors import fake_quantize_in_place_, save_compressed_tensors

    if write:
        save_compressed_tensors(model, folder, tokenizer, **options)
    return fake_quantize_in_place_(model, **options)


def _store_groupwise(model, folder, tokenizer, options, write: bool):
    from ..formats.groupwise import load_stored_weights_, storage_state_dict
    from ..formats.hf_modelopt import write_stored_weights

    stored_state, report = storage_state_dict(model, **options)  # quantized once: written, then decoded
    if write:
        write_stored_weights(model, folder, stored_state, report, options["group_size"], tokenizer)
    # Not before the write: the tied copy of a quantized weight (e.g. lm_head) in `stored_state` is the model's
    # own tensor, which decoding overwrites.
    load_stored_weights_(model, stored_state, options["group_size"])
    return report
