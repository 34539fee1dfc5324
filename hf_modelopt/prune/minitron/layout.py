"""Which decoder families Minitron pruning supports, and where their norms and embeddings are: declared once.

The attention and FFN projections of a block come from `blocks.LAYOUTS` (the one declaration of a
block's layout); this table adds what hidden-size and depth pruning also touch. A family is here only when
pruning it to any uniform shape leaves a config that plain `from_pretrained` builds to the same function:
"""

from __future__ import annotations

from dataclasses import dataclass

from ...blocks import LAYOUTS, BlockLayout
from ...compat import UnsupportedModelError, model_type, unwrapped


@dataclass(frozen=True)
class DecoderLayout:
    """A causal LM's modules outside the blocks, and each block's norms over the hidden channels."""

    layers: str = "model.layers"
    embeddings: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    block_norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    attention: str = "self_attn"  # its `layer_idx` is renumbered when blocks go


LLAMA_DECODER = DecoderLayout()
# model_type -> layout: what Minitron pruning supports (qwen3's q_norm / k_norm act on head_dim, which is kept).
DECODER_LAYOUTS = {"llama": LLAMA_DECODER, "mistral": LLAMA_DECODER, "qwen2": LLAMA_DECODER, "qwen3": LLAMA_DECODER}

# Families checked and refused, with the reason (a row moves to DECODER_LAYOUTS when the reason is solved).
REFUSED = {
    "gemma": "its embeddings are multiplied by sqrt(hidden_size) and tied to the LM head, so a smaller hidden size "
             "would change every logit",
    "gemma2": "its embeddings are multiplied by sqrt(hidden_size) and tied to the LM head, so a smaller hidden "
              "size would change every logit",
    "phi3": "its fused qkv_proj / gate_up_proj have no block layout in blocks.LAYOUTS",
    "olmo2": "its q_norm / k_norm normalise over all heads together, so removing heads would change the "
             "remaining heads' outputs",
    "granite": "its block layout (Llama's) is not yet declared in blocks.LAYOUTS",
}


def decoder_layout(model) -> tuple[DecoderLayout, BlockLayout]:
    """The layouts of a supported causal LM; `UnsupportedModelError` (one line) for anything else."""
    model = unwrapped(model)
    kind = model_type(model)
    supported = ", ".join(sorted(DECODER_LAYOUTS))
    why = None
    if kind in REFUSED:
        why = REFUSED[kind]
    elif kind not in DECODER_LAYOUTS:
        why = "it supports the decoder LLM families whose layout it knows"
    elif not hasattr(model, DECODER_LAYOUTS[kind].lm_head):
        why = f"it scores and prunes causal LMs (with an LM head); {type(model).__name__} has none"
    if why is not None:
        raise UnsupportedModelError(f"Minitron pruning does not support model_type {kind!r} ({type(model).__name__}): "
                                    f"{why}; supported: {supported}")
    return DECODER_LAYOUTS[kind], LAYOUTS[kind]
