#!/bin/bash
# GPU checks, to run when a GPU machine is lent (device tool): FSDP2 and DeepSpeed ZeRO-3 smoke tests of
# distillation + gradual pruning on a tiny BERT, one process per GPU, and a teacher spread over the GPUs
# (teacher_device_map) in one process. A check passes when its run finishes and the saved model has the
# requested sparsity (the teacher check: the log says where the teacher went). Writes a summary to
# ${OUT:-/tmp}/gpu_check.txt.
# Usage: bash scripts/gpu_check.sh     (from the repository root, hf-modelopt installed)
set -uo pipefail
out=${OUT:-/tmp}/gpu-check
mkdir -p "$out"
summary=${OUT:-/tmp}/gpu_check.txt
: > "$summary"
export HF_HUB_OFFLINE=1
gpus=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -lt 1 ]; then echo "no GPU: nothing to check" | tee -a "$summary"; exit 1; fi

# A tiny BERT, a small SST-2 sample and a distill + prune recipe.
python - "$out" <<'PY'
import sys, yaml
from pathlib import Path
sys.path.insert(0, ".")
from tests.conftest import build_tiny_model, tiny_recipe
out = Path(sys.argv[1])
model = build_tiny_model("bert", "text-classification", out / "bert")
data = out / "data" / "sst2"
data.mkdir(parents=True, exist_ok=True)
for name, rows in (("train.tsv", 256), ("validation.tsv", 64)):
    lines = Path("../shared/data/sst2", name).read_text().splitlines()[: rows + 1]
    (data / name).write_text("\n".join(lines) + "\n")
stages = [{"type": "prune", "sparsity": 0.8, "schedule": {"end_step": 10, "update_every": 2},
           "distillation": {"kd_weight": 1.0, "ce_weight": 0.5}, "training": {"max_steps": 16}},
          {"type": "evaluate"}]
(out / "recipe.yaml").write_text(yaml.safe_dump(tiny_recipe(model, out / "data", stages=stages)))
# A teacher spread over the devices (teacher_device_map), live KD into a one-layer student.
stages = [{"type": "distill", "student": {"layers": [0]}, "ce_weight": 0.5, "hidden_weight": 1.0,
           "teacher_device_map": "auto", "training": {"max_steps": 8}}, {"type": "evaluate"}]
(out / "teacher-map.yaml").write_text(yaml.safe_dump(tiny_recipe(model, out / "data", stages=stages)))
PY

check() {  # name, accelerate config
  local name=$1 config=$2
  rm -rf "$out/$name"
  if accelerate launch --config_file "$config" --num_processes "$gpus" scripts/run_recipe.py "$out/recipe.yaml" \
       --output-dir "$out/$name" > "$out/$name.log" 2>&1; then
    python - "$out/$name" "$name" >> "$summary" <<'PY'
import sys
from transformers import AutoModelForSequenceClassification
from hf_modelopt.prune.masks import prunable_linears, sparsity_of
model = AutoModelForSequenceClassification.from_pretrained(sys.argv[1])
sparsity = sparsity_of(prunable_linears(model))
print(f"{sys.argv[2]}: {'PASS' if abs(sparsity - 0.8) < 1e-3 else 'FAIL'} (saved sparsity {sparsity:.4f})")
PY
  else
    echo "$name: FAIL (see $out/$name.log): $(tail -1 "$out/$name.log")" >> "$summary"
  fi
}

check ddp recipes/accelerate/gpu-ddp.yaml
check fsdp2 recipes/accelerate/fsdp2.yaml
if python -c "import deepspeed" 2>/dev/null; then
  check zero3 recipes/accelerate/deepspeed-zero3.yaml
else
  echo "zero3: SKIPPED (deepspeed is not installed)" >> "$summary"
fi
# One process (the teacher spread over every GPU; the student on GPU 0).
rm -rf "$out/teacher-map"
if python scripts/run_recipe.py "$out/teacher-map.yaml" --output-dir "$out/teacher-map" > "$out/teacher-map.log" 2>&1 \
     && grep -q "teacher spread over" "$out/teacher-map.log"; then
  echo "teacher-map: PASS ($(grep -o 'teacher spread over.*' "$out/teacher-map.log" | head -1))" >> "$summary"
else
  echo "teacher-map: FAIL (see $out/teacher-map.log): $(tail -1 "$out/teacher-map.log")" >> "$summary"
fi
cat "$summary"
