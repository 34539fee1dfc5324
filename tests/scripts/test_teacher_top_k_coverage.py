import json
import subprocess
import sys

import pytest
import yaml

from ..conftest import REPO, tiny_recipe


def coverage(recipe, top_k: int) -> dict:
    done = subprocess.run([sys.executable, "scripts/teacher_top_k_coverage.py", str(recipe), "--top-k", str(top_k)],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout[done.stdout.index("{"):])


def test_coverage_of_the_top_k_on_whole_evaluation_windows(tiny_models, sst2_files, tmp_path):
    from transformers import AutoModelForCausalLM

    from hf_modelopt.data import load_split
    from hf_modelopt.recipe import load_recipe
    from hf_modelopt.stages import ModelState, ensure_loaded
    from hf_modelopt.tasks.causal_lm import eval_token_ids, eval_windows, evaluate_perplexity

    model = tiny_models("llama", "causal-lm")
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(model, sst2_files, task="causal-lm", stages=[{"type": "evaluate"}])))
    loaded = load_recipe(recipe)
    data = loaded.data
    ids = eval_token_ids(load_split(data, "eval"), ensure_loaded(ModelState(), loaded).tokenizer, data)
    whole = [token for w in eval_windows(ids, data.eval_window) if len(w) == data.eval_window for token in w]
    assert len(whole) >= 2 * data.eval_window  # (else the check below says little)
    perplexity = evaluate_perplexity(AutoModelForCausalLM.from_pretrained(model), whole, data.eval_window,
                                     data.eval_batch_size)["perplexity"]

    some = coverage(recipe, 8)
    assert some["tokens"] == len(whole) // data.eval_window * (data.eval_window - 1)
    assert some["perplexity"] == pytest.approx(perplexity, abs=0.01)
    assert 0 < some["labels_in_top_k"] < 1 and 0 < some["mean_probability_outside_top_k"] < 1
    assert 0 < some["nll_share_outside_top_k"] < 1
    every = coverage(recipe, AutoModelForCausalLM.from_pretrained(model).config.vocab_size)
    assert every["labels_in_top_k"] == 1 and every["nll_share_outside_top_k"] == 0
    assert every["mean_probability_outside_top_k"] == pytest.approx(0, abs=1e-4)
