"""Which models and tasks each technique supports, declared once, and the checks every verb and stage run first.

Each technique declares what it supports as a function `model -> why not (str) | None` (`SUPPORT`);
`require_support` turns a "why not" into one `UnsupportedModelError` line naming the technique, the model type and
what is supported, before the verb does any work (no training step, no weight changed). What a recipe's task alone
decides (a seq2seq model has two stacks of blocks; a span head has two logits tensors) is declared per task
(`TASK_SUPPORT`, `Task -> why not | None`): the stages check it before any stage runs (`task_refusal`), the trainer
when it is built (`require_task_support`), and the model rows of `SUPPORT` that depend on the head read the same
rows through the model's task, so a recipe and a script are refused for the same reason. The behaviour matrix
(`tests/matrix/`) reads `SUPPORT`: every supported (technique, architecture) pair is run and its result checked,
every other pair must be refused with this error. `docs/architectures.md` records the outcome.

    from hf_modelopt.compat import require_support
    require_support("structured pruning", model)  # raises UnsupportedModelError for a Swin

The declarations read the structure the work itself relies on: the block stacks as `hf_modelopt.blocks` finds them
(ALBERT's shared layers have none), same-shape blocks (Swin's stages are not), the block layouts structured pruning
knows (`blocks.LAYOUTS`), the layers transformers' bitsandbytes integration replaces (`formats.bnb_layers`: not
Falcon's `FalconLinear`). All of them are foundations: this module imports no technique, so every technique can
import it.
"""

from __future__ import annotations

from collections.abc import Callable

from .errors import UnsupportedModelError  # noqa: F401  (re-exported: raised by require_support)

# Logits shapes (`Task.logits`) that are one distribution per example (classification) or per next token (causal
# LM): what the quantization sensitivity scan and recovery compute the task cross-entropy
# (`distill.trainer.task_cross_entropy`) and the logits' KL on. A seq2seq model's decoder needs its labels as
# `decoder_input_ids`, which the scan does not pass; token classification and QA have labels per token / span.
# (Distillation itself compares logits as each registered task says: `_task_head`.)
CALIBRATION_LOGITS = ("sequence", "decoder-token")

# Model types whose checkpoint in compressed-tensors transformers cannot load (checked by loading it): T5's
# weight initialisation reads `.weight` of the feed-forward layers, which compressed-tensors' layers lack.
COMPRESSED_TENSORS_UNLOADABLE = {"t5": "transformers' T5 weight initialisation reads `.weight` of the layers "
                                       "compressed-tensors replaces, so the checkpoint would not load"}


def unwrapped(model):
    """The transformers model inside peft adapters, `torch.compile` (`_orig_mod`) or DistributedDataParallel."""
    for _ in range(4):
        if hasattr(model, "get_base_model") and hasattr(model, "peft_config"):
            model = model.get_base_model()
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif type(model).__name__ == "DistributedDataParallel":
            model = model.module
        else:
            break
    return model


def model_type(model) -> str:
    return getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__


def _one_stack_task(task) -> str | None:
    # A task whose models are encoder-decoders (seq2seq): `transformer_layers` would find only the encoder's blocks.
    if task.encoder_decoder:
        return (f"it supports models with one stack of transformer blocks (encoders, decoders, ViT); a "
                f"{task.model_kind} is an encoder-decoder, which has two")
    return None


def _hidden_states_of_one_stack(task) -> str | None:
    # The hidden / cosine / attention losses map student layers to teacher layers of one stack.
    if task.encoder_decoder:
        return (f"it compares one stack of layers; a {task.model_kind} has an encoder and a decoder: use "
                "kd_weight / ce_weight only")
    return None


def _one_logits_tensor_per_input(task) -> str | None:
    # The logit cache stores one top-k logits tensor per example, cut to the input's length.
    if task.logits == "span":
        return (f"the cache holds one logits tensor per example; a {task.model_kind} has start and end logits: "
                "turn the cache off")
    if task.encoder_decoder:
        return (f"the cache is cut to the encoder's input length; a {task.model_kind}'s logits follow its targets: "
                "turn the cache off")
    return None


def _writes_its_own_text(task) -> str | None:
    # The teacher continues prompts from the training text: the continuations are training text only for a causal LM.
    if task.logits == "decoder-token":
        return None
    return (f"the teacher continues prompts, which is training text for a causal LM only; a {task.model_kind} needs "
            "labelled rows: use transfer_file or augmentation (classification)")


def _calibration_logits(task) -> str | None:
    if task.logits in CALIBRATION_LOGITS:
        return None
    from .tasks import TASKS  # at call time: the registry imports numpy and the data module

    supported = [name for name, known in TASKS.items() if known.logits in CALIBRATION_LOGITS]
    return (f"it supports the tasks with one distribution of logits per example or per next token "
            f"({', '.join(supported)}): the scan and the recovery run the model on the calibration rows without "
            f"decoder inputs and compare its logits; a {task.model_kind}'s are per {_PER[task.logits]}")


_PER = {"token": "token", "span": "span position (start and end)", "seq2seq-token": "decoder position"}


# technique -> why the models of a task are not supported (None: supported), from the task alone: what a recipe can
# be refused for before any model is loaded. The model rows of `SUPPORT` that depend on the head read these.
TASK_SUPPORT: dict[str, Callable[[object], str | None]] = {
    "one-shot pruning": _one_stack_task,
    "quantization with calibration": _calibration_logits,
    "distillation of hidden states": _hidden_states_of_one_stack,  # hidden / cosine / attention losses
    "teacher logit cache": _one_logits_tensor_per_input,  # `cache_teacher_logits`
    "distillation on teacher-written text": _writes_its_own_text,  # `generated_text`
}


def _task_rows(technique: str, model) -> str | None:
    """The `TASK_SUPPORT` row of `technique` for the model's task (its head); a model of no registered task is
    refused naming the tasks."""
    from .tasks import TASKS, model_task

    task = model_task(model)
    if task is None:
        return (f"it supports the heads of the registered tasks ({', '.join(TASKS)}); {type(model).__name__} is "
                "none of them")
    return TASK_SUPPORT[technique](TASKS[task])


def _task_head(model) -> str | None:
    # Distillation compares logits as the model's task says (`Task.logits`: per example, per token, per span
    # position, ...): any head of a registered task.
    from .tasks import TASKS, model_task  # read at call time: the registered tasks are the declaration

    head = model_task(model)
    if head is not None:
        return None
    shown = "none of " + ", ".join(TASKS)
    return f"it supports the heads of the registered tasks ({', '.join(TASKS)}); {type(model).__name__} is {shown}"


def _one_block_stack(model) -> str | None:
    # `transformer_layers` finds a single ModuleList of blocks: in an encoder-decoder it finds the encoder's, so the
    # decoder's layers would silently stay as they are.
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return ("it supports models with one stack of transformer blocks (encoders, decoders, ViT); an "
                "encoder-decoder has two and only its encoder's would be pruned")
    return None


def _structured_layout(model) -> str | None:
    from .blocks import LAYOUTS  # the layouts are the declaration (`prune.structured` reads the same table)

    if model_type(model) in LAYOUTS:
        return None
    return f"it supports the model types whose block layout it knows: {', '.join(sorted(LAYOUTS))}"


# Config keys that count the blocks of each stage of a hierarchical vision model (Swin and its kin): its `layers` are
# stages, not blocks, and the patch merging between stages changes the hidden size and the token count.
STAGE_DEPTHS_KEYS = ("depths",)
# Config keys that say several layers share one set of weights (ALBERT: `num_hidden_groups` groups of layers, run
# `num_hidden_layers` times in all): there is no module per layer to prune, drop or calibrate on its own.
SHARED_LAYER_GROUP_KEYS = ("num_hidden_groups",)


def _block_stacks(model) -> str | None:
    # Pruning selects the Linears of the block stacks (`blocks.layer_stacks`): a model without one would fail
    # inside the work (ALBERT's shared layers: inside `trainer.train()`).
    from .blocks import COUNT_KEYS, layer_stacks  # at call time: `blocks` imports torch

    if layer_stacks(model):
        return None
    config = getattr(model, "config", None)
    shared = next((key for key in SHARED_LAYER_GROUP_KEYS if isinstance(getattr(config, key, None), int)), None)
    if shared is not None:
        return (f"it supports models with one module per transformer layer; {type(model).__name__}'s "
                f"{getattr(config, 'num_hidden_layers', '?')} layers share the weights of {getattr(config, shared)} "
                f"layer group(s) (config.{shared})")
    return (f"it supports models with a ModuleList of transformer blocks whose length a layer-count config "
            f"attribute ({', '.join(COUNT_KEYS)}) states; {type(model).__name__} has none")


def _same_shape_blocks(model) -> str | None:
    # One-shot calibration feeds each block the previous block's output, and a student keeps whole blocks: both
    # need a stack of blocks that keep the hidden shape. Swin's stack is of stages with patch merging between them
    # (one-shot pruning crashed at a later stage after the first was pruned; `student_from_teacher` raised
    # IndexError).
    config = getattr(model, "config", None)
    for key in STAGE_DEPTHS_KEYS:
        depths = getattr(config, key, None)
        if isinstance(depths, (list, tuple)):
            return (f"it supports stacks of blocks that keep the hidden shape; {type(model).__name__} has "
                    f"{len(depths)} stages of blocks (config.{key} = {list(depths)}) with patch merging between "
                    "them, which changes the hidden size and the token count")
    return _block_stacks(model)


def _one_stack_of_same_shape_blocks(model) -> str | None:
    return _one_block_stack(model) or _same_shape_blocks(model)


def _has_linear_layers(model) -> str | None:
    import torch

    if any(isinstance(module, torch.nn.Linear) for module in model.modules()):
        return None
    return "it quantizes Linear layers and the model has none"


def _gradual_pruning(model) -> str | None:
    return _has_linear_layers(model) or _block_stacks(model)


def _bitsandbytes_layers(model) -> str | None:
    # transformers' bitsandbytes integration replaces the modules whose type is exactly nn.Linear, and GPT-2's
    # Conv1D (`formats.bnb_layers.linear_layers` is that rule, which quantization plans with); a subclass with its
    # own forward (Falcon's `FalconLinear`) stays in full precision, so a model whose blocks hold only those would
    # come back unquantized.
    import torch

    from .formats.bnb_layers import linear_layers  # at call time: it imports torch and transformers

    layers = linear_layers(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if any(model.get_submodule(name) is not head for name in layers):
        return None
    subclasses = sorted({type(m).__name__ for m in model.modules()
                         if isinstance(m, torch.nn.Linear) and type(m) is not torch.nn.Linear})
    if subclasses:
        return (f"it supports the layers transformers' bitsandbytes integration replaces, exactly nn.Linear (and "
                f"GPT-2's Conv1D); {type(model).__name__}'s layers are {', '.join(subclasses)} (subclasses of "
                "nn.Linear), which it leaves in full precision")
    return "it supports models with Linear layers besides the output head, and this one has none"


def _calibrated_quantization(model) -> str | None:
    # The sensitivity scan and the recovery compute the task loss and the KL of the logits (`TASK_SUPPORT`).
    return _bitsandbytes_layers(model) or _task_rows("quantization with calibration", model)


def _any_model(model) -> str | None:
    return None if hasattr(model, "save_pretrained") else "it saves transformers models (save_pretrained)"


# technique -> why `model` is not supported (None: supported). The names are the ones the messages use.
SUPPORT: dict[str, Callable[[object], str | None]] = {
    "distillation": _task_head,
    "students from teacher layers": _same_shape_blocks,  # `distill.student_from_teacher` keeps whole blocks
    "gradual pruning": _gradual_pruning,  # the Linears of every block stack (both of an encoder-decoder)
    "one-shot pruning": _one_stack_of_same_shape_blocks,  # (any head: the stage calibrates with its task's rows)
    "structured pruning": _structured_layout,
    "quantization": _bitsandbytes_layers,
    "quantization with calibration": _calibrated_quantization,
    "export": _any_model,
}


def unsupported_reason(technique: str, model) -> str | None:
    """Why `technique` does not support `model` (what it supports), or None when it does."""
    if technique not in SUPPORT:
        raise KeyError(f"unknown technique {technique!r}: one of {', '.join(SUPPORT)}")
    return SUPPORT[technique](unwrapped(model))


def require_support(technique: str, model) -> None:
    """Raise `UnsupportedModelError` (one line: technique, model type, what is supported) unless `technique`
    supports `model`. Verbs call it before any work."""
    model = unwrapped(model)
    reason = unsupported_reason(technique, model)
    if reason is not None:
        raise UnsupportedModelError(f"{technique} does not support model_type {model_type(model)!r} "
                                    f"({type(model).__name__}): {reason}")


def unsupported_task_reason(technique: str, task: str) -> str | None:
    """Why `technique` does not support the models of the registered task `task`, or None when it does (as far as
    the task decides: `require_support` checks the model itself)."""
    from .tasks import get_task

    if technique not in TASK_SUPPORT:
        return None  # nothing of this technique depends on the task alone
    return TASK_SUPPORT[technique](get_task(task))


def task_refusal(technique: str, task: str) -> str | None:
    """The one-line refusal of `technique` for the models of `task` (what a stage's preflight raises under its
    recipe key), or None when the task is supported."""
    reason = unsupported_task_reason(technique, task)
    return None if reason is None else f"{technique} does not support the {task} task: {reason}"


def require_task_support(technique: str, task: str) -> None:
    """Raise `UnsupportedModelError` (`task_refusal`'s line) unless `technique` supports the models of `task`."""
    refusal = task_refusal(technique, task)
    if refusal is not None:
        raise UnsupportedModelError(refusal)
