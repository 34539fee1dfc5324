"""Teacher-logit cache: the teacher's top-k logits over the training set, computed once, keyed by example.

Stored as one safetensors file with `values` (float32) and `indices` (int64), shaped (examples, k) for
classification or (examples, tokens, k) for causal LMs (right-padded to the longest example); row i
belongs to the example whose `example_index` is i, so shuffling and later epochs read the right rows.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from .losses import top_k_logits


@torch.no_grad()
def build_teacher_logit_cache(teacher, dataset, collator, path: str | Path, top_k: int | None,
                              batch_size: int = 64) -> Path:
    """Run the teacher once over `dataset` (tokenized, with `example_index`) and save its top-k logits."""
    from safetensors.torch import save_file

    teacher.eval()
    device = next(teacher.parameters()).device
    values, indices, order = [], [], []
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collator)
    for batch in tqdm(loader, desc="Caching teacher logits", unit="batch"):
        index = batch.pop("example_index")
        batch.pop("labels", None)
        logits = teacher(**{k: v.to(device) for k, v in batch.items()}).logits
        top_values, top_indices = top_k_logits(logits, top_k)
        values.append(top_values.cpu())
        indices.append(top_indices.cpu())
        order.append(index)
    order = torch.cat(order)
    if values[0].dim() == 3:  # token-level: batches were padded to different lengths; pad to the longest
        longest = max(v.size(1) for v in values)
        values = [torch.nn.functional.pad(v, (0, 0, 0, longest - v.size(1))) for v in values]
        indices = [torch.nn.functional.pad(i, (0, 0, 0, longest - i.size(1))) for i in indices]
    rows = torch.empty_like(order)
    rows[order] = torch.arange(len(order))  # row of example i
    path = Path(path)
    save_file({"values": torch.cat(values)[rows].contiguous(), "indices": torch.cat(indices)[rows].contiguous()},
              str(path))
    return path


class TeacherLogitCache:
    """Read access to a cache file: `lookup(example_index) -> (values, indices)` for a batch."""

    def __init__(self, path: str | Path):
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        self.values, self.indices = tensors["values"], tensors["indices"]

    def __len__(self) -> int:
        return len(self.values)

    def lookup(self, example_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        example_index = example_index.cpu()
        return self.values[example_index], self.indices[example_index]


class CachedTeacherCollator:
    """Wraps a collator: adds the cached teacher logits of each batch's examples."""

    def __init__(self, collator, cache: TeacherLogitCache):
        self.collator, self.cache = collator, cache

    def __call__(self, features):
        batch = self.collator(features)
        values, indices = self.cache.lookup(batch["example_index"])
        if values.dim() == 3:  # token-level rows are padded to the longest example; cut to this batch
            length = batch["input_ids"].size(1)
            values, indices = values[:, :length], indices[:, :length]
        batch["teacher_top_values"], batch["teacher_top_indices"] = values, indices
        return batch
