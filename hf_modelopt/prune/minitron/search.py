"""The budget search: from a parameter budget to the uniform shape that keeps the calibration LM loss lowest.

Candidate shapes are a small grid (depth x hidden x FFN x heads, as fractions of the model's); those within the
budget are ranked by size and the largest few are each pruned on a deep copy, with the importance measured
once on the unpruned model, and scored by their calibration LM loss right after pruning (Sreenivas et al.
2024, https://arxiv.org/abs/2408.11796, pick the best of such candidates before distillation).
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, replace

from ...errors import UserError
from ..structured import _ffn_in, head_geometry
from .importance import MinitronImportance, calibration_lm_loss
from .layout import decoder_layout
from .removal import apply_plan_, choose_plan, current_shape, resolve_shape

# Fractions of the model's value tried for each shape field. Heads: of the query heads in each key/value group
# (every group is kept: dropping whole groups is for an explicit or fixed num_key_value_heads).
SEARCH_FRACTIONS = {
    "num_hidden_layers": (1.0, 0.875, 0.75, 0.625, 0.5),
    "hidden_size": (1.0, 0.875, 0.75, 0.625, 0.5),
    "intermediate_size": (1.0, 0.75, 0.5, 0.375, 0.25),
    "num_attention_heads": (1.0, 0.75, 0.5),
}
# Widths are rounded down to a multiple of this (when the model's width is one), the granularity at which
# matrix kernels run at full speed.
WIDTH_MULTIPLE = 8


@dataclass(frozen=True)
class ParameterCount:
    """Parameters of the model at any uniform shape: exact at the model's own shape, and for every other one,
    since each projection, norm and embedding scales with the widths it spans (what they do not span, such as
    Qwen3's per-head q/k norms, is counted as it is, per block or once)."""

    vocab: int
    head_dim: int
    tied: bool  # the LM head is the input embeddings
    ffn_inputs: int  # FFN input projections per block (gate and up: 2)
    norms: int  # norms over the hidden channels per block
    biases: dict[str, bool]
    per_block_fixed: int = 0
    fixed: int = 0

    @classmethod
    def of(cls, model) -> ParameterCount:
        layout, block = decoder_layout(model)
        first = model.get_submodule(layout.layers)[0]
        embeddings, lm_head = model.get_submodule(layout.embeddings), model.get_submodule(layout.lm_head)
        ffn_in = _ffn_in(first, "", block)
        biases = {"query": first.get_submodule(block.query).bias is not None,
                  "key_value": first.get_submodule(block.key).bias is not None,
                  "out": first.get_submodule(block.out).bias is not None,
                  "ffn_in": first.get_submodule(ffn_in[0]).bias is not None,
                  "ffn_out": first.get_submodule(block.ffn_out).bias is not None,
                  "lm_head": lm_head.bias is not None}
        counter = cls(embeddings.weight.shape[0], head_geometry(model.config)[2], lm_head.weight is embeddings.weight,
                      len(ffn_in), len(layout.block_norms), biases)
        shape = current_shape(model)
        counter = replace(counter, per_block_fixed=sum(p.numel() for p in first.parameters()) - counter.block(shape))
        return replace(counter, fixed=sum(p.numel() for p in model.parameters()) - counter.total(shape))

    def block(self, shape: dict[str, int]) -> int:
        d, f = shape["hidden_size"], shape["intermediate_size"]
        q, kv = shape["num_attention_heads"] * self.head_dim, shape["num_key_value_heads"] * self.head_dim
        b = self.biases
        return (d * q + b["query"] * q + 2 * (d * kv + b["key_value"] * kv) + q * d + b["out"] * d
                + self.ffn_inputs * (d * f + b["ffn_in"] * f) + f * d + b["ffn_out"] * d + self.norms * d
                + self.per_block_fixed)

    def embedding(self, shape: dict[str, int]) -> int:
        """The input embeddings and, when not tied to them, the LM head."""
        d = shape["hidden_size"]
        return self.vocab * d + (0 if self.tied else self.vocab * d + self.biases["lm_head"] * self.vocab)

    def total(self, shape: dict[str, int]) -> int:
        final_norm = shape["hidden_size"]
        return shape["num_hidden_layers"] * self.block(shape) + self.embedding(shape) + final_norm + self.fixed


def _scaled(value: int, fraction: float) -> int:
    scaled = int(value * fraction)
    if value % WIDTH_MULTIPLE == 0 and scaled >= WIDTH_MULTIPLE:
        scaled -= scaled % WIDTH_MULTIPLE
    return max(1, scaled)


def candidate_shapes(model, fixed: dict[str, int] | None = None) -> list[dict[str, int]]:
    """Every shape of the grid (`SEARCH_FRACTIONS`), distinct, the model's own excluded; the shape fields in `fixed`
    (checked by `resolve_shape`) take their given value in every shape instead of the grid's."""
    shape = current_shape(model)
    heads, kv_heads = shape["num_attention_heads"], shape["num_key_value_heads"]
    group = heads // kv_heads
    fixed = dict(fixed or {})
    if fixed:
        resolved = resolve_shape(model, fixed)
        if "num_attention_heads" in fixed:  # the key/value heads follow, as resolve_shape decides
            fixed["num_key_value_heads"] = resolved["num_key_value_heads"]
    shapes = {}
    for layers, hidden, ffn, head_fraction in itertools.product(*SEARCH_FRACTIONS.values()):
        if group == 1:  # one key/value head per query head: they go together
            new_heads = new_kv = max(1, int(heads * head_fraction))
        else:
            new_kv = fixed.get("num_key_value_heads", kv_heads)
            new_heads = new_kv * max(1, int(group * head_fraction))
        candidate = {"num_hidden_layers": max(1, int(shape["num_hidden_layers"] * layers)),
                     "hidden_size": _scaled(shape["hidden_size"], hidden),
                     "intermediate_size": _scaled(shape["intermediate_size"], ffn),
                     "num_attention_heads": new_heads, "num_key_value_heads": new_kv, **fixed}
        if candidate != shape:
            shapes[tuple(candidate.values())] = candidate
    return list(shapes.values())


def parameters_of(model, counted: str):
    """shape -> its parameter count (`counted`: "total", or "non_embedding": without the input embeddings and an
    untied LM head)."""
    counter = ParameterCount.of(model)

    def count(shape: dict[str, int]) -> int:
        return counter.total(shape) - (counter.embedding(shape) if counted == "non_embedding" else 0)

    return count


def shapes_within_budget(model, target_params: int, counted: str, candidates: int,
                         fixed: dict[str, int] | None = None) -> list[dict[str, int]]:
    """The `candidates` largest grid shapes of at most `target_params` parameters (with the shape fields `fixed`);
    `UserError` when the budget is not below the model's size or below every shape of the grid, or when a fixed
    field cannot be reached."""
    count = parameters_of(model, counted)
    own = count(current_shape(model))
    if target_params >= own:
        raise UserError(f"Minitron pruning: target_params={target_params} is not below the model's {own} "
                        f"({counted.replace('_', '-')} parameters): nothing to prune")
    grid = candidate_shapes(model, fixed)
    if not grid:
        raise UserError(f"Minitron pruning: the shape fields set beside target_params ({fixed}) are the model's own "
                        "shape: nothing is left to search")
    fitting = sorted((s for s in grid if count(s) <= target_params), key=count, reverse=True)
    if not fitting:
        smallest = min(count(s) for s in grid)
        held = f" with {', '.join(f'{key}={value}' for key, value in fixed.items())}" if fixed else ""
        raise UserError(f"Minitron pruning: target_params={target_params} is below the smallest shape the search "
                        f"tries{held} ({smallest} {counted.replace('_', '-')} parameters); give at least {smallest}, "
                        f"or an explicit shape")
    return fitting[:candidates]


def target_shapes(model, config) -> list[dict[str, int]]:
    """The shapes a `MinitronConfig` can prune `model` to: the search's candidates within `target_params` (its
    shape fields held), or the one explicit shape. `UserError` for an unsupported model, a shape pruning cannot
    reach or a budget the search cannot meet; nothing is scored or changed, so it also serves as the check before
    any work."""
    decoder_layout(model)
    if config.target_params is not None:
        return shapes_within_budget(model, config.target_params, config.target_params_counted,
                                    config.search_candidates, config.target_shape())
    return [resolve_shape(model, config.target_shape())]


def search_shape(model, importance: MinitronImportance, batches: list[dict], shapes: list[dict[str, int]],
                 depth_importance: str, counted: str) -> tuple[dict[str, int], list[dict]]:
    """Prune a deep copy of `model` to each of `shapes` and score it by calibration LM loss; returns the best
    shape and the table rows (shape, parameters, loss), printed as they are measured."""
    from tqdm.auto import tqdm

    count = parameters_of(model, counted)
    rows = []
    for shape in tqdm(shapes, desc="Minitron shape search", unit="shape"):
        candidate = copy.deepcopy(model)
        apply_plan_(candidate, choose_plan(candidate, importance, shape, depth_importance))
        rows.append({**shape, "parameters": count(shape), "lm_loss": calibration_lm_loss(candidate, batches)[0]})
        del candidate
    tqdm.write(format_search_table(rows, counted))
    return min(rows, key=lambda row: row["lm_loss"]), rows


def format_search_table(rows: list[dict], counted: str) -> str:
    header = f"{'layers':>6} {'hidden':>6} {'ffn':>6} {'heads':>5} {'kv':>3} {counted + ' params':>20} {'LM loss':>8}"
    best = min(row["lm_loss"] for row in rows)
    lines = [header] + [f"{r['num_hidden_layers']:>6} {r['hidden_size']:>6} {r['intermediate_size']:>6} "
                        f"{r['num_attention_heads']:>5} {r['num_key_value_heads']:>3} {r['parameters']:>20,} "
                        f"{r['lm_loss']:>8.4f}{'  <- best' if r['lm_loss'] == best else ''}" for r in rows]
    return "\n".join(lines)
