import pytest

from hf_modelopt.tasks import TokenClassificationData
from hf_modelopt.tasks.token_classification import align_labels, count_labels, seqeval_metrics


def test_labels_go_to_the_first_sub_token_of_each_word():
    # [CLS] w0 w1 w1 w2 [SEP]: the second piece of word 1 and the special tokens are not labelled
    assert align_labels([None, 0, 1, 1, 2, None], [3, 1, 2]) == [-100, 3, 1, -100, 2, -100]


def test_seqeval_on_a_hand_made_example():
    references = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-LOC"]]
    predictions = [["B-PER", "I-PER", "O", "O"], ["O", "B-PER"]]
    # entities: 3 true (PER, LOC, LOC), 2 predicted (PER right, PER wrong): P = 1/2, R = 1/3, F1 = 2/5
    metrics = seqeval_metrics(predictions, references)
    assert metrics["precision"] == pytest.approx(1 / 2) and metrics["recall"] == pytest.approx(1 / 3)
    assert metrics["f1"] == pytest.approx(2 / 5) and metrics["accuracy"] == pytest.approx(4 / 6)


def test_tokenized_rows_keep_word_labels(task_data):
    from transformers import AutoTokenizer

    from hf_modelopt.data import load_split
    from hf_modelopt.tasks.token_classification import tokenize_token_classification

    from ..conftest import minilm_folder

    config = TokenClassificationData(**task_data("token-classification"))
    rows = load_split(config, "train")
    encoded = tokenize_token_classification(rows, AutoTokenizer.from_pretrained(minilm_folder()), config)
    assert [label for label in encoded[0]["labels"] if label != -100] == rows[0]["ner_tags"]
    assert count_labels(rows, config) == 2
