import json
import subprocess
import sys

import pytest
import yaml

from ..conftest import REPO, tiny_recipe


@pytest.mark.slow  # builds and measures 7 models with peak-memory processes: about a minute on 2 cores
def test_peers_are_built_and_measured_beside_ours(wide_tiny_models, tiny_models, sst2_files, tmp_path):
    base = wide_tiny_models("bert")
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(base, sst2_files)))
    command = [sys.executable, "scripts/benchmark_peers.py", "--recipe", str(recipe), "--base", str(base),
               "--ours", f"other={tiny_models('bert')}", "--ce-student", str(tiny_models("distilbert")),
               "--prune-sparsities", "0.5", "--output-dir", str(tmp_path / "b"), "--repeats", "2",
               "--batch-sizes", "2"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "b" / "bench.json").read_text())
    rows = {row["name"]: row for row in result["models"]}
    assert list(rows) == ["base (reference)", "hf-modelopt other", "peer: CE-only student", "peer: torch prune 50%",
                          "peer: torch dynamic int8", "peer: bitsandbytes int8", "peer: bitsandbytes nf4"]
    assert all(row["peak_memory_mb"] > 0 and row["metrics"]["eval_samples"] == 32 for row in rows.values())
    # the tiny model is mostly its (unquantized) embedding matrix; its block Linear weights are 0.26 MB in fp32
    base_mb = rows["base (reference)"]["size_mb"]
    assert rows["peer: bitsandbytes nf4"]["size_mb"] < base_mb - 0.2
    assert rows["peer: bitsandbytes int8"]["size_mb"] < base_mb - 0.15
    assert "scripts/benchmark_peers.py" in result["setup"]["command"]
    # torch's pruning really zeroed half of the block Linear weights (saved dense, so no smaller on disk)
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "b" / "peers" / "torch-prune-0.5" / "model.safetensors")
    block = [w for name, w in weights.items() if ".layer." in name and name.endswith("dense.weight")
             or name.endswith(("query.weight", "key.weight", "value.weight"))]
    zeros = sum(int((w == 0).sum()) for w in block) / sum(w.numel() for w in block)
    assert 0.45 < zeros < 0.55
