"""Optional packages (`hf_modelopt.extras`): the table matches pyproject.toml, nothing imports them eagerly, and a
missing one is refused in one line naming the `pip install 'hf-modelopt[extra]'` that brings it, before any work.

A package is hidden the way a missing one looks to Python: `sys.modules[name] = None` makes `import name` raise
ImportError and `importlib.util.find_spec(name)` return None, without uninstalling anything.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml

from hf_modelopt.cli import main
from hf_modelopt.extras import EXTRAS, MissingExtraError, extra_of, installed, require_extra

from .conftest import REPO, tiny_recipe

if sys.version_info >= (3, 11):
    import tomllib
else:  # the test extra brings tomli there
    import tomli as tomllib

ALL_OPTIONAL = [module for packages in EXTRAS.values() for module in packages]


def hide(monkeypatch, *modules):
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)


def _name(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower().replace("_", "-")


def test_table_matches_pyproject():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    gathering = {"all", "test"}  # extras that only gather others (and the test tools)
    assert set(EXTRAS) == set(extras) - gathering
    for extra, requirements in extras.items():
        own = {_name(r) for r in requirements if not r.startswith("hf-modelopt[")}
        included = [e for r in requirements if r.startswith("hf-modelopt[") for e in r[12:-1].split(",")]
        assert set(included) <= set(extras), (extra, included)
        if extra not in gathering:
            assert own == {_name(d) for d in EXTRAS[extra].values()}, extra
    # The test extra brings every optional package, so the default suite skips nothing for want of one.
    brought, todo = set(), ["test"]
    while todo:
        extra = todo.pop()
        brought.add(extra)
        todo += [e for r in extras[extra] if r.startswith("hf-modelopt[") for e in r[12:-1].split(",")
                 if e not in brought]
    assert set(EXTRAS) <= brought


def test_core_dependencies_leave_the_optional_packages_out():
    core = {_name(r) for r in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]}
    assert not core & {_name(d) for packages in EXTRAS.values() for d in packages.values()}


def test_every_optional_package_is_installed_here():
    # `pip install -e .[test]` brings them all: a test environment without one is incomplete, not a reason to skip.
    assert [module for module in ALL_OPTIONAL if not installed(module)] == []


def test_hf_modelopt_imports_and_validates_recipes_without_any_optional_package(tmp_path):
    # Every module of the package imports with all optional packages hidden: they are imported lazily only.
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tmp_path / "model", tmp_path / "data",
                                                 stages=["finetune", "quantize_storage", "export"])))
    code = (f"import sys; sys.modules.update(dict.fromkeys({ALL_OPTIONAL!r})); "
            "import pkgutil, importlib, hf_modelopt; "
            "[importlib.import_module(m.name) for m in pkgutil.walk_packages(hf_modelopt.__path__, 'hf_modelopt.')]; "
            f"from hf_modelopt.recipe import load_recipe; load_recipe({str(recipe)!r}); print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_require_extra_names_the_package_and_the_extra(monkeypatch):
    require_extra("anything", *ALL_OPTIONAL)  # all installed: nothing to say
    hide(monkeypatch, "rouge_score", "sacrebleu")
    with pytest.raises(MissingExtraError) as caught:
        require_extra("seq2seq metrics", "rouge_score", "sacrebleu", "matplotlib")
    assert str(caught.value) == "seq2seq metrics needs rouge_score and sacrebleu (pip install 'hf-modelopt[seq2seq]')"
    assert extra_of("PIL") == "tasks" and extra_of("compressed_tensors") == "compressed-tensors"


# --------------------------------------------------------------------------- recipes: refused before any work


def refused(tmp_path, capsys, data) -> str:
    """Run `data` through the CLI; assert one `error:` line, exit code 2 and no output folder; return the line."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(data))
    capsys.readouterr()
    assert main(["run", str(recipe), "--output-dir", str(tmp_path / "out")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    assert not (tmp_path / "out").exists()
    return errors[0]


# (hidden package, recipe changes, the error line's end). The model and data need not exist: the packages are
# checked first, before any file is read.
CASES = {
    "quantize": ("bitsandbytes", {"stages": ["quantize"]},
                 "stages[0]: the quantize stage needs bitsandbytes (pip install 'hf-modelopt[bnb]')"),
    "recovery": ("peft", {"stages": [{"type": "quantize", "method": "nf4", "recovery": {}}]},
                 "stages[0].recovery: the quantize stage's recovery needs peft (pip install 'hf-modelopt[quant]')"),
    "sensitivity": ("matplotlib", {"stages": [{"type": "quantize", "sensitivity": {"keep_fraction": 0.1}}]},
                    "stages[0].sensitivity: the quantize stage's sensitivity needs matplotlib "
                    "(pip install 'hf-modelopt[plots]')"),
    "storage": ("compressed_tensors", {"stages": ["quantize_storage"]},
                "stages[0].format: the quantize_storage stage's format needs compressed-tensors "
                "(pip install 'hf-modelopt[compressed-tensors]')"),
    "gguf": ("gguf", {"task": "causal-lm", "model": {"name_or_path": "org/model-gguf", "gguf_file": "m.gguf"}},
             "model.gguf_file: a GGUF model needs gguf (pip install 'hf-modelopt[gguf]')"),
    "seq2seq": ("sacrebleu", {"task": "seq2seq", "stages": ["evaluate"]},
                "task: the seq2seq task needs sacrebleu (pip install 'hf-modelopt[seq2seq]')"),
    "token-classification": ("seqeval", {"task": "token-classification", "stages": ["evaluate"]},
                             "task: the token-classification task needs seqeval (pip install 'hf-modelopt[tasks]')"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_recipe_needing_a_missing_extra_is_refused_before_any_work(case, tmp_path, capsys, monkeypatch):
    hidden, changes, expected = CASES[case]
    hide(monkeypatch, hidden)
    data = tiny_recipe(tmp_path / "no-model", tmp_path / "no-data", **changes)
    assert refused(tmp_path, capsys, data) == f"error: {tmp_path / 'r.yaml'}: {expected}"


def test_storage_in_hf_modelopts_format_needs_no_compressed_tensors(tmp_path, monkeypatch):
    from hf_modelopt.pipeline import check_packages
    from hf_modelopt.recipe import validate_recipe

    hide(monkeypatch, "compressed_tensors")
    data = tiny_recipe(tmp_path, tmp_path, stages=[{"type": "quantize_storage", "format": "hf_modelopt"}])
    check_packages(validate_recipe(data))


def test_a_saved_bitsandbytes_model_needs_bitsandbytes(tmp_path, capsys, monkeypatch):
    model = tmp_path / "bnb-model"
    model.mkdir()
    (model / "config.json").write_text('{"quantization_config": {"quant_method": "bitsandbytes"}}')
    hide(monkeypatch, "bitsandbytes")
    line = refused(tmp_path, capsys, tiny_recipe(model, tmp_path / "no-data", stages=["evaluate"]))
    assert line.endswith("model.name_or_path: a bitsandbytes model needs bitsandbytes (pip install 'hf-modelopt[bnb]')")
    # The commands that load a model say the same before loading it.
    for command in (["inspect", str(model)], ["bench", str(model)]):
        assert main(command) == 2
        assert capsys.readouterr().err.strip() == (f"error: {model}: a bitsandbytes model needs bitsandbytes "
                                                   "(pip install 'hf-modelopt[bnb]')")
    hide(monkeypatch, "gguf")
    assert main(["inspect", "org/model-gguf", "--gguf-file", "m.gguf"]) == 2
    assert "a GGUF model needs gguf (pip install 'hf-modelopt[gguf]')" in capsys.readouterr().err


# --------------------------------------------------------------------------- Python verbs: refused when called


def test_python_verbs_refuse_a_missing_extra_when_called(tmp_path, monkeypatch):
    from hf_modelopt import QuantizationConfig, evaluate_model, quantize, save_compressed
    from hf_modelopt.modeling import ModelConfig, load_model
    from hf_modelopt.quant import StorageQuantizationConfig

    hide(monkeypatch, *ALL_OPTIONAL)
    # No model is needed to be refused: the check comes before anything touches it.
    with pytest.raises(MissingExtraError, match=r"^quantize\(\) needs bitsandbytes \(pip install 'hf-modelopt\[bnb\]'"):
        quantize(None, QuantizationConfig())
    with pytest.raises(MissingExtraError, match=r"compressed-tensors format needs compressed-tensors \(pip install "
                                                r"'hf-modelopt\[compressed-tensors\]'\)$"):
        save_compressed(None, tmp_path / "out", storage=StorageQuantizationConfig())
    assert not (tmp_path / "out").exists()
    with pytest.raises(MissingExtraError, match=r"needs rouge_score and sacrebleu \(pip install 'hf-modelopt\[seq2seq"):
        evaluate_model(None, None, [], task="seq2seq")
    with pytest.raises(MissingExtraError, match=r"a GGUF model needs gguf \(pip install 'hf-modelopt\[gguf\]'\)$"):
        load_model(ModelConfig(name_or_path="org/model", gguf_file="m.gguf"), "causal-lm")
