"""The README's Python example runs as printed (with a tiny teacher for `t` and 2 steps instead of 500)."""

import json
import re
import subprocess
import sys

from .conftest import REPO


def readme_python_example() -> str:
    text = (REPO / "README.md").read_text()
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


def test_readme_python_example_runs(tmp_path):
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from .conftest import minilm_folder, write_small_data

    # Its ../shared/data: 64 rows of it (or made-up rows where the folder is not beside the repository).
    data = write_small_data(tmp_path / "data")
    teacher = tmp_path / "t"
    tokenizer = AutoTokenizer.from_pretrained(minilm_folder())
    config = AutoConfig.for_model("bert", vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=6,
                                  num_attention_heads=2, intermediate_size=64, num_labels=2)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    code = readme_python_example()
    assert code.count('"t"') == 2 and "max_steps=500" in code
    code = (code.replace('"t"', json.dumps(str(teacher))).replace("max_steps=500", "max_steps=2")
            .replace('"kd"', json.dumps(str(tmp_path / "kd"))).replace('"student"', json.dumps(str(tmp_path / "s")))
            .replace("../shared/data", str(data)))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    student = AutoModelForSequenceClassification.from_pretrained(tmp_path / "s")
    assert student.config.num_hidden_layers == 3
