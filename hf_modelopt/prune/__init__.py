"""Pruning: gradual unstructured while training (`PruningCallback`), and in one call (`prune_`): structured heads /
neurons physically removed (`remove_heads_and_neurons_`), one-shot Wanda / SparseGPT for causal LMs
(`prune_oneshot_`), magnitude at once, whole mixture-of-experts experts removed (`remove_experts_`), or Minitron
width / depth pruning of decoder LLMs (`MinitronConfig`)."""

from .callback import PruningCallback
from .config import ExpertRemovalConfig, OneShotPruningConfig, PruningConfig, ScheduleConfig, StructuredPruningConfig
from .experts import remove_experts_
from .minitron import MinitronConfig  # (registers its prune_ handler)
from .oneshot import prune_oneshot_
from .prune import prune_
from .schedule import cubic_sparsity, linear_sparsity
from .structured import gradient_importance, magnitude_importance, remove_heads_and_neurons_

__all__ = [
    "ExpertRemovalConfig", "MinitronConfig", "OneShotPruningConfig", "PruningCallback", "PruningConfig",
    "ScheduleConfig", "StructuredPruningConfig", "cubic_sparsity", "gradient_importance", "linear_sparsity",
    "magnitude_importance", "prune_", "prune_oneshot_", "remove_experts_", "remove_heads_and_neurons_",
]
