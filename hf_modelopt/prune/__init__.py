"""Pruning: gradual unstructured (`PruningCallback`), structured heads / neurons physically removed
(`remove_heads_and_neurons_`), and one-shot Wanda / SparseGPT for causal LMs (`prune_oneshot_`)."""

from .callback import PruningCallback
from .config import (
    OneShotPruneStageConfig,
    PruneStageConfig,
    PruningConfig,
    ScheduleConfig,
    StructuredPruneStageConfig,
)
from .oneshot import prune_oneshot_
from .schedule import cubic_sparsity, linear_sparsity
from .structured import gradient_importance, magnitude_importance, remove_heads_and_neurons_

__all__ = [
    "OneShotPruneStageConfig", "PruneStageConfig", "PruningCallback", "PruningConfig", "ScheduleConfig",
    "StructuredPruneStageConfig", "cubic_sparsity", "gradient_importance", "linear_sparsity",
    "magnitude_importance", "prune_oneshot_", "remove_heads_and_neurons_",
]
