import pytest

from hf_modelopt.stages import STAGES, StageConfig, load_builtin_stages, register_stage


def test_builtin_stages_are_registered():
    load_builtin_stages()
    assert {"finetune", "evaluate", "export"} <= set(STAGES)
    assert STAGES["evaluate"].changes_model is False and STAGES["finetune"].changes_model is True


def test_a_name_cannot_be_registered_twice():
    load_builtin_stages()
    with pytest.raises(ValueError, match="already registered"):
        register_stage("finetune", StageConfig)(lambda state, config, context: state)


def test_stage_configs_reject_unknown_keys():
    load_builtin_stages()
    with pytest.raises(Exception, match="extra"):
        STAGES["evaluate"].config_cls.model_validate({"batchsize": 3})


def test_a_new_stage_plugs_in_through_the_registry(tiny_models, sst2_files, tmp_path):
    """The README's example stage: registered once, validated from a recipe, run, saved and exported."""
    from safetensors.torch import load_file

    from hf_modelopt.pipeline import run_recipe
    from hf_modelopt.recipe import validate_recipe
    from hf_modelopt.stages import ensure_loaded

    from ..conftest import tiny_recipe

    class ZeroBiasesConfig(StageConfig):
        """Set every bias to zero."""

    if "zero_biases" not in STAGES:
        @register_stage("zero_biases", ZeroBiasesConfig)
        def zero_biases(state, config, context):
            ensure_loaded(state, context.settings)
            for name, parameter in state.model.named_parameters():
                if name.endswith("bias"):
                    parameter.data.zero_()
            return state

    recipe = validate_recipe(tiny_recipe(tiny_models("bert"), sst2_files, stages=["zero_biases", "evaluate"]))
    run_recipe(recipe, tmp_path / "out")
    weights = load_file(tmp_path / "out" / "model.safetensors")
    biases = [v for k, v in weights.items() if k.endswith("bias")]
    assert biases and all(not b.any() for b in biases)
    assert (tmp_path / "out" / "stages" / "zero_biases" / "stage.json").is_file()


PLUGIN_MODULE = '''
from hf_modelopt import register_stage
from hf_modelopt.stages import StageConfig, ensure_loaded


class ScaleEmbeddingsConfig(StageConfig):
    """Multiply the word embeddings by a factor."""

    factor: float = 0.0


@register_stage("scale_embeddings", ScaleEmbeddingsConfig)
def scale_embeddings(state, config, context):
    ensure_loaded(state, context.settings)
    embeddings = state.model.get_input_embeddings().weight
    embeddings.data.mul_(config.factor)
    return state
'''


def install_plugin(folder):
    """A third-party package as pip would leave it: its module, and dist-info declaring the entry point."""
    folder.mkdir(parents=True)
    (folder / "hfmo_demo_plugin.py").write_text(PLUGIN_MODULE)
    info = folder / "hfmo_demo_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: hfmo-demo-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[hf_modelopt.stages]\nscale_embeddings = hfmo_demo_plugin\n")
    return folder


def test_a_third_party_stage_registers_through_an_entry_point_and_runs_from_the_cli(tiny_models, sst2_files,
                                                                                    tmp_path):
    import json
    import os
    import subprocess
    import sys

    import yaml
    from safetensors.torch import load_file

    from ..conftest import REPO, tiny_recipe

    plugin = install_plugin(tmp_path / "site")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{plugin}{os.pathsep}{REPO}"}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "hf_modelopt.cli", *map(str, args)], capture_output=True,
                              text=True, env=env, cwd=REPO)

    listed = cli("stages", "--json")
    assert listed.returncode == 0, listed.stderr[-2000:]
    rows = {row["stage"]: row for row in json.loads(listed.stdout)}
    assert rows["scale_embeddings"]["module"] == "hfmo_demo_plugin"
    assert {"finetune", "distill", "prune", "quantize", "export"} <= set(rows)

    stages = [{"type": "scale_embeddings", "factor": 0.5}, {"type": "export", "verify": False}]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tiny_models("bert"), sst2_files, stages=stages)))
    run = cli("run", recipe, "--output-dir", tmp_path / "out")
    assert run.returncode == 0, run.stderr[-3000:]
    before = load_file(tiny_models("bert") / "model.safetensors")
    after = load_file(tmp_path / "out" / "model.safetensors")
    key = next(k for k in before if k.endswith("word_embeddings.weight"))
    assert (after[key] - 0.5 * before[key]).abs().max() < 1e-6
    assert json.loads((tmp_path / "out" / "stages" / "scale_embeddings" / "stage.json").read_text())["config"][
        "factor"] == 0.5
    # Without the package installed, the same recipe names the unknown stage before any work.
    env["PYTHONPATH"] = str(REPO)
    missing = cli("run", recipe, "--output-dir", tmp_path / "out2")
    assert missing.returncode == 2 and "unknown stage 'scale_embeddings'" in missing.stderr
    assert not (tmp_path / "out2").exists()


def test_each_stage_config_is_its_technique_config_plus_stage_fields():
    """One config class per technique: YAML validates into a subclass of what Python users build, so a key
    left out of a recipe and an argument left out in Python get the same default."""
    from hf_modelopt import (
        DistillationConfig,
        OneShotPruningConfig,
        PruningConfig,
        QuantizationConfig,
        StructuredPruningConfig,
    )
    from hf_modelopt.distill import KnowledgeDistillationConfig
    from hf_modelopt.export import ExportConfig
    from hf_modelopt.prune import ExpertRemovalConfig
    from hf_modelopt.prune.minitron import MinitronConfig
    from hf_modelopt.quant import StorageQuantizationConfig

    load_builtin_stages()
    technique_of = {"distill": KnowledgeDistillationConfig, "prune": PruningConfig,
                    "prune_structured": StructuredPruningConfig, "prune_oneshot": OneShotPruningConfig,
                    "quantize": QuantizationConfig, "quantize_storage": StorageQuantizationConfig,
                    "export": ExportConfig, "prune_experts": ExpertRemovalConfig, "minitron": MinitronConfig}
    required = {"prune": {"sparsity": 0.5}, "prune_structured": {"heads": 0.5}, "distill": {"student": {"every": 2}},
                "prune_experts": {"experts": 2}, "minitron": {"num_hidden_layers": 2}}
    for stage, technique in technique_of.items():
        stage_cls = STAGES[stage].config_cls
        assert issubclass(stage_cls, technique), stage
        from_yaml = stage_cls.model_validate(required.get(stage, {}))
        from_python = technique(**{k: v for k, v in required.get(stage, {}).items() if k in technique.model_fields})
        assert from_yaml.model_dump(include=set(technique.model_fields)) == from_python.model_dump(), stage
    assert issubclass(KnowledgeDistillationConfig, DistillationConfig)
    loss = KnowledgeDistillationConfig(cache_teacher_logits=True).loss()
    assert type(loss) is DistillationConfig and loss == DistillationConfig()
