"""Fresh-process reload of exported models: `python -m tests.matrix.reload_worker MANIFEST.json`.

The manifest lists `{model_type, folder, auto_class, loads_with, logits_file}`. Folders that load with plain
transformers load first, while hf_modelopt is not imported (proving they need nothing else); then
`import hf_modelopt` and the rest. Each model's logits on the matrix's fixed inputs go to its `logits_file`.
"""

from __future__ import annotations

import json
import sys

import torch
import transformers

from tests.matrix.common import logits_of


def main(manifest_path: str) -> None:
    entries = json.loads(open(manifest_path).read())
    entries.sort(key=lambda entry: entry["loads_with"] == "hf_modelopt")
    for entry in entries:
        if entry["loads_with"] == "hf_modelopt":
            import hf_modelopt  # noqa: F401  (registers its loading hook with transformers)
        else:
            assert "hf_modelopt" not in sys.modules, "a plain-transformers folder must load without hf_modelopt"
        model = getattr(transformers, entry["auto_class"]).from_pretrained(entry["folder"])
        torch.save(logits_of(model.eval(), entry["model_type"]), entry["logits_file"])


if __name__ == "__main__":
    main(sys.argv[1])
