"""`quantize(model, config, calibration=None)`: bitsandbytes quantization with its optional sensitivity scan and
KD recovery, for any model and any training script."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Iterable

from ..compat import require_support
from ..inplace import changes_in_place
from .config import QuantizationConfig

logger = logging.getLogger("hf_modelopt")


def calibration_rows(batches: Iterable[dict], samples: int) -> list[dict]:
    """The first `samples` rows of `batches` (model-input dicts of tensors), in batches as given (the last cut)."""
    taken, count = [], 0
    for batch in batches:
        size = len(next(iter(batch.values())))
        if count + size > samples:
            batch = {k: v[: samples - count] for k, v in batch.items()}
        taken.append(batch)
        count += len(next(iter(batch.values())))
        if count >= samples:
            break
    return taken


def sensitive_layers(model, config: QuantizationConfig, batches: Iterable[dict]):
    """Run the sensitivity scan of `config.sensitivity` on `batches`; returns (layers to keep, scan results)."""
    from .bnb import linear_layers, plan_skips
    from .sensitivity import choose_kept_units, estimated_quantized_size, sensitivity_scan

    scan = config.sensitivity
    skipped = plan_skips(model, config)
    candidates = [name for name in linear_layers(model) if name not in skipped]
    results = sensitivity_scan(model, calibration_rows(batches, scan.calibration_samples), config.method,
                               candidates, scan.granularity)
    size = estimated_quantized_size(model, set(skipped), config.method, config.double_quant)
    kept_units = choose_kept_units(results, size, config.method, config.double_quant,
                                   max_size_mb=scan.max_size_mb, keep_fraction=scan.keep_fraction)
    logger.info("sensitivity: keeping %d of %d units in full precision: %s", len(kept_units), len(results),
                ", ".join(kept_units) or "none")
    return [layer for result in results if result.kept for layer in result.layers], results


class _Batches:
    """A list of ready batches as a dataset of one batch per item (for Trainer with batch size 1)."""

    def __init__(self, batches):
        self.batches = list(batches)

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, index):
        return self.batches[index]


def _first(items):
    return items[0]


def recovery_trainer(quantized, teacher, config: QuantizationConfig, calibration, training_args=None,
                     base_model_name_or_path: str | None = None, work_dir=None):
    """A `DistillationTrainer` for LoRA adapters on `quantized` against `teacher` over the calibration data.

    A `DataLoader` trains on its dataset and collator (Trainer batches and shuffles it); any other iterable of
    batches trains on those batches as they are, one per step.
    """
    from torch.utils.data import DataLoader
    from transformers import TrainingArguments

    from .recover import add_lora_adapters, recover_with_distillation

    adapted = add_lora_adapters(quantized, config.recovery, base_model_name_or_path=base_model_name_or_path)
    settings = {"report_to": "none", "save_strategy": "no", **config.recovery.training,
                "remove_unused_columns": False}
    if isinstance(calibration, DataLoader):
        dataset, collator = calibration.dataset, calibration.collate_fn
        settings.setdefault("per_device_train_batch_size", calibration.batch_size)
    else:
        dataset, collator = _Batches(calibration), _first
        if settings.get("per_device_train_batch_size", 1) != 1:
            logger.warning("recovery: calibration is a list of ready batches; per_device_train_batch_size is ignored")
        settings["per_device_train_batch_size"] = 1
    if training_args is None:
        import torch

        settings.setdefault("use_cpu", not torch.cuda.is_available())
        training_args = TrainingArguments(output_dir=str(work_dir or tempfile.mkdtemp(prefix="hf-modelopt-")),
                                          **settings)
    return recover_with_distillation(adapted, teacher, training_args, dataset, collator, None, config.recovery)


@changes_in_place
def quantize(model, config: QuantizationConfig, calibration: Iterable[dict] | None = None, *, training_args=None,
             run_training: Callable | None = None, work_dir=None):
    """A bitsandbytes-quantized copy of `model` as `config` says (the input model is not changed).

    - `config.sensitivity`: quantize one unit at a time on the first `calibration_samples` rows of
      `calibration` and keep the most sensitive units in full precision.
    - `config.recovery`: train LoRA adapters on the quantized model to reproduce `model`'s logits over
      `calibration` (QLoRA-style KD); the result is then a peft model.

    Args:
        calibration: model inputs (dicts of tensors, with `labels`), e.g. a `DataLoader` over training data;
            needed by the scan and the recovery only.
        training_args: `TrainingArguments` of the recovery (default: `config.recovery.training`, no checkpoints).
        run_training: runs the recovery trainer (default: `trainer.train()`); the recipe runner passes its own,
            which saves checkpoints and stops cleanly on signals.
        work_dir: folder for the scratch copy quantization goes through (default: the system's temp folder).

    The report (`QuantizationReport`: layers quantized, kept and why, footprints) is `model.quantization_report`
    of the result, and the scan's results `model.sensitivity_results` (None without a scan). Save the result with
    `save_compressed`: on CPU, bitsandbytes repacks 4-bit weights in place on the first forward pass, so the state
    from before that pass is kept and written.

    Example:
        quantized = quantize(model, QuantizationConfig(method="nf4"))
        save_compressed(quantized, "out/")
    """
    from ..extras import require_extra
    from .bnb import quantize_with_bitsandbytes

    # Every package it will need, before the scan or the quantization starts.
    require_extra("quantize()", "bitsandbytes")
    if config.recovery is not None:
        require_extra("QuantizationConfig.recovery (LoRA adapters)", "peft")
    needs_data = [part for part, value in (("sensitivity", config.sensitivity), ("recovery", config.recovery))
                  if value is not None]
    require_support("quantization with calibration" if needs_data else "quantization", model)
    if needs_data and calibration is None:
        raise ValueError(f"QuantizationConfig.{needs_data[0]} runs on data: pass calibration= (model-input "
                         "batches with labels, e.g. a DataLoader over training data)")
    model = model.eval()
    keep, scan = [], None
    if config.sensitivity is not None:
        keep, scan = sensitive_layers(model, config, calibration)
    quantized, report = quantize_with_bitsandbytes(model, config, keep_modules=keep, work_dir=work_dir)
    result = quantized
    if config.recovery is not None:
        trainer = recovery_trainer(quantized, model, config, calibration, training_args,
                                   getattr(model.config, "_name_or_path", None), work_dir)
        (run_training or (lambda t: t.train()))(trainer)
        result = trainer.model.eval()
    result.quantization_report = report
    result.sensitivity_results = scan
    return result
