"""bitsandbytes' own checkpoint (8-bit / 4-bit weights; plain transformers loads it, bitsandbytes installed), written
so that it cannot corrupt a model.

On CPU, bitsandbytes (0.50) repacks each 4-bit weight in place on the first forward pass
(`bitsandbytes.functional._convert_weight_packed_for_cpu`), and the inverse applied when saving is only "best
effort" (it leaves the scales of non-double-quantized weights transposed): a model saved after a forward pass
reloads as garbage. So whoever quantizes keeps the quantized state dict from before any forward pass
(`keep_pristine_state`, which `quant.quantize` calls), `save_bitsandbytes` writes that state once the model has
run, and refuses a repacked model that has none (a 4-bit checkpoint loaded from disk, then run).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from .export_format import ExportFormat, quant_method_in_memory, saved_quant_method

QUANT_METHOD = "bitsandbytes"
# Attribute of a quantized model holding its state dict from before its first forward pass (`keep_pristine_state`).
_PRISTINE_STATE = "_hf_modelopt_pristine_state"


class RepackedWeightsError(UserError):
    """A 4-bit model that ran on CPU, with no state from before: bitsandbytes cannot save it faithfully."""


def keep_pristine_state(model) -> dict:
    """Keep `model`'s state dict as it is now, before any forward pass, for `save_bitsandbytes` to write later.

    Call it right after quantizing (4-bit: an eighth of the full-precision size). The weights are frozen, so it
    stays the model's true state. Returns the kept state dict."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    setattr(model, _PRISTINE_STATE, state)
    return state


def pristine_state(model) -> dict | None:
    """The state dict `keep_pristine_state` kept for `model`, or None."""
    return getattr(model, _PRISTINE_STATE, None)


def repacked_layers(model) -> list[str]:
    """Names of 4-bit layers whose weights bitsandbytes repacked in place for its CPU kernel (after a forward)."""
    names = []
    for name, module in model.named_modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            names.append(name)
    return names


def check_savable(model) -> None:
    """Refuse to save a model whose 4-bit weights were repacked by a CPU forward pass: it would reload as garbage
    (unless `keep_pristine_state` kept its state from before the repacking)."""
    repacked = repacked_layers(model)
    if repacked and pristine_state(model) is None:
        raise RepackedWeightsError(
            f"{len(repacked)} 4-bit layers (first: {repacked[0]}) were repacked in place by a CPU forward pass; "
            "bitsandbytes cannot save them faithfully. Save the quantized model before running it "
            "(hf_modelopt.save_compressed right after quantize), or quantize again and save first."
        )


def written_tensors(model, state_dict: dict) -> dict:
    """The tensors of `state_dict` that saving `model` writes: tied weights once. Which keys are tied is read from
    the model's live tensors (a copied state dict, such as the pristine state, no longer shares their storage)."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    live = dict(model.state_dict())
    tied = set(live) - set(remove_tied_weights_from_state_dict(dict(live), model))
    return {key: tensor for key, tensor in state_dict.items() if key not in tied}


def save_bitsandbytes(model, folder, tokenizer=None, state_dict: dict | None = None) -> Path:
    """Save a quantized model (safetensors) and its tokenizer, as it was before any CPU forward pass (see above).

    `state_dict` replaces the model's own tensors (the base of a model with adapters passes its tensors alone).
    A model bitsandbytes never touched is saved as `save_pretrained` saves it.
    """
    check_savable(model)
    folder = Path(folder)
    pristine = pristine_state(model)
    if state_dict is None and pristine is not None and repacked_layers(model):
        state_dict = pristine
    model.save_pretrained(folder)  # config (with its quantization_config), generation config, weights
    if state_dict is not None:
        # save_pretrained writes a quantized model's live tensors whatever `state_dict=` says (transformers asks
        # the quantizer, which returns the model's own): write the given ones in their place.
        from safetensors.torch import save_file

        for written in folder.glob("model*.safetensors*"):
            written.unlink()  # (a file save_pretrained just wrote into `folder`)
        tensors = written_tensors(model, state_dict)
        save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors",
                  metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def _write(model, folder: Path, tokenizer=None) -> None:
    save_bitsandbytes(model, folder, tokenizer)


EXPORT_FORMAT = ExportFormat(
    "bitsandbytes", "transformers", lambda folder: saved_quant_method(folder) == QUANT_METHOD,
    "bitsandbytes 8-bit / 4-bit weights (needs bitsandbytes installed)", requires=("bitsandbytes",),
    holds=lambda model: quant_method_in_memory(model) == QUANT_METHOD, write=_write,
)
