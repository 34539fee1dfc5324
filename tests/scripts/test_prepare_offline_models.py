import os
import subprocess
import sys

from ..conftest import REPO, minilm_folder


def test_shipped_model_loads_by_hub_id_from_a_fresh_cache(tmp_path):
    minilm_folder()  # fails, naming the fix, when the example model package is missing
    cache = tmp_path / "hub"
    subprocess.run([sys.executable, "scripts/prepare_offline_models.py", "--cache-dir", str(cache)], cwd=REPO,
                   check=True, capture_output=True)
    assert (cache / "models--sentence-transformers--all-MiniLM-L6-v2" / "refs" / "main").is_file()
    code = ("from transformers import AutoConfig, AutoTokenizer; "
            "c = AutoConfig.from_pretrained('sentence-transformers/all-MiniLM-L6-v2'); "
            "t = AutoTokenizer.from_pretrained('sentence-transformers/all-MiniLM-L6-v2'); print(c.num_hidden_layers)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0 and result.stdout.strip() == "6", result.stderr[-2000:]
