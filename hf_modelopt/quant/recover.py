"""KD recovery of a quantized model (QLoRA-style quantization-aware distillation).

LoRA adapters (peft) are added to the frozen 4-bit model and trained with `DistillationTrainer` to
reproduce the full-precision model's logits (the teacher). The adapters are saved next to the quantized
base in one folder: `AutoModelFor...from_pretrained(folder)` (with peft installed) loads the 4-bit base from
the folder's `config.json` / `model.safetensors` and applies `adapter_model.safetensors` on top.

LoRA: Hu et al. 2021, https://arxiv.org/abs/2106.09685; QLoRA: Dettmers et al. 2023,
https://arxiv.org/abs/2305.14314.
"""

from __future__ import annotations

import logging

from .config import RecoveryConfig

logger = logging.getLogger("hf_modelopt")


def add_lora_adapters(quantized_model, config: RecoveryConfig, base_model_name_or_path: str | None = None):
    """Wrap `quantized_model` in a `PeftModel` with trainable LoRA adapters; the base stays frozen."""
    from ..extras import require_extra

    require_extra("LoRA recovery", "peft")
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=config.target_modules,
        # Classification heads stay in full precision and are not trained: the adapters do the recovering.
        task_type=None,
    )
    model = get_peft_model(quantized_model, lora)
    if base_model_name_or_path is not None:
        model.peft_config["default"].base_model_name_or_path = base_model_name_or_path
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("recovery: LoRA rank %d on %s, %s trainable parameters", config.rank,
                config.target_modules, f"{trainable:,}")
    return model


def recover_with_distillation(adapted_model, teacher, args, train_dataset, data_collator, tokenizer,
                              config: RecoveryConfig):
    """Train the adapters of `adapted_model` against `teacher`'s logits; returns the `DistillationTrainer`."""
    from ..distill.config import DistillationConfig
    from ..distill.trainer import DistillationTrainer

    distillation = DistillationConfig(temperature=config.temperature, kd_weight=config.kd_weight,
                                      ce_weight=config.ce_weight)
    return DistillationTrainer(
        model=adapted_model,
        teacher=teacher,
        distillation=distillation,
        args=args,
        train_dataset=train_dataset,
        data_collator=data_collator,
        processing_class=tokenizer,
    )
