import pytest

from hf_modelopt.errors import RecipeError
from hf_modelopt.recipe import validate_recipe
from hf_modelopt.tasks import TASKS, get_task, infer_task, model_task

from ..conftest import tiny_recipe


def test_recipe_task_accepts_exactly_the_registered_names(tmp_path):
    for name in TASKS:
        assert validate_recipe(tiny_recipe(tmp_path, tmp_path, task=name)).task == name
    with pytest.raises(RecipeError) as error:
        validate_recipe(tiny_recipe(tmp_path, tmp_path, task="summarization"))
    assert error.value.key == "task"
    with pytest.raises(ValueError, match="unknown task 'summarization'; expected one of: text-classification"):
        get_task("summarization")


def test_infer_task_and_the_refusal_of_a_model_type_without_the_head(tiny_models, tmp_path):
    import transformers

    from hf_modelopt.modeling import ModelConfig, check_model_for_task

    model = transformers.AutoModelForTokenClassification.from_pretrained(tiny_models("bert", "token-classification"))
    assert infer_task(model) == "token-classification"
    with pytest.raises(RecipeError, match="is a 'bert' model, which has no image-classification head in transformers "
                                          r"\(AutoModelForImageClassification cannot load it\)"):
        check_model_for_task(ModelConfig(name_or_path=str(tiny_models("bert"))), "image-classification", None,
                             "model.name_or_path", "r.yaml")


def test_the_task_of_a_class_is_its_auto_mapping_and_the_naming_only_for_unlisted_classes():
    def instance_of(class_name):
        return type(class_name, (), {})()

    # Listed by transformers: the auto-mapping decides, whatever the name looks like.
    assert model_task(instance_of("GPT2LMHeadModel")) == "causal-lm"
    assert model_task(instance_of("T5ForConditionalGeneration")) == "seq2seq"
    assert model_task(instance_of("LlavaForConditionalGeneration")) is None  # image-text-to-text: no task of ours
    assert model_task(instance_of("BertForMaskedLM")) is None
    assert model_task(instance_of("BertModel")) is None
    # Remote code (no auto-mapping lists it): transformers' naming.
    assert model_task(instance_of("MyCustomForSequenceClassification")) == "text-classification"
    assert model_task(instance_of("MyCustomForConditionalGeneration")) == "seq2seq"
    with pytest.raises(ValueError, match="cannot tell the task of a LlavaForConditionalGeneration: pass task="):
        infer_task(instance_of("LlavaForConditionalGeneration"))


def test_a_missing_column_of_a_task_is_named_before_any_work(task_data):
    from hf_modelopt.tasks import QuestionAnsweringData, check_data_contents

    config = QuestionAnsweringData(**{**task_data("question-answering"), "context_column": "passage"})
    with pytest.raises(RecipeError, match="data.context_column: column 'passage' not found in .*train.jsonl; its "
                                          "columns are: question, context, answers"):
        check_data_contents(config, "question-answering", {"train"}, "r.yaml")
