"""`hf-modelopt inspect`: what a model is made of, tensor by tensor."""

from __future__ import annotations

from pathlib import Path


def load_config(path: str, trust_remote_code: bool, **kwargs):
    """`AutoConfig` of a model folder or Hub id, or None for a folder without config.json (a peft adapter).

    The commands that load a model given on the command line call it before any other work: a model that ships
    its own code (`auto_map`) is refused here unless the user passed --trust-remote-code. Always a bool:
    transformers' default (None) asks y/N on a terminal instead.
    """
    import os

    from transformers import AutoConfig

    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")) and "gguf_file" not in kwargs:
        return None
    return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)


def tensor_stats(name: str, tensor) -> dict:
    from .formats.modules import zero_fraction

    values = tensor.detach().float()  # integer (quantized) storage is reported by its raw values
    return {
        "name": name,
        "shape": list(tensor.shape),
        "dtype": str(tensor.dtype).removeprefix("torch."),
        "numel": tensor.numel(),
        "min": values.min().item() if tensor.numel() else 0.0,
        "max": values.max().item() if tensor.numel() else 0.0,
        "mean": values.mean().item() if tensor.numel() else 0.0,
        "std": values.std().item() if tensor.numel() > 1 else 0.0,
        "sparsity": zero_fraction(values),
    }


def inspect_model(model, folder: str | Path | None = None, gguf_file: str | None = None) -> dict:
    """Parameter count, sizes, dtypes and per-tensor min / max / mean / std / sparsity of `model` (its weights on
    disk from `folder`, the GGUF file `gguf_file` in it when it was loaded from one)."""
    from .formats.detect import weights_size_on_disk

    weights = [tensor_stats(n, p) for n, p in model.named_parameters()]
    tensors = weights + [tensor_stats(n, b) for n, b in model.named_buffers() if b.is_floating_point()]
    parameters = sum(p.numel() for p in model.parameters())
    zeros = sum(t["sparsity"] * t["numel"] for t in weights)
    memory = sum(p.numel() * p.element_size() for p in model.parameters())
    memory += sum(b.numel() * b.element_size() for b in model.buffers())
    return {
        "model": type(model).__name__,
        "parameters": parameters,
        "size_in_memory_bytes": memory,
        "size_on_disk_bytes": weights_size_on_disk(folder, gguf_file) if folder and Path(folder).is_dir() else None,
        "dtypes": sorted({t["dtype"] for t in tensors}),
        "sparsity": zeros / parameters if parameters else 0.0,
        "tensors": tensors,
    }


def human_bytes(count: int | None) -> str:
    if count is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{count} B"
        count /= 1000
    return f"{count:.1f} GB"


def format_report(report: dict) -> str:
    lines = [
        f"model:           {report['model']}",
        f"parameters:      {report['parameters']:,}",
        f"size on disk:    {human_bytes(report['size_on_disk_bytes'])}",
        f"size in memory:  {human_bytes(report['size_in_memory_bytes'])}",
        f"dtypes:          {', '.join(report['dtypes'])}",
        f"sparsity:        {report['sparsity']:.2%}",
        "",
    ]
    width = max(len(t["name"]) for t in report["tensors"]) if report["tensors"] else 4
    header = (f"{'tensor':<{width}}  {'shape':<14} {'dtype':<8} {'min':>10} {'max':>10} {'mean':>10} {'std':>10} "
              f"{'sparsity':>8}")
    lines += [header, "-" * len(header)]
    for t in report["tensors"]:
        shape = "x".join(map(str, t["shape"])) or "scalar"
        lines.append(f"{t['name']:<{width}}  {shape:<14} {t['dtype']:<8} {t['min']:>10.4g} {t['max']:>10.4g} "
                     f"{t['mean']:>10.4g} {t['std']:>10.4g} {t['sparsity']:>8.2%}")
    return "\n".join(lines)
