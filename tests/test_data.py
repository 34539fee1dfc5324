import pytest
from transformers import AutoTokenizer

from hf_modelopt.data import DataError, load_split, num_labels
from hf_modelopt.recipe import DataConfig
from hf_modelopt.tasks.causal_lm import tokenize_causal_lm
from hf_modelopt.tasks.text_classification import tokenize_classification

from .conftest import minilm_folder


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(minilm_folder())


def test_tsv_keeps_quote_characters(tmp_path):
    (tmp_path / "d.tsv").write_text('sentence\tlabel\n" quoted " start\t1\nplain\t0\n')
    dataset = load_split(DataConfig(data_dir=str(tmp_path), eval_file="d.tsv", text_column="sentence"), "eval")
    assert dataset[0]["sentence"] == '" quoted " start'


def test_classification_tokenisation_and_labels(sst2_files, tokenizer):
    config = DataConfig(data_dir=str(sst2_files), train_file="sst2/train.tsv", text_column="sentence",
                        max_length=8, max_train_samples=10)
    dataset = load_split(config, "train")
    assert len(dataset) == 10 and num_labels(dataset, config) == 2
    encoded = tokenize_classification(dataset, tokenizer, config)
    assert set(encoded.column_names) >= {"input_ids", "labels"}
    assert max(len(ids) for ids in encoded["input_ids"]) == 8


def test_missing_column_is_named(sst2_files, tokenizer):
    config = DataConfig(data_dir=str(sst2_files), train_file="sst2/train.tsv", text_column="review")
    with pytest.raises(DataError, match="column 'review' not found.*sentence"):
        tokenize_classification(load_split(config, "train"), tokenizer, config)


def test_causal_lm_blocks(sst2_files, tokenizer):
    config = DataConfig(data_dir=str(sst2_files), train_file="text/train.txt", max_length=16)
    blocks = tokenize_causal_lm(load_split(config, "train"), tokenizer, config)
    assert len(blocks) > 10
    assert all(len(ids) == 16 for ids in blocks["input_ids"]) and blocks[0]["labels"] == blocks[0]["input_ids"]


def test_empty_split_is_an_error(tmp_path):
    (tmp_path / "empty.tsv").write_text("sentence\tlabel\n")
    with pytest.raises(DataError, match="empty"):
        load_split(DataConfig(data_dir=str(tmp_path), eval_file="empty.tsv"), "eval")


def test_eval_fraction_holds_out_the_last_rows(sst2_files):
    config = DataConfig(data_dir=str(sst2_files), train_file="sst2/train.tsv", text_column="sentence",
                        eval_fraction=0.25)
    train, evaluation = load_split(config, "train"), load_split(config, "eval")
    assert len(train) == 48 and len(evaluation) == 16
    assert not set(train["sentence"]) & set(evaluation["sentence"])
