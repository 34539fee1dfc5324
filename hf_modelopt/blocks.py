"""Where the transformer blocks of any model are: one stack for encoders and decoders, two for encoder-decoders
(T5, BART), one per tower for composite models whose layer counts live in sub-configs (`text_config`,
`vision_config`).

Every technique finds blocks here (pruning selects their Linears, one-shot calibration runs them in order, students
keep some of them) and so does the support check (`compat`), so what is supported is what the work will find.
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
