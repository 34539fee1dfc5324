import pytest
from transformers import AutoTokenizer

from hf_modelopt.data import DataError, load_split, num_labels
from hf_modelopt.recipe import DataConfig, RecipeError, validate_recipe
from hf_modelopt.tasks.causal_lm import CausalLMData, tokenize_causal_lm
from hf_modelopt.tasks.text_classification import TextClassificationData, tokenize_classification

from .conftest import minilm_folder


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(minilm_folder())


def test_tsv_keeps_quote_characters(tmp_path):
    (tmp_path / "d.tsv").write_text('sentence\tlabel\n" quoted " start\t1\nplain\t0\n')
    dataset = load_split(TextClassificationData(data_dir=str(tmp_path), eval_file="d.tsv", text_column="sentence"),
                         "eval")
    assert dataset[0]["sentence"] == '" quoted " start'


def test_classification_tokenisation_and_labels(sst2_files, tokenizer):
    config = TextClassificationData(data_dir=str(sst2_files), train_file="sst2/train.tsv", text_column="sentence",
                                    max_length=8, max_train_samples=10)
    dataset = load_split(config, "train")
    assert len(dataset) == 10 and num_labels(dataset, config) == 2
    encoded = tokenize_classification(dataset, tokenizer, config)
    assert set(encoded.column_names) >= {"input_ids", "labels"}
    assert max(len(ids) for ids in encoded["input_ids"]) == 8


def test_missing_column_is_named(sst2_files, tokenizer):
    config = TextClassificationData(data_dir=str(sst2_files), train_file="sst2/train.tsv", text_column="review")
    with pytest.raises(DataError, match="column 'review' not found.*sentence"):
        tokenize_classification(load_split(config, "train"), tokenizer, config)


def test_causal_lm_blocks(sst2_files, tokenizer):
    config = CausalLMData(data_dir=str(sst2_files), train_file="text/train.txt", max_length=16)
    blocks = tokenize_causal_lm(load_split(config, "train"), tokenizer, config)
    assert len(blocks) > 10
    assert all(len(ids) == 16 for ids in blocks["input_ids"]) and blocks[0]["labels"] == blocks[0]["input_ids"]


def test_empty_split_is_an_error(tmp_path):
    (tmp_path / "empty.tsv").write_text("sentence\tlabel\n")
    with pytest.raises(DataError, match="empty"):
        load_split(DataConfig(data_dir=str(tmp_path), eval_file="empty.tsv"), "eval")


def test_eval_fraction_holds_out_the_last_rows(sst2_files):
    config = TextClassificationData(data_dir=str(sst2_files), train_file="sst2/train.tsv", text_column="sentence",
                                    eval_fraction=0.25)
    train, evaluation = load_split(config, "train"), load_split(config, "eval")
    assert len(train) == 48 and len(evaluation) == 16
    assert not set(train["sentence"]) & set(evaluation["sentence"])


def test_data_holds_the_keys_of_the_recipes_task_only():
    """Each task declares its own data settings: another task's key is refused in one line naming it."""
    recipe = {"model": {"name_or_path": "m"}, "task": "text-classification", "stages": ["finetune"],
              "data": {"train_file": "t.tsv", "doc_stride": 16}}
    with pytest.raises(RecipeError) as refused:
        validate_recipe(recipe)
    assert str(refused.value) == ("<python>: data.doc_stride: unknown key for a text-classification recipe: only "
                                  "question-answering recipes read it")
    recipe.update(task="question-answering")
    assert validate_recipe(recipe).data.doc_stride == 16
    assert not hasattr(DataConfig(), "text_column")  # the shared settings: where the data is, how much of it


# --------------------------------------------------------------------------- where data_dir points


def _recipe_file(path, data: dict, **extra):
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"model": {"name_or_path": "org/model"}, "task": "text-classification",
                                    "data": data, "stages": ["evaluate"], **extra}))
    return path


def test_a_relative_data_dir_resolves_against_the_file_that_wrote_it(tmp_path, monkeypatch):
    from hf_modelopt.recipe import load_recipe

    base = _recipe_file(tmp_path / "base" / "base.yaml", {"data_dir": "files", "eval_file": "e.tsv"})
    child = tmp_path / "elsewhere" / "child.yaml"
    child.parent.mkdir()
    child.write_text("extends: ../base/base.yaml\ndata:\n  max_length: 16\n")
    monkeypatch.chdir(tmp_path / "elsewhere")  # the current directory plays no part
    assert load_recipe(base).data.data_dir == str(tmp_path / "base" / "files")
    assert load_recipe("child.yaml").data.data_dir == str(tmp_path / "base" / "files")
    child.write_text("extends: ../base/base.yaml\ndata:\n  data_dir: ../mine\n")  # the child's own, from its folder
    assert load_recipe(child).data.data_dir == str(tmp_path / "mine")
    # --set (and Python) stay relative to the current directory; absolute paths stay as written.
    assert load_recipe(child, ["data.data_dir=here"]).data.data_dir == "here"
    assert load_recipe(child, ["data={data_dir: here, eval_file: e.tsv}"]).data.data_dir == "here"
    _recipe_file(base, {"data_dir": str(tmp_path / "abs"), "eval_file": "e.tsv"})
    assert load_recipe(base).data.data_dir == str(tmp_path / "abs")


def test_data_dir_defaults_to_the_variable_else_the_recipe_files_folder(tmp_path, monkeypatch):
    from hf_modelopt.recipe import load_recipe, validate_recipe

    recipe = _recipe_file(tmp_path / "r" / "r.yaml", {"eval_file": "e.tsv"})
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_MODELOPT_DATA_DIR", raising=False)
    assert load_recipe(recipe).data.data_dir == str(tmp_path / "r")
    assert DataConfig().data_dir == "."  # from Python: the current directory
    monkeypatch.setenv("HF_MODELOPT_DATA_DIR", "/data/here")
    assert load_recipe(recipe).data.data_dir == "/data/here"
    assert validate_recipe({"model": {"name_or_path": "m"}, "task": "text-classification", "data": {},
                            "stages": ["evaluate"]}).data.data_dir == "/data/here"


def test_shipped_recipes_find_the_example_data_from_any_directory(tmp_path, monkeypatch):
    from hf_modelopt.recipe import load_recipe

    from .conftest import REPO

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_MODELOPT_DATA_DIR", "/elsewhere")  # a recipe that names its data_dir keeps it
    for path in (REPO / "recipes").rglob("*.yaml"):
        if path.parent.name != "accelerate":
            expected = REPO / "digits-data" if path.parent.name == "digits-vit" else REPO.parent / "shared" / "data"
            assert load_recipe(path).data.data_dir == str(expected), path


def test_the_fingerprint_does_not_depend_on_where_the_data_is(sst2_files, tmp_path):
    import shutil

    from hf_modelopt.pipeline import recipe_fingerprint
    from hf_modelopt.recipe import validate_recipe

    from .conftest import tiny_recipe

    copy = shutil.copytree(sst2_files, tmp_path / "moved" / "data")
    first, moved = (validate_recipe(tiny_recipe(tmp_path / "model", folder)) for folder in (sst2_files, copy))
    assert first.data.data_dir != moved.data.data_dir
    assert recipe_fingerprint(first) == recipe_fingerprint(moved)
    (copy / "sst2" / "train.tsv").write_text("sentence\tlabel\nother\t1\n")
    assert recipe_fingerprint(validate_recipe(tiny_recipe(tmp_path / "model", copy))) != recipe_fingerprint(first)
