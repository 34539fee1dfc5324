"""Where the transformer blocks of any model are: one stack for encoders and decoders, two for encoder-decoders
(T5, BART), one per tower for composite models whose layer counts live in sub-configs (`text_config`,
`vision_config`).

Every technique finds blocks here (pruning selects their Linears, one-shot calibration runs them in order, students
keep some of them) and so does the support check (`compat`), so what is supported is what the work will find.

Inside a block: `LAYOUTS`, where the attention and FFN projections of each model type's blocks are (`BlockLayout`),
which structured pruning, Minitron and the support check read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Config attributes that count a stack of blocks; the side-specific ones are tried first for a stack whose
# path names that side (T5: num_layers / num_decoder_layers, BART: encoder_layers / decoder_layers).
ENCODER_COUNT_KEYS = ("encoder_layers", "num_layers")
DECODER_COUNT_KEYS = ("decoder_layers", "num_decoder_layers")
COUNT_KEYS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers")
# A sub-config is preferred for a stack whose path names its tower (`language_model.layers` -> text_config).
_TOWER_WORDS = {"text_config": ("text", "language"), "vision_config": ("vision", "visual"),
                "audio_config": ("audio",)}


@dataclass(frozen=True)
class LayerStack:
    """One stack of transformer blocks and the config attribute that counts it."""

    path: str  # module path of the ModuleList, e.g. "encoder.block"
    layers: torch.nn.ModuleList
    config_name: str  # "" for model.config, else the sub-config attribute holding the count ("text_config")
    count_key: str  # the attribute of that config that equals len(layers), e.g. "num_decoder_layers"

    @property
    def is_decoder(self) -> bool:
        """The decoder stack of an encoder-decoder (chosen with `decoder_layers`)."""
        return self.count_key in DECODER_COUNT_KEYS

    def config_of(self, config):
        return getattr(config, self.config_name) if self.config_name else config


def _configs(config) -> list[tuple[str, object]]:
    found = [("", config)]
    for name in getattr(config, "sub_configs", None) or {}:
        sub = getattr(config, name, None)
        if sub is not None and not isinstance(sub, dict):
            found.append((name, sub))
    return found


def _count_key(config, keys, count: int) -> str | None:
    for key in keys:
        try:
            value = getattr(config, key)
        except AttributeError:
            continue
        if isinstance(value, int) and value == count:
            return key
    return None


def _match_stack(path: str, count: int, configs) -> tuple[str, str] | None:
    """(config name, count key) of the config attribute counting a ModuleList of `count` at `path`."""
    words = path.lower().split(".")
    keys = COUNT_KEYS
    if any("decoder" in w for w in words[-2:]):
        keys = DECODER_COUNT_KEYS + COUNT_KEYS
    elif any("encoder" in w for w in words[-2:]):
        keys = ENCODER_COUNT_KEYS + COUNT_KEYS
    def preference(item):  # the sub-config named by the path, then the top config, then any other
        name = item[0]
        named = any(word in path.lower() for word in _TOWER_WORDS.get(name, (name.removesuffix("_config"),)))
        return 0 if name and named else 1 if not name else 2

    for name, config in sorted(configs, key=preference):
        key = _count_key(config, keys, count)
        if key is not None:
            return name, key
    return None


def layer_stacks(model) -> list[LayerStack]:
    """Every stack of transformer blocks of `model`, in module order (an encoder-decoder's encoder first).

    A stack is a ModuleList of same-class blocks whose length a layer-count attribute of the config (or of a
    sub-config such as `text_config`) states; ModuleLists inside a block (T5's `layer`) are not stacks.
    """
    configs = _configs(model.config)
    stacks: list[LayerStack] = []
    for name, module in model.named_modules():
        if not name or not isinstance(module, torch.nn.ModuleList) or len(module) == 0:
            continue
        if any(name.startswith(stack.path + ".") for stack in stacks):
            continue
        if len({type(block) for block in module}) != 1:
            continue
        match = _match_stack(name, len(module), configs)
        if match is not None:
            stacks.append(LayerStack(name, module, *match))
    return stacks


def transformer_layers(model) -> tuple[str, torch.nn.ModuleList]:
    """The name and the ModuleList of the transformer blocks of a single-stack model (BERT, GPT-2, Llama, ViT).

    Encoder-decoders and composite models have several stacks: use `layer_stacks(model)` for them.
    """
    stacks = layer_stacks(model)
    if len(stacks) == 1:
        return stacks[0].path, stacks[0].layers
    if not stacks:
        raise ValueError(f"{type(model).__name__}: no ModuleList of transformer blocks whose length a layer-count "
                         f"config attribute ({', '.join(COUNT_KEYS + DECODER_COUNT_KEYS)}) states")
    raise ValueError(f"{type(model).__name__} has {len(stacks)} layer stacks ({', '.join(s.path for s in stacks)}): "
                     "use hf_modelopt.distill.student.layer_stacks(model) instead of transformer_layers")


# --------------------------------------------------------------------------- inside a block


@dataclass(frozen=True)
class BlockLayout:
    """Where a block's attention and FFN projections are, relative to the block, and what the config can say."""

    attention: str  # the attention module (its cached head counts are updated)
    query: str | None  # separate projections (None: `fused_qkv`)
    key: str | None
    value: str | None
    out: str  # its columns are the heads
    ffn_in: tuple[str, ...]  # their rows are the neurons (the block's own: T5's wi, or wi_0 and wi_1 when gated)
    ffn_out: str  # its columns are the neurons
    ffn_config_key: str  # the config attribute stating the FFN width
    # the config attribute of an explicit head size that every projection follows (None: derived)
    head_size_config_key: str | None = None
    fused_qkv: str | None = None  # one projection for queries, keys and values
    fused_per_head: bool = False  # fused rows are [q_h, k_h, v_h] per head (GPT-NeoX); else [q | k | v] (GPT-2)
    head_rows_extra: tuple[str, ...] = ()  # more projections with a row block per head, if the block has them
    heads_config_key: str | None = None  # the stack's own head count (BART's encoder/decoder_attention_heads)
    # a module of the stack's first block whose columns are the heads, used by every block of the stack (T5's
    # relative attention bias): all blocks of the stack keep the same heads
    shared_head_bias: str | None = None


def _bert_like(prefix: str, query: str, key: str, value: str, extra: tuple[str, ...] = ()) -> BlockLayout:
    return BlockLayout(prefix, f"{prefix}.{query}", f"{prefix}.{key}", f"{prefix}.{value}", "attention.output.dense",
                       ("intermediate.dense",), "output.dense", "intermediate_size",
                       head_rows_extra=tuple(f"{prefix}.{name}" for name in extra))


BERT_LAYOUT = _bert_like("attention.self", "query", "key", "value")
# DeBERTa's relative-position projections (when keys are not shared with content) have a row block per head
# too. (Its config's `attention_head_size` sizes q/k/v but not the output projection, which stays
# hidden_size x hidden_size: fewer heads go into the layer shapes.)
DEBERTA_V2_LAYOUT = _bert_like("attention.self", "query_proj", "key_proj", "value_proj",
                               extra=("pos_key_proj", "pos_query_proj"))
DISTILBERT_LAYOUT = BlockLayout("attention", "attention.q_lin", "attention.k_lin", "attention.v_lin",
                                "attention.out_lin", ("ffn.lin1",), "ffn.lin2", "hidden_dim")
LLAMA_LAYOUT = BlockLayout("self_attn", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                           "self_attn.o_proj", ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj",
                           "intermediate_size", "head_dim")
PHI_LAYOUT = BlockLayout("self_attn", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense",
                         ("mlp.fc1",), "mlp.fc2", "intermediate_size", "head_dim")
VIT_LAYOUT = BlockLayout("attention", "attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj",
                         ("mlp.fc1",), "mlp.fc2", "intermediate_size", "head_dim")
OPT_LAYOUT = BlockLayout("self_attn", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                         "self_attn.out_proj", ("fc1",), "fc2", "ffn_dim")
GPT2_LAYOUT = BlockLayout("attn", None, None, None, "attn.c_proj", ("mlp.c_fc",), "mlp.c_proj", "n_inner",
                          fused_qkv="attn.c_attn")
GPT_NEOX_LAYOUT = BlockLayout("attention", None, None, None, "attention.dense", ("mlp.dense_h_to_4h",),
                              "mlp.dense_4h_to_h", "intermediate_size", fused_qkv="attention.query_key_value",
                              fused_per_head=True)
# BART: self-attention heads and FFN neurons of both stacks; the decoder's cross-attention keeps its heads.
BART_LAYOUTS = tuple(BlockLayout("self_attn", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                 "self_attn.out_proj", ("fc1",), "fc2", f"{side}_ffn_dim",
                                 heads_config_key=f"{side}_attention_heads") for side in ("encoder", "decoder"))
# T5: self-attention heads (the same in every block of a stack: block 0's relative attention bias serves them
# all) and FFN neurons of both stacks; the decoder's cross-attention keeps its heads.
T5_LAYOUTS = tuple(BlockLayout("layer.0.SelfAttention", "layer.0.SelfAttention.q", "layer.0.SelfAttention.k",
                               "layer.0.SelfAttention.v", "layer.0.SelfAttention.o",
                               tuple(f"layer.{ff}.DenseReluDense.{name}" for name in ("wi", "wi_0", "wi_1")),
                               f"layer.{ff}.DenseReluDense.wo", "d_ff", heads_config_key="num_heads",
                               shared_head_bias="layer.0.SelfAttention.relative_attention_bias")
                   for ff in (1, 2))
# model_type -> layout (a tuple: one per layer stack, encoder first): the model types structured pruning
# supports (nothing else decides it: `compat` and `prune.structured` both read this table).
LAYOUTS = {"bert": BERT_LAYOUT, "roberta": BERT_LAYOUT, "xlm-roberta": BERT_LAYOUT, "electra": BERT_LAYOUT,
           "deberta-v2": DEBERTA_V2_LAYOUT, "distilbert": DISTILBERT_LAYOUT, "vit": VIT_LAYOUT,
           "gpt2": GPT2_LAYOUT, "opt": OPT_LAYOUT, "gpt_neox": GPT_NEOX_LAYOUT, "phi": PHI_LAYOUT,
           "llama": LLAMA_LAYOUT, "mistral": LLAMA_LAYOUT, "qwen2": LLAMA_LAYOUT, "qwen3": LLAMA_LAYOUT,
           "bart": BART_LAYOUTS, "t5": T5_LAYOUTS}
