"""Tiny models wide enough for bitsandbytes' 4-bit CPU kernels (64 features in, multiples of 32 out)."""

from __future__ import annotations

import pytest

from .. import conftest as shared

WIDE_CONFIGS = {
    "bert": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128),
    "llama": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, head_dim=16),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=2, n_positions=256),
}


@pytest.fixture(scope="session")
def wide_tiny_models(tmp_path_factory):
    """`wide_tiny_models(model_type, task)` -> folder of a tiny random model with 64-wide layers."""
    built = {}

    def get(model_type: str, task: str = "text-classification"):
        if (model_type, task) not in built:
            folder = tmp_path_factory.mktemp(f"wide-{model_type}-{task}")
            original = shared.TINY_CONFIGS[model_type]
            shared.TINY_CONFIGS[model_type] = WIDE_CONFIGS[model_type]
            try:
                built[model_type, task] = shared.build_tiny_model(model_type, task, folder)
            finally:
                shared.TINY_CONFIGS[model_type] = original
        return built[model_type, task]

    return get
