"""Model cards rendered with huggingface_hub's `ModelCard` from the templates in `model_cards/`."""

from __future__ import annotations

import logging
import math
from pathlib import Path

from ..inspection import human_bytes, size_on_disk

logger = logging.getLogger("hf_modelopt")

TEMPLATES = Path(__file__).resolve().parents[2] / "model_cards"
PIPELINE_TAGS = {"text-classification": "text-classification", "causal-lm": "text-generation"}
LOADERS = {"text-classification": "AutoModelForSequenceClassification", "causal-lm": "AutoModelForCausalLM"}


def _base_license(recipe) -> str | None:
    """The base model's license, read from its model card (local folder or HF cache; no download)."""
    from huggingface_hub import ModelCard, try_to_load_from_cache

    spec = recipe.model
    if spec.is_local:
        readme = Path(spec.name_or_path) / "README.md"
    else:
        cached = try_to_load_from_cache(spec.name_or_path, "README.md", revision=spec.revision)
        readme = Path(cached) if isinstance(cached, str) else None
    if readme is None or not readme.is_file():
        return None
    try:
        return ModelCard.load(readme).data.to_dict().get("license")
    except Exception as err:  # a malformed upstream card must not fail the export
        logger.warning("could not read the license from %s: %s", readme, err)
        return None


def _parameter_count(folder: Path) -> int:
    """Parameters stored in the safetensors files of `folder`, read from their headers only."""
    from safetensors import safe_open

    total = 0
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as weights:
            total += sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())
    return total


def _quantization(model_dir: Path) -> dict | None:
    """The `quantize` stage's report (`quantization.json`, saved with the model), if the model is quantized."""
    import json

    report = model_dir / "quantization.json"
    return json.loads(report.read_text()) if report.is_file() else None


def _format(value: float) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def render_model_card(recipe, history: list[dict], model_dir: Path, template: str = "default.md"):
    """A `ModelCard` for the model in `model_dir`, from the run's stage records."""
    from huggingface_hub import ModelCard, ModelCardData

    evaluations = [r for r in history if r["type"] == "evaluate" and r.get("metrics")]
    metric_names = list(dict.fromkeys(k for r in evaluations for k in r["metrics"]))
    rows = [{"model": f"`{r['model']}` (stage `{r['name']}`)",
             "values": [_format(r["metrics"].get(k, "-")) for k in metric_names]} for r in evaluations]
    stage_types = [r["type"] for r in history]
    base = recipe.model.name_or_path
    data = recipe.data
    eval_data = f"`{data.eval_file}`" if data.eval_file else f"`{data.dataset}` ({data.eval_split})"
    card_data = ModelCardData(
        base_model=None if recipe.model.is_local else base,
        license=_base_license(recipe),
        library_name="transformers",
        pipeline_tag=PIPELINE_TAGS[recipe.task],
        tags=["hf-modelopt", *dict.fromkeys(t for t in stage_types if t not in ("evaluate", "export"))],
    )
    load_code = (f"from transformers import AutoTokenizer, {LOADERS[recipe.task]}\n\n"
                 f"model = {LOADERS[recipe.task]}.from_pretrained(\"PATH_OR_REPO_ID\")\n"
                 f"tokenizer = AutoTokenizer.from_pretrained(\"PATH_OR_REPO_ID\")")
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATES / template),
        model_name=f"{Path(base).name} ({', '.join(dict.fromkeys(stage_types))})",
        summary=f"A `{recipe.task}` model.",
        base_model=base,
        base_model_url=base if recipe.model.is_local else f"https://huggingface.co/{base}",
        description=recipe.description.strip(),
        eval_data=eval_data,
        metric_names=metric_names,
        metric_rows=rows,
        parameters=f"{_parameter_count(model_dir):,}",
        size_on_disk=human_bytes(size_on_disk(model_dir)),
        load_code=load_code,
        quantization=_quantization(model_dir),
        stage_list=", ".join(f"`{r['name']}` ({r['type']})" for r in history),
        recipe_yaml=recipe.to_yaml(),
        limitations="Metrics were measured on the evaluation data named above only; check the model on your own "
                    "data before relying on it.",
    )
