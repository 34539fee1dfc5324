"""Loading models and tokenizers for a task, from the Hub, a local folder or a GGUF file."""

from __future__ import annotations

import logging
import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

logger = logging.getLogger("hf_modelopt")


class ModelConfig(BaseModel):
    """Which model to load, and how (the recipe's `model:`)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    name_or_path: str = Field(description="Hub model id (ORG/NAME) or a local folder.")
    gguf_file: str | None = Field(
        None, description="GGUF file inside the repository or folder; its weights are dequantized to fp32."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    tokenizer: str | None = Field(None, description="Tokenizer id or folder; defaults to `name_or_path`.")
    trust_remote_code: bool = Field(
        False, description="Run code shipped with the model. Off unless you trust its author."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype the weights are loaded in (`from_pretrained(dtype=...)`): `auto` keeps the "
        "checkpoint's own (its config's `dtype`, else float32). Stage outputs load back in the same dtype.",
    )
    device_map: str | dict[str, int | str] | None = Field(
        None, description="Where the model's modules go (`from_pretrained(device_map=...)`): `auto`, `cpu`, "
        "`cuda:0`, or a mapping of module names to devices, to spread one model that does not fit one device over "
        "several, in one process. Default: one device, as the Trainer places it. Not with several processes "
        "(`accelerate launch`), where each process holds its own copy.",
    )
    attn_implementation: str | None = Field(
        None, description="Attention kernel (`from_pretrained(attn_implementation=...)`): `eager`, `sdpa`, "
        "`flash_attention_2`, `flex_attention`, ... Default: transformers' choice for the model (sdpa where "
        "supported).",
    )

    @property
    def is_local(self) -> bool:
        return looks_like_local_path(self.name_or_path)


def looks_like_local_path(name: str) -> bool:
    """A Hub id is `NAME` or `ORG/NAME`; anything that exists, or reads as a path, is local."""
    return (
        os.path.exists(name)
        or name.startswith((".", "/", "~"))
        or name.count("/") > 1
        or os.sep in name and os.sep != "/"
    )


def auto_model_class(task: str):
    """The transformers Auto class that loads a model with `task`'s head."""
    import transformers

    from .tasks import get_task

    return getattr(transformers, get_task(task).auto_class)


def drop_gguf_quantizer(model):
    """Rebuild a GGUF-loaded model as a plain one.

    transformers dequantizes GGUF weights to full precision but keeps the GGUF quantizer attached, and
    `save_pretrained` then refuses ("quantized with gguf and is not serializable"). The weights are
    already dense, so a model built from the same config without `quantization_config` that loads the
    state dict is the same model, and a serializable one.
    """
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return plain_copy(model, model.state_dict()).eval()


def plain_copy(model, state_dict: dict, model_class=None):
    """A new `model_class` (default: the model's own class) built from `model.config`, with `state_dict` loaded.

    Nothing of how `model` is held comes along: no quantizer, accelerate hooks or sharding. Linear layers take
    the shapes of their weights in `state_dict`: structured pruning may leave shapes the config cannot describe
    (BERT with fewer heads in a layer), which `from_pretrained` reads from `layer_shapes` (formats/hf_modelopt.py).
    """
    from torch.nn import Linear

    from .formats.modules import resize_linear_

    plain = (model_class or type(model))(model.config)
    for name, module in list(plain.named_modules()):
        weight = state_dict.get(f"{name}.weight")
        if isinstance(module, Linear) and weight is not None and weight.shape != module.weight.shape:
            resize_linear_(plain, name, *weight.shape)
    plain.load_state_dict(state_dict, strict=True)
    if getattr(model, "generation_config", None) is not None:
        plain.generation_config = model.generation_config
    return plain


def check_model_for_task(spec: ModelConfig, task: str, num_labels: int | None, key: str, source: str):
    """Refuse, before any work, a model that cannot serve `task`; returns its `PretrainedConfig`.

    Refused: a model type transformers has no head for (the task's `AutoModelFor...` cannot load it), a
    checkpoint of another task for a task whose head comes from pretraining (a classifier as a causal LM: its
    language-model head would be random), and a checkpoint with this task's class head whose number of classes
    differs from the data's labels.
    """
    from transformers import AutoConfig

    from .errors import RecipeError
    from .tasks import TASKS, get_task

    task_spec = get_task(task)
    kwargs = {"trust_remote_code": spec.trust_remote_code, "revision": spec.revision}
    if spec.gguf_file:
        kwargs["gguf_file"] = spec.gguf_file
    config = AutoConfig.from_pretrained(spec.name_or_path, **kwargs)
    auto_class = auto_model_class(task)
    if type(config) not in auto_class._model_mapping:
        raise RecipeError(source, key, f"{spec.name_or_path} is a {config.model_type!r} model, which has no {task} "
                                       f"head in transformers ({auto_class.__name__} cannot load it); choose a model "
                                       f"for {task}")
    architectures = config.architectures or []
    owners = {name for name, other in TASKS.items() for a in architectures if other.recognises(a)}
    other_task = next(iter(owners)) if len(owners) == 1 and task not in owners else None
    if task_spec.pretrained_head and other_task is not None and all(TASKS[other_task].recognises(a)
                                                                    for a in architectures):
        raise RecipeError(source, key, f"{spec.name_or_path} is a {TASKS[other_task].model_kind} ({architectures[0]}): "
                                       f"as a {task_spec.model_kind} its {task_spec.head_noun} would be untrained; "
                                       f"use a {task_spec.model_kind} checkpoint")
    has_own_head = bool(architectures) and all(task_spec.recognises(a) for a in architectures)
    if task_spec.count_labels is not None and has_own_head and num_labels is not None \
            and config.num_labels != num_labels:
        raise RecipeError(source, key, f"{spec.name_or_path} has a {task_spec.head_noun} for {config.num_labels} "
                                       f"classes, but the data's labels have {num_labels}; use matching data, or a "
                                       f"checkpoint without a {task_spec.head_noun}")
    return config


# `quantization_config.quant_method` of a saved model -> the package transformers needs to load it (import name).
QUANT_METHOD_PACKAGES = {"bitsandbytes": "bitsandbytes", "compressed-tensors": "compressed_tensors"}


def required_packages(spec: ModelConfig) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Optional packages that loading `spec` needs (see `hf_modelopt.extras`): {recipe key: (what needs them, import
    names)}. A GGUF file needs gguf; a local folder saved quantized needs its quantization method's package."""
    import json
    from pathlib import Path

    needs = {}
    if spec.gguf_file:
        needs["model.gguf_file"] = ("a GGUF model", ("gguf",))
    try:
        config = json.loads((Path(spec.name_or_path).expanduser() / "config.json").read_text())
        method = (config.get("quantization_config") or {}).get("quant_method")
    except (OSError, ValueError, AttributeError):  # a Hub id, or no readable config: from_pretrained says more
        method = None
    if method in QUANT_METHOD_PACKAGES:
        needs["model.name_or_path"] = (f"a {method} model", (QUANT_METHOD_PACKAGES[method],))
    return needs


def load_model(spec: ModelConfig, task: str, num_labels: int | None = None, path: str | None = None):
    """Load the recipe's model for `task`; `path` loads a saved stage output with the same settings."""
    from .extras import require_extra
    from .tasks import get_task

    if path is None:
        for feature, modules in required_packages(spec).values():
            require_extra(f"{spec.name_or_path}: {feature}", *modules)
    kwargs = {"trust_remote_code": spec.trust_remote_code, **loading_options(spec)}
    if spec.trust_remote_code:
        logger.warning("trust_remote_code is on: code shipped with %s will run", path or spec.name_or_path)
    if path is None:
        kwargs["revision"] = spec.revision
        if spec.gguf_file:
            kwargs["gguf_file"] = spec.gguf_file
        if get_task(task).count_labels is not None and num_labels is not None:
            kwargs["num_labels"] = num_labels
    model = auto_model_class(task).from_pretrained(path or spec.name_or_path, **kwargs)
    if path is None and spec.gguf_file:
        model = drop_gguf_quantizer(model)
    return model


def loading_options(spec: ModelConfig) -> dict:
    """The `from_pretrained` keyword arguments of `spec`'s dtype, device map and attention implementation."""
    options = {"dtype": spec.dtype}
    if spec.device_map is not None:
        options["device_map"] = spec.device_map
    if spec.attn_implementation is not None:
        options["attn_implementation"] = spec.attn_implementation
    return options


def load_tokenizer(spec: ModelConfig, path: str | None = None, task: str | None = None):
    """The model's processor: its tokenizer, or for a task whose `processor_class` says so (images) its image
    processor. `path` loads the one saved with a stage output; `task` None means a text task."""
    import transformers

    from .tasks import get_task

    processor_class = get_task(task).processor_class if task is not None else "AutoTokenizer"
    kwargs = {"trust_remote_code": spec.trust_remote_code}
    if path is None:
        kwargs["revision"] = spec.revision
        if spec.gguf_file and not spec.tokenizer:
            kwargs["gguf_file"] = spec.gguf_file
    processor = getattr(transformers, processor_class).from_pretrained(path or spec.tokenizer or spec.name_or_path,
                                                                       **kwargs)
    if getattr(processor, "pad_token", "") is None:
        # Causal LMs often ship without a pad token; padding positions are masked out of every loss.
        processor.pad_token = processor.eos_token
    return processor
