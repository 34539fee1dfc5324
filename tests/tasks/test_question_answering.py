import numpy as np
import pytest

from hf_modelopt.tasks import QuestionAnsweringData
from hf_modelopt.tasks.question_answering import (
    normalize_answer,
    postprocess_qa_predictions,
    prepare_qa_eval,
    prepare_qa_train,
    squad_metrics,
)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from ..conftest import minilm_folder

    return AutoTokenizer.from_pretrained(minilm_folder())


def qa_rows(context, answer):
    import datasets

    return datasets.Dataset.from_dict({"question": ["where is the key ?"], "context": [context],
                                       "answers": [{"text": [answer], "answer_start": [context.index(answer)]}]})


def test_long_context_windows_label_the_answer_where_it_is(tokenizer):
    context = " ".join(f"word{i}" for i in range(40)) + " the key is under the blue stone ."
    config = QuestionAnsweringData(max_length=24, doc_stride=8)
    windows = prepare_qa_train(qa_rows(context, "blue stone"), tokenizer, config)
    assert len(windows) > 2  # the context is cut into overlapping windows
    found = [tokenizer.decode(w["input_ids"][w["start_positions"] : w["end_positions"] + 1])
             for w in windows if w["start_positions"] > 0]
    assert found and all(text == "blue stone" for text in found)
    assert windows[0]["start_positions"] == windows[0]["end_positions"] == 0  # not in the first window


def test_post_processing_extracts_the_known_answer_span(tokenizer):
    context = "the cat slept on the old mat all day ."
    rows = qa_rows(context, "old mat")
    windows = list(prepare_qa_eval(rows, tokenizer, QuestionAnsweringData(max_length=64)))
    offsets = windows[0]["offset_mapping"]
    start = next(i for i, o in enumerate(offsets) if o is not None and context[o[0]:o[1]] == "old")
    end = next(i for i, o in enumerate(offsets) if o is not None and context[o[0]:o[1]] == "mat")
    starts, ends = np.zeros(len(offsets)), np.zeros(len(offsets))
    starts[start], ends[end] = 5.0, 4.0
    starts[1], ends[0] = 9.0, 9.0  # the best scores point at the question / an end before the start: invalid
    assert postprocess_qa_predictions([context], windows, [starts], [ends]) == ["old mat"]


def test_squad_metrics_as_the_official_script():
    assert normalize_answer("The  Cat!") == "cat"
    metrics = squad_metrics(["The Cat", "cat sat", "dog"], [["cat"], ["the cat", "a cat sat down"], ["mouse"]])
    # example 2: "cat sat" vs "a cat sat down" -> P 1, R 2/3, F1 0.8 (better than 2/3 against "the cat")
    assert metrics["exact_match"] == pytest.approx(100 / 3)
    assert metrics["f1"] == pytest.approx(100 * (1 + 0.8 + 0) / 3)
