"""Shared builders of the behaviour matrix: each architecture's tiny random model with its natural head, and
inputs for it.

Models are built from `tests/conftest.py`'s `TINY_CONFIGS` once per session (`tiny_model` caches the built
model and hands out deep copies, so a test may change its copy freely). `WIDE` models scale every width of the
tiny config to 64 / 128, as bitsandbytes' 4-bit CPU kernels need (64 input features, multiples of 32 out).
"""

from __future__ import annotations

import copy
import functools

import torch

from tests.conftest import ARCHITECTURES, DECODERS, ENCODER_DECODERS, ENCODERS, TASK_AUTO_CLASSES, TINY_CONFIGS, VISION

# The families issue 30 added to the matrix, beyond conftest's ARCHITECTURES: mixture-of-experts (fused 3-D experts),
# mixed attention (`layer_types`), shared layers (ALBERT), stages (Swin) and Linear subclasses (Falcon). Their
# tiny configs and families live here; `MATRIX_ARCHITECTURES` is every row of docs/architectures.md.
NEW_FAMILY_CONFIGS = {
    "mixtral": ("decoder", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("decoder", dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
                                  shared_expert_intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, num_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": ("decoder", dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4,
                                  num_experts_per_tok=2)),
    "gemma2": ("decoder", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=8, sliding_window=4)),
    "gemma3_text": ("decoder", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=8, sliding_window=4,
                                    layer_types=["sliding_attention", "full_attention"])),
    "modernbert": ("encoder", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                   local_attention=4, bos_token_id=1, eos_token_id=2, cls_token_id=1,
                                   sep_token_id=2)),
    "falcon": ("decoder", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2)),
    "albert": ("encoder", dict(hidden_size=32, embedding_size=16, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64)),
    "swin": ("vision", dict(image_size=32, patch_size=4, num_channels=3, embed_dim=16, depths=[1, 1],
                            num_heads=[1, 2], window_size=4)),
}
NEW_FAMILIES = tuple(NEW_FAMILY_CONFIGS)
MATRIX_ARCHITECTURES = ARCHITECTURES + NEW_FAMILIES

# A small vocabulary keeps the embeddings and LM heads (and so every step) small; inputs are random ids.
VOCAB_SIZE = 512
BATCH, SEQUENCE = 2, 8

# model width keys -> 64, FFN width keys -> 128, per-head width keys -> 16 (see `wide_config_kwargs`)
_MODEL_WIDTHS = ("hidden_size", "dim", "n_embd", "d_model", "embedding_size", "word_embed_proj_dim", "embed_dim")
_FFN_WIDTHS = ("intermediate_size", "hidden_dim", "ffn_dim", "d_ff", "encoder_ffn_dim", "decoder_ffn_dim")
_HEAD_WIDTHS = ("head_dim", "d_kv")


def family(model_type: str) -> str:
    """'encoder', 'decoder', 'encoder-decoder' or 'vision'."""
    if model_type in NEW_FAMILY_CONFIGS:
        return NEW_FAMILY_CONFIGS[model_type][0]
    for name, members in (("encoder", ENCODERS), ("decoder", DECODERS), ("encoder-decoder", ENCODER_DECODERS),
                          ("vision", VISION)):
        if model_type in members:
            return name
    raise KeyError(model_type)


def natural_task(model_type: str) -> str:
    """The task of each architecture's natural head (a key of conftest's `TASK_AUTO_CLASSES`)."""
    return {"encoder": "text-classification", "decoder": "causal-lm", "encoder-decoder": "seq2seq",
            "vision": "image-classification"}[family(model_type)]


def wide_config_kwargs(model_type: str) -> dict:
    """The tiny config of `model_type` with its widths raised to what bitsandbytes' 4-bit CPU kernels take."""
    kwargs = dict(_tiny_config_kwargs(model_type))
    for key in kwargs:
        if key in _MODEL_WIDTHS:
            kwargs[key] = 64
        elif key in _FFN_WIDTHS:
            kwargs[key] = 128
        elif key in _HEAD_WIDTHS:
            kwargs[key] = 16
    return kwargs


def _tiny_config_kwargs(model_type: str) -> dict:
    return NEW_FAMILY_CONFIGS[model_type][1] if model_type in NEW_FAMILY_CONFIGS else TINY_CONFIGS[model_type]


@functools.cache
def _built(model_type: str, wide: bool):
    import transformers

    kwargs = wide_config_kwargs(model_type) if wide else dict(_tiny_config_kwargs(model_type))
    if family(model_type) != "vision":
        kwargs.update(vocab_size=VOCAB_SIZE, pad_token_id=0)
        defaults = transformers.AutoConfig.for_model(model_type)
        for key in ("bos_token_id", "eos_token_id", "decoder_start_token_id"):  # GPT-2's 50256: past the vocab
            if isinstance(getattr(defaults, key, None), int) and getattr(defaults, key) >= VOCAB_SIZE:
                kwargs[key] = 2
    config = transformers.AutoConfig.for_model(model_type, **kwargs)
    task = natural_task(model_type)
    if task in ("text-classification", "image-classification"):
        config.num_labels = 2
    torch.manual_seed(0)
    model = getattr(transformers, TASK_AUTO_CLASSES[task]).from_config(config)
    return model.eval()


def tiny_model(model_type: str, wide: bool = False):
    """A fresh copy of the session's tiny random `model_type` with its natural head (built once, then copied)."""
    return copy.deepcopy(_built(model_type, wide))


def model_inputs(model_type: str, labels: bool = True, seed: int = 0, batch: int = BATCH) -> dict:
    """A batch for `model_type`'s natural head; `labels=False` leaves them out (for logits only)."""
    generator = torch.Generator().manual_seed(seed)
    kind = family(model_type)
    if kind == "vision":
        inputs = {"pixel_values": torch.randn(batch, 3, 32, 32, generator=generator)}
        if labels:
            inputs["labels"] = torch.randint(0, 2, (batch,), generator=generator)
        return inputs
    ids = torch.randint(5, VOCAB_SIZE, (batch, SEQUENCE), generator=generator)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if kind == "encoder":
        if labels:
            inputs["labels"] = torch.randint(0, 2, (batch,), generator=generator)
    elif kind == "decoder":
        if labels:
            inputs["labels"] = ids.clone()
    else:  # encoder-decoder: the decoder reads its own tokens (shifted labels when training)
        targets = torch.randint(5, VOCAB_SIZE, (batch, SEQUENCE), generator=generator)
        if labels:
            inputs["labels"] = targets
        else:
            inputs["decoder_input_ids"] = targets
    return inputs


def logits_of(model, model_type: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**model_inputs(model_type, labels=False, seed=1)).logits


def state_snapshot(model) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def assert_state_unchanged(model, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert list(after) == list(before), "the refused call changed the model's modules"
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), f"the refused call changed {name}"


__all__ = ["ARCHITECTURES", "MATRIX_ARCHITECTURES", "NEW_FAMILIES", "tiny_model", "model_inputs", "logits_of",
           "natural_task", "family", "state_snapshot", "assert_state_unchanged", "wide_config_kwargs"]
