"""peft LoRA adapters: a folder with the adapters alone (`peft-adapter`, loaded with peft's `AutoPeftModelFor...`,
which fetches the base model named in `adapter_config.json`), or with its base model beside them
(`base-with-adapter`: the quantize stage's KD recovery; transformers loads the base from the folder itself and
attaches the adapters, where peft's AutoPeftModel would fetch the adapter config's original base instead).

A peft model in memory is written as base + adapters: the base as bitsandbytes' writer saves it (from its state
before any CPU forward pass, when `quantize` kept one), then the adapters beside it.
"""

from __future__ import annotations

from pathlib import Path

from .export_format import ExportFormat


def is_peft_model(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def write_base_with_adapter(model, folder: Path, tokenizer=None) -> None:
    from .bitsandbytes import pristine_state, save_bitsandbytes

    folder = Path(folder)
    base = model.get_base_model()
    # The base as `quantize` made it, before adapters wrapped its layers and before any forward pass; else (a user's
    # own adapters) its tensors under their unwrapped names.
    state = pristine_state(base) or {
        k.replace(".base_layer.", "."): v for k, v in base.state_dict().items() if ".lora_" not in k}
    save_bitsandbytes(base, folder, tokenizer, state_dict=state)
    model.save_pretrained(folder)  # adapter_config.json + adapter_model.safetensors beside it
    readme = folder / "README.md"  # peft's placeholder card, which this call just wrote; the export writes the real one
    if readme.is_file() and not readme.is_symlink():
        readme.unlink()


def _peft_loading_code(auto_class: str, target: str, peft_auto_class: str, processor_class: str) -> str:
    return "\n".join([f"from peft import {peft_auto_class}", f"from transformers import {processor_class}", "",
                      f"model = {peft_auto_class}.from_pretrained({target})  # also fetches the base model",
                      f"{'tokenizer' if processor_class == 'AutoTokenizer' else 'processor'} = "
                      f"{processor_class}.from_pretrained({target})"])


BASE_WITH_ADAPTER = ExportFormat(
    "base-with-adapter", "transformers",
    lambda folder: (Path(folder) / "adapter_config.json").is_file() and (Path(folder) / "config.json").is_file(),
    "a (bitsandbytes-quantized) base model with peft LoRA adapters in the same folder; transformers loads both "
    "(needs peft installed)",
    holds=is_peft_model, write=write_base_with_adapter,
)
PEFT_ADAPTER = ExportFormat(
    "peft-adapter", "peft", lambda folder: (Path(folder) / "adapter_config.json").is_file(),
    "a peft adapter over the base model named in adapter_config.json",
    loading_code=_peft_loading_code,
)

