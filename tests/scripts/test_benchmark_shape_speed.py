import json
import subprocess
import sys

import pytest
import yaml

from ..conftest import REPO, tiny_recipe


def test_each_shape_is_timed_against_the_models_own(tiny_models, sst2_files, tmp_path):
    # The tiny Llama: 2 blocks, hidden 32, FFN 64, 4 query heads in 2 key/value groups, head_dim 8, untied.
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tiny_models("llama", "causal-lm"), sst2_files, task="causal-lm",
                                                 stages=[{"type": "evaluate"}])))
    command = [sys.executable, "scripts/benchmark_shape_speed.py", str(recipe), "1/32/16/2/1", "2/24/64/4/2",
               "--batch-sizes", "1", "3", "--new-tokens", "5", "--prompt-tokens", "6", "--repeats", "2",
               "--output-dir", str(tmp_path / "s")]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "s" / "shape-speed.json").read_text())
    rows = result["rows"]
    assert [(row["batch_size"], row["shape"], row["own"]) for row in rows] == [
        (b, shape, own) for b in (1, 3) for shape, own in (("2/32/64/4/2", True), ("1/32/16/2/1", False),
                                                           ("2/24/64/4/2", False))]
    parameters = {row["shape"]: row["parameters"] for row in rows}
    # Untied embeddings and LM head (vocab 30522), then per block q and o (hidden x heads x 8), k and v (hidden x
    # kv_heads x 8), gate / up / down (hidden x FFN) and two norms; the final norm.
    assert parameters["1/32/16/2/1"] == 2 * 30522 * 32 + (2 * 32 * 16 + 2 * 32 * 8 + 3 * 32 * 16 + 2 * 32) + 32
    assert parameters["2/24/64/4/2"] == 2 * 30522 * 24 + 2 * (2 * 24 * 32 + 2 * 24 * 16 + 3 * 24 * 64 + 2 * 24) + 24
    for row in rows:
        assert len(row["all_seconds"]) == 2
        assert row["tokens_per_second"] == row["batch_size"] * 5 / row["seconds"]
        own = next(r for r in rows if r["own"] and r["batch_size"] == row["batch_size"])
        assert row["speedup"] == own["seconds"] / row["seconds"]
    assert (tmp_path / "s" / "shape-speed.md").read_text().count("\n| ") == 1 + 6  # header, rows


@pytest.mark.parametrize("shape, message", [
    ("2/32/37", "'2/32/37': give a shape as layers/hidden/ffn/heads/kv_heads"),
    ("2/32/128/4/2", "2/32/128/4/2: Minitron pruning: intermediate_size=128 is larger than the model's 64"),
    ("2/32/64/3/2", "must be a multiple of num_key_value_heads=2"),
])
def test_a_shape_pruning_cannot_reach_is_refused_in_one_line(tiny_models, sst2_files, tmp_path, shape, message):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tiny_models("llama", "causal-lm"), sst2_files, task="causal-lm",
                                                 stages=[{"type": "evaluate"}])))
    done = subprocess.run([sys.executable, "scripts/benchmark_shape_speed.py", str(recipe), shape], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 2 and message in done.stderr.splitlines()[-1], done.stderr[-2000:]
