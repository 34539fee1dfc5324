"""The `quantize` recipe stage: optional sensitivity scan, bitsandbytes quantization, optional KD recovery,
then a save made before the model ever ran and a reload check in a fresh process."""

from __future__ import annotations

import json
import logging

from ..stages import ModelState, StageContext, register_stage
from .config import QuantizationConfig, StorageQuantizationConfig

logger = logging.getLogger("hf_modelopt")

REPORT_FILE = "quantization.json"


def calibration_batches(recipe, tokenizer, samples: int, batch_size: int) -> list[dict]:
    """The first `samples` training examples (or `data.max_length`-token blocks), collated into batches."""
    from transformers import DataCollatorWithPadding, default_data_collator

    from ..data import load_split, tokenize_causal_lm, tokenize_classification

    raw = load_split(recipe.data, "train")
    if recipe.task == "text-classification":
        encoded = tokenize_classification(raw.select(range(min(samples, len(raw)))), tokenizer, recipe.data)
        collate = DataCollatorWithPadding(tokenizer)
    else:
        encoded = tokenize_causal_lm(raw, tokenizer, recipe.data)
        encoded = encoded.select(range(min(samples, len(encoded))))
        collate = default_data_collator
    rows = [encoded[i] for i in range(len(encoded))]
    return [collate(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]


def _sensitivity_keep(reference, tokenizer, config: QuantizationConfig, context: StageContext):
    """Run the scan, write its report into the stage folder; returns (layers to keep, results)."""
    from .bnb import linear_layers, plan_skips
    from .sensitivity import choose_kept_units, estimated_quantized_size, sensitivity_scan, write_sensitivity_report

    scan = config.sensitivity
    skipped = plan_skips(reference, config)
    candidates = [name for name in linear_layers(reference) if name not in skipped]
    batches = calibration_batches(context.recipe, tokenizer, scan.calibration_samples, scan.batch_size)
    results = sensitivity_scan(reference, batches, config.method, candidates, scan.granularity)
    size = estimated_quantized_size(reference, set(skipped), config.method, config.double_quant)
    kept_units = choose_kept_units(results, size, config.method, config.double_quant,
                                   max_size_mb=scan.max_size_mb, keep_fraction=scan.keep_fraction)
    logger.info("sensitivity: keeping %d of %d units in full precision: %s", len(kept_units), len(results),
                ", ".join(kept_units) or "none")
    write_sensitivity_report(results, context.stage_dir, config.method)
    return [layer for result in results if result.kept for layer in result.layers], results


def _recover(quantized, teacher, tokenizer, config: QuantizationConfig, context: StageContext, folder):
    """Train LoRA adapters against `teacher` and save them into `folder`, next to the quantized base."""
    from ..train import train_and_record, training_arguments, training_data
    from .recover import add_lora_adapters, recover_with_distillation

    recipe = context.recipe
    adapted = add_lora_adapters(quantized, config.recovery, base_model_name_or_path=recipe.model.name_or_path)
    train, _, collator = training_data(recipe, tokenizer)
    args = training_arguments(recipe, {**config.recovery.training, "remove_unused_columns": False,
                                       "eval_strategy": "no"}, context.checkpoint_dir)
    trainer = recover_with_distillation(adapted, teacher, args, train, collator, tokenizer, config.recovery)
    train_and_record(trainer, context)
    adapted = trainer.model.eval()
    adapted.save_pretrained(folder)  # adapter_config.json + adapter_model.safetensors only; the base is saved
    (folder / "README.md").unlink(missing_ok=True)  # peft's placeholder card; the export writes the real one
    return adapted


@register_stage("quantize", QuantizationConfig)
def quantize_stage(state: ModelState, config: QuantizationConfig, context: StageContext) -> ModelState:
    from ..export.verify import verify_reload
    from ..modeling import ensure_loaded
    from ..pipeline import MODEL_SUBDIR
    from .bnb import quantize, save_quantized

    recipe = context.recipe
    ensure_loaded(state, recipe)
    reference, tokenizer = state.model.eval(), state.tokenizer
    keep, scan = [], None
    if config.sensitivity is not None:
        keep, scan = _sensitivity_keep(reference, tokenizer, config, context)
    quantized, report = quantize(reference, config, keep_modules=keep, work_dir=context.stage_dir)
    folder = context.stage_dir / MODEL_SUBDIR
    # Saved before the model ever runs: a CPU forward pass repacks 4-bit weights in place (see bnb.py).
    save_quantized(quantized, folder, tokenizer)
    model = quantized
    if config.recovery is not None:
        model = _recover(quantized, reference, tokenizer, config, context, folder)
    model.eval()
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


@register_stage("quantize_storage", StorageQuantizationConfig)
def quantize_storage_stage(state: ModelState, config: StorageQuantizationConfig,
                           context: StageContext) -> ModelState:
    from ..distributed import is_main_process
    from ..export.sparse import weights_size_on_disk
    from ..export.verify import verify_reload
    from ..modeling import ensure_loaded
    from ..pipeline import MODEL_SUBDIR
    from .storage import load_stored_weights_, storage_state_dict, write_stored_weights

    ensure_loaded(state, context.recipe)
    model, tokenizer = state.model.eval(), state.tokenizer
    options = dict(linear_bits=config.linear_bits, embedding_bits=config.embedding_bits,
                   group_size=config.group_size, skip=tuple(config.skip_modules))
    full_precision_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    folder = context.stage_dir / MODEL_SUBDIR
    stored_state, report = storage_state_dict(model, **options)  # quantized once: written, then decoded
    if is_main_process():
        write_stored_weights(model, folder, stored_state, report, config.group_size, tokenizer)
    # Then the next stages get what `from_pretrained` gives back. Not before the write: the tied copy of a
    # quantized weight (e.g. lm_head) in `stored_state` is the model's own tensor, which decoding overwrites.
    load_stored_weights_(model, stored_state, config.group_size)
    metrics = {"linear_bits": config.linear_bits, "embedding_bits": config.embedding_bits}
    if is_main_process():
        stored = weights_size_on_disk(folder)
        metrics.update(full_precision_mb=round(full_precision_bytes / 1e6, 2), stored_mb=round(stored / 1e6, 2),
                       stored_ratio=round(stored / full_precision_bytes, 4))
        summary = {"method": "storage", **options, "skip": list(options.pop("skip")), **report.to_dict(),
                   "metrics": metrics}
        for target in (context.stage_dir, folder):
            (target / REPORT_FILE).write_text(json.dumps(summary, indent=2))
        if config.verify:
            check = verify_reload(folder, model, tokenizer, context.recipe.task)
            metrics["reload_max_abs_diff"] = check.max_abs_diff
        logger.info("quantize_storage: %d weights stored quantized (%s), %.1f MB on disk (%.2f x full precision); "
                    "they load back in full precision after `import hf_modelopt`", len(report.formats),
                    ", ".join(sorted(set(report.formats.values()))), metrics["stored_mb"], metrics["stored_ratio"])
    return ModelState(model=model, tokenizer=tokenizer, path=folder, metrics=metrics)
