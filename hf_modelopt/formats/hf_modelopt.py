"""Loading hf-modelopt's own formats with plain `from_pretrained`, after `import hf_modelopt`.

Three things plain transformers cannot express are written into `config.json` as a
`quantization_config` with `quant_method: "hf_modelopt"`, and read back by the quantizer registered
here through transformers' own extension points (`register_quantization_config`, `register_quantizer`):

- `sparse_format: "bitmask"`: pruned Linear weights stored compressed, as the kept values (`W.weight`,
  one dimension) plus a bit per position (`W.weight_bitmask`, packed uint8, row-major). They are
  decompressed to dense tensors while loading; the loaded model is a plain model (the config entry is
  dropped), so it trains and saves like any other.
- `weight_format: "groupwise"` (with `group_size`): Linear and embedding weights stored as 8-bit or NF4 codes
  (`W.weight`) with one fp16 scale per group (`W.weight_scale`), see `groupwise.py`; dequantized to
  full precision while loading, like the bitmask (the two combine: the kept values are quantized).
- `layer_shapes: {module: [out, in]}`: Linear (or GPT-2 Conv1D) layers made smaller by structured pruning
  where the architecture's config cannot say so (BERT derives the head size from hidden_size /
  num_attention_heads, so a layer with fewer heads has no config field), with `attention_heads: {attention
  module: [heads, key/value heads, head size]}`, the head counts its attention modules cache (GPT-2's
  `split_size`, OPT's `num_heads`). Those modules are rebuilt at the recorded shape, and the head counts set,
  before the weights load; the entries stay in the config so the model saves and reloads the same way.
"""

from __future__ import annotations

import copy
import importlib.abc
import importlib.util
import math
import sys
from pathlib import Path

from ..errors import RecipeError, clip, excerpt
from .export_format import (
    ExportFormat,
    quant_method_in_memory,
    save_pretrained_with_tokenizer,
    saved_quant_method,
    transformers_loading_code,
)

QUANT_METHOD = "hf_modelopt"
_TRANSFORMERS_QUANTIZERS = "transformers.quantizers.auto"
_registered = False


def register_when_transformers_loads() -> None:
    """Register the hooks now if transformers' quantizer registry is loaded, else right after it loads.

    `import hf_modelopt` calls this: it must not import transformers itself (importing the package stays
    cheap), yet every `from_pretrained` afterwards must know the formats.
    """
    if _TRANSFORMERS_QUANTIZERS in sys.modules:
        register_loading_hooks()
    elif not any(isinstance(finder, _AfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs `register_loading_hooks` once `transformers.quantizers.auto` has been executed."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _TRANSFORMERS_QUANTIZERS:
            return None
        sys.meta_path.remove(self)  # find the real module with the other finders, once
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            register_loading_hooks()

        spec.loader.exec_module = exec_module
        return spec


def register_loading_hooks() -> None:
    """Teach `from_pretrained` the `hf_modelopt` formats (idempotent; `import hf_modelopt` calls it)."""
    global _registered
    if _registered:
        return
    from transformers.quantizers.auto import (
        AUTO_QUANTIZATION_CONFIG_MAPPING,
        AUTO_QUANTIZER_MAPPING,
        register_quantization_config,
        register_quantizer,
    )

    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(_config_class())
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(_quantizer_class())
    _registered = True


def _config_class():
    from transformers.utils.quantization_config import QuantizationConfigMixin

    class HfModelOptConfig(QuantizationConfigMixin):
        """`quantization_config` of models saved in an hf-modelopt format (see the module docstring)."""

        def __init__(self, sparse_format: str | None = None, layer_shapes: dict | None = None,
                     attention_heads: dict | None = None, weight_format: str | None = None,
                     group_size: int | None = None, **kwargs):
            self.quant_method = QUANT_METHOD
            self.sparse_format = sparse_format
            self.weight_format = weight_format
            self.group_size = group_size
            self.layer_shapes = layer_shapes or {}
            self.attention_heads = attention_heads or {}

        @property
        def dequantize(self) -> bool:
            # Only the compressed storage needs the hook: once decompressed, the model is plain. Layer
            # shapes are part of the architecture, so they stay in the config.
            return not self.layer_shapes

    return HfModelOptConfig


def _quantizer_class():
    from transformers.core_model_loading import ConversionOps
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import get_module_from_name

    class Decompress(ConversionOps):
        def __init__(self, hf_quantizer):
            self.hf_quantizer = hf_quantizer

        def convert(self, input_dict, model=None, full_layer_name=None, **kwargs):
            companions = ("_bitmask", "_scale")
            if set(input_dict) <= {"weight", "weight_bitmask", "weight_scale"}:
                # The general converter: one module's weight (with its bitmask / scale when compressed).
                tensors = {k: v[0] if isinstance(v, list) else v for k, v in input_dict.items()}
                packed, scale, stored = tensors.get("weight_bitmask"), tensors.get("weight_scale"), tensors["weight"]
                if packed is None and scale is None:  # a tensor stored as it is (norms, biases, unpruned layers)
                    return {"weight": stored}
                module, _ = get_module_from_name(model, full_layer_name)
                group_size = self.hf_quantizer.quantization_config.group_size
                from .groupwise import decode_weight

                weight = decode_weight(stored, scale, packed, module.weight.shape, group_size)
                return {"weight": weight.to(module.weight.dtype)}
            # Run before a model's own converter (e.g. the per-expert `experts.*.w1.weight` lists that mixtral merges
            # into the fused `experts.gate_up_proj`): its ops need every source pattern, and its list of tensors per
            # expert, as they came. hf-modelopt's writers store expert weights dense (formats/experts.py), so there
            # is nothing to decode here; a compressed companion would have no shape to decode to, so it fails loudly.
            compressed = [k for k in input_dict if k.endswith(companions)]
            if compressed:
                raise ValueError(f"{full_layer_name}: compressed tensors {compressed} inside a merged (per-expert) "
                                 "weight; hf-modelopt stores expert weights dense and cannot decode these")
            return dict(input_dict)

    class HfModelOptQuantizer(HfQuantizer):
        """Reads hf-modelopt formats at load time; quantizes nothing."""

        requires_calibration = False
        serialized_names = {"weight": ["weight", "weight_bitmask", "weight_scale"]}

        def validate_environment(self, *args, **kwargs):
            return

        def get_load_operations(self):
            if not (self.quantization_config.sparse_format or self.quantization_config.weight_format):
                return {}
            return {"deserialize": Decompress, "dequantize": Decompress}

        def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
            from .modules import resize_linear_, set_attention_heads_

            # Every size below comes from config.json, which anyone can edit: checked against the tensors the
            # checkpoint really holds before a module is rebuilt or a weight decoded at that size.
            stored = StoredShapes(checkpoint_files, model)
            stored.check_layer_shapes(self.quantization_config)
            for name, (out_features, in_features) in self.quantization_config.layer_shapes.items():
                resize_linear_(model, name, out_features, in_features)
            for name, (heads, kv_heads, head_dim) in self.quantization_config.attention_heads.items():
                set_attention_heads_(model.get_submodule(name), heads, kv_heads, head_dim)
            stored.check_stored_weights(self.quantization_config)
            return model

        def _process_model_after_weight_loading(self, model, **kwargs):
            # The weights are dense full-precision tensors now; what stays in the config (layer shapes) must
            # not claim a compressed storage when the model is saved again.
            self.quantization_config.sparse_format = None
            self.quantization_config.weight_format = None
            self.quantization_config.group_size = None
            return model

        def is_serializable(self, *args, **kwargs):
            return True

        @property
        def is_trainable(self):
            return True

        @property
        def is_qat_trainable(self):
            # Nothing is quantized: a structurally pruned model trains like any other (Trainer asks this).
            return True

    return HfModelOptQuantizer


# --------------------------------------------------------------------------- bounds on what a config says


class StoredShapes:
    """The shapes of the tensors in a checkpoint's safetensors files (read from their headers: no tensor data), to
    check the sizes a `quantization_config` states against them before anything is allocated at those sizes.

    A crafted `group_size: 600000000` in a 4 MB export otherwise makes decoding pad every weight to 600 M values
    (gigabytes); a `layer_shapes` entry of [100000, 100000] builds a 40 GB layer. Each refusal is a `UserError`
    naming config.json and the key.
    """

    def __init__(self, checkpoint_files, model):
        self.model = model
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}  # safetensors' names: "I8", "U8", "F32", ...
        self.config_file = "config.json"
        self.prefix = getattr(model, "base_model_prefix", "") or ""
        for file in checkpoint_files or ():
            if not str(file).endswith(".safetensors"):
                continue
            from safetensors import safe_open

            self.config_file = str(Path(file).parent / "config.json")
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    tensor = handle.get_slice(key)
                    self.shapes[key], self.dtypes[key] = tuple(tensor.get_shape()), tensor.get_dtype()

    def _refuse(self, key: str, message: str):
        raise RecipeError(self.config_file, f"quantization_config.{clip(key)}", clip(message, 240))

    def key_of(self, name: str) -> str | None:
        """The checkpoint's key of tensor `name`, whether its keys have the base model's prefix or not."""
        return next((key for key in (name, name.removeprefix(f"{self.prefix}."), f"{self.prefix}.{name}")
                     if key in self.shapes), None)

    def shape(self, name: str) -> tuple[int, ...] | None:
        key = self.key_of(name)
        return None if key is None else self.shapes[key]

    def check_layer_shapes(self, config) -> None:
        if not self.shapes:  # loaded from a state dict or .bin files: nothing to check against
            return
        largest = max(math.prod(shape) for shape in self.shapes.values())
        for name, entry in (config.layer_shapes or {}).items():
            key = f"layer_shapes.{name}"
            if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and all(isinstance(v, int) and v > 0
                                                                                  for v in entry)):
                self._refuse(key, f"expected [out_features, in_features], two positive integers; got {excerpt(entry)}")
            wanted = entry[0] * entry[1]
            dense, bitmask = self.shape(f"{name}.weight"), self.shape(f"{name}.weight_bitmask")
            if dense is None:
                # Checkpoint keys may differ from module names (transformers' key renaming on save, ViT's
                # `encoder.layer` for `layers`): the layer cannot be matched, so its size is bounded by the
                # checkpoint itself. The densest storage is a bitmask, one bit per position.
                if wanted > 8 * largest:
                    self._refuse(key, f"{list(entry)} holds {wanted} values, more than any weight stored in the "
                                 f"checkpoint could describe (the largest tensor holds {largest})")
                continue
            if bitmask is not None:
                ok = math.prod(bitmask) == -(-wanted // 8)  # one bit per position, whole bytes
            elif self.shape(f"{name}.weight_scale") is not None:
                ok = math.prod(dense) in (wanted, -(-wanted // 2))  # int8 codes, or NF4 (two per byte)
            else:
                ok = math.prod(dense) == wanted
            if not ok:
                self._refuse(key, f"{list(entry)} does not match the stored weight ({list(dense)}"
                             + (f", bitmask {list(bitmask)}" if bitmask is not None else "") + ")")

    def check_stored_weights(self, config) -> None:
        """After the layers have their shapes: the stored codes, scales and bitmasks against each module's weight,
        and `group_size` against the number of scales, so that decoding allocates nothing beyond the weight."""
        if not self.shapes or not (config.weight_format or config.sparse_format):
            return
        group_size = config.group_size
        if config.weight_format and (not isinstance(group_size, int) or isinstance(group_size, bool)
                                     or group_size < 1):
            self._refuse("group_size", f"expected a positive integer, got {excerpt(group_size)}")
        names = sorted({key.rsplit(".", 1)[0] for key in self.shapes
                        if key.endswith((".weight_scale", ".weight_bitmask"))})
        if any(self.shape(f"{name}.weight_scale") is not None for name in names):
            if not config.weight_format:
                self._refuse("weight_format", "weights are stored with scales (group-wise codes), but the config "
                             "names no weight_format")
            # Decoding pads each weight to whole groups: a group larger than every weight would allocate
            # group_size values for nothing.
            largest = max((math.prod(shape) for name in names if (shape := self._module_shape(name))), default=0)
            if group_size > largest:
                self._refuse("group_size", f"{group_size} is larger than every stored weight of the model (the "
                             f"largest holds {largest} values)")
        for name in names:
            self._check_weight(name, group_size)

    def _check_weight(self, name: str, group_size) -> None:
        dense_shape = self._module_shape(name)
        if dense_shape is None:
            return  # not a module of this model: transformers reports the unexpected key itself
        positions = math.prod(dense_shape)
        stored, scale, bitmask = (self.shape(f"{name}.{suffix}") for suffix in ("weight", "weight_scale",
                                                                                  "weight_bitmask"))
        what = f"{name}.weight"
        if bitmask is not None and math.prod(bitmask) != -(-positions // 8):
            self._refuse("sparse_format", f"{what}: a bitmask of {math.prod(bitmask)} bytes for a weight of "
                         f"{positions} values (expected {-(-positions // 8)})")
        if stored is None or len(stored) != 1:  # kept values or codes: one dimension
            self._refuse("weight_format" if scale is not None else "sparse_format",
                         f"{what}: stored as {stored and list(stored)}, expected one dimension of values")
        values = math.prod(stored)
        if scale is None:
            if values > positions:
                self._refuse("sparse_format", f"{what}: {values} stored values for {positions} positions")
            return
        # int8 codes hold one value each, NF4 codes (uint8) two per byte, the last one possibly padding.
        nf4 = self.dtypes[self.key_of(f"{name}.weight")] == "U8"
        counts = (2 * values, 2 * values - 1) if nf4 else (values,)
        if not any(count <= positions and -(-count // group_size) == math.prod(scale) for count in counts):
            self._refuse("group_size", f"{group_size} does not fit {what}: {math.prod(scale)} scales for "
                         f"{values} stored codes of a weight of {positions} values")

    def _module_shape(self, name: str) -> tuple[int, ...] | None:
        """The shape of module `name`'s weight in the model being loaded (its config's, or its `layer_shapes`)."""
        for candidate in (name, name.removeprefix(f"{self.prefix}."), f"{self.prefix}.{name}"):
            try:
                return tuple(self.model.get_submodule(candidate).weight.shape)
            except AttributeError:
                continue
        return None


# --------------------------------------------------------------------------- writing


def save_sparse(model, folder, tokenizer=None) -> list[str]:
    """Save `model` to `folder` in the compressed sparse format; returns the compressed module names."""
    from .bitmask import sparse_state_dict

    state, compressed = sparse_state_dict(model)
    save_in_hf_modelopt_format(model, folder, state, {"sparse_format": "bitmask"}, tokenizer)
    return compressed


def save_in_hf_modelopt_format(model, folder, state: dict, entries: dict, tokenizer=None) -> None:
    """`model.save_pretrained(folder, state_dict=state)` with a `quant_method: hf_modelopt` quantization_config
    made of `entries` (plus the layer shapes of a structurally pruned model); the model itself is left as is."""
    original = getattr(model.config, "quantization_config", None)
    model.config.quantization_config = {"quant_method": QUANT_METHOD, **entries, **structured_entries(original)}
    try:
        model.save_pretrained(Path(folder), state_dict=state)
    finally:
        if original is None:
            del model.config.quantization_config
        else:
            model.config.quantization_config = original
    if tokenizer is not None:
        tokenizer.save_pretrained(Path(folder))


def structured_entries(original) -> dict:
    """Keep the layer shapes of a structurally pruned model when it is also saved sparse."""
    if original is None:
        return {}
    entries = original if isinstance(original, dict) else copy.deepcopy(original.__dict__)
    return {k: entries[k] for k in ("layer_shapes", "attention_heads") if entries.get(k)}


def save_with_quantized_storage(model, folder, tokenizer=None, linear_bits: int | None = 8,
                                embedding_bits: int | None = 8, group_size: int = 64,
                                skip: tuple[str, ...] = ()):
    """Save `model` into `folder` with quantized weight storage (loads back with `from_pretrained` after
    `import hf_modelopt`, as the dequantized full-precision model); returns the `StorageReport`."""
    from .groupwise import storage_state_dict

    state, report = storage_state_dict(model, linear_bits, embedding_bits, group_size, skip)
    write_stored_weights(model, folder, state, report, group_size, tokenizer)
    return report


def write_stored_weights(model, folder, state: dict, report, group_size: int, tokenizer=None) -> None:
    """Write a `storage_state_dict` and its `StorageReport` (and `model`'s config, with the format recorded in
    it) into `folder`."""
    from .groupwise import WEIGHT_FORMAT

    entries = {"weight_format": WEIGHT_FORMAT, "group_size": group_size}
    if any(label.endswith("+bitmask") for label in report.formats.values()):
        entries["sparse_format"] = "bitmask"
    save_in_hf_modelopt_format(model, folder, state, entries, tokenizer)


# --------------------------------------------------------------------------- the format's registration


def _loading_code(auto_class: str, target: str, peft_auto_class: str, processor_class: str) -> str:
    return transformers_loading_code(auto_class, target, processor_class,
                                     import_first="import hf_modelopt  # noqa: F401  registers the loading hooks of "
                                                  "this format")


# A model in memory is in this format when structured pruning recorded layer shapes in its config (or it was loaded
# from such a folder): `save_pretrained` writes that config. Sparse and quantized storage are chosen explicitly
# (`save_sparse`, `save_with_quantized_storage`): no model in memory is "in" them.
EXPORT_FORMAT = ExportFormat(
    "hf-modelopt", "hf_modelopt", lambda folder: saved_quant_method(folder) == QUANT_METHOD,
    "hf-modelopt's own storage: sparse weights as values + bitmask, weights stored in 8 / 4 bits, and/or "
    "structurally pruned layer shapes that no config field can describe, read by the hf_modelopt loading hook "
    "(formats/hf_modelopt.py)",
    holds=lambda model: quant_method_in_memory(model) == QUANT_METHOD, write=save_pretrained_with_tokenizer,
    loading_code=_loading_code,
)
