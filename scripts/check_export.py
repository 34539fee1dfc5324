"""Check an export folder as a user would: the card's YAML parses, and the card's own loading code, run as is in
a fresh process, loads a model whose metrics on the export's recipe equal `export.json` and the card's table.

    python scripts/check_export.py OUTPUT
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

MEASURE = """
import json, sys
from hf_modelopt.metrics import evaluate_model
from hf_modelopt.recipe import load_recipe
recipe = load_recipe(sys.argv[1])
print(json.dumps(evaluate_model(model, tokenizer, recipe.data, task=recipe.task)))
"""


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="an export folder (OUTPUT of hf-modelopt run)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from huggingface_hub import ModelCard

    out = Path(make_parser().parse_args(argv).folder).resolve()
    card = ModelCard.load(out / "README.md")
    print("card metadata:", card.data.to_dict())
    record = json.loads((out / "export.json").read_text())
    code = card.text.split("```python\n", 1)[1].split("```", 1)[0]
    run = subprocess.run([sys.executable, "-c", code + MEASURE, str(out / "recipe.yaml")], capture_output=True,
                         text=True)
    if run.returncode != 0:
        print(run.stderr[-3000:], file=sys.stderr)
        return 1
    fresh = json.loads(run.stdout.strip().splitlines()[-1])
    rows = re.findall(r"^\| ([^|]+) \| ([^|]+) \| ([^|]+) \|$", card.text.split("## Results", 1)[1], re.M)
    table = {label: after for label, _, after in rows}
    same = fresh == record["metrics"]
    for name, value in fresh.items():
        if name in table:
            same &= table[name] == f"{value:.4f}"
            print(f"{name}: card {table[name]}, fresh process {value:.6f}")
    print("fresh-process metrics equal export.json and the card:", same)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
