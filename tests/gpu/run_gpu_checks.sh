#!/usr/bin/env bash
# The CUDA checks (tests/gpu/gpu_checks.py) on a machine with a GPU: run from the repository root, with a Python that
# has torch (CUDA), transformers and accelerate. No install: src/ goes on PYTHONPATH. Under 10 minutes; exit 1 when
# a check failed. On a machine without CUDA every check reports "skipped".
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 - <<'PY'
import importlib.util
missing = [m for m in ("torch", "transformers", "accelerate", "safetensors", "filelock", "psutil", "rich", "xxhash")
           if importlib.util.find_spec(m) is None]
if missing:
    raise SystemExit(f"missing Python packages: {', '.join(missing)}")
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
status=0
timeout 360 python3 tests/gpu/gpu_checks.py || status=1

# FSDP2 on CUDA with NCCL, every GPU here (at most 2): the sharded scenarios of the CPU suite (train, resume, a
# damaged shard, a NaN put into a weight's local shard before a save), all_guards() attached.
if python3 -c "import torch, datasets, tokenizers; assert torch.cuda.is_available()" 2>/dev/null; then
    gpus=$(python3 -c "import torch; print(min(2, torch.cuda.device_count()))")
    work=$(mktemp -d)
    mkdir -p "$work/reports"
    if TRAINGUARD_TEST_ON_GPU=1 PYTHONPATH="$PWD/tests:$PYTHONPATH" timeout 200 python3 -m torch.distributed.run \
        --nproc_per_node "$gpus" tests/scripts/sharded_train.py "$work/out" "$work/reports" --layout fsdp2_sharded \
        --scenarios train,resume,damage,nan_weights --damage flip:pytorch_model_fsdp_0/__0_0.distcp; then
        python3 - "$work/reports/rank0.jsonl" <<'PY' || status=1
import json, sys
runs = {r["scenario"]: r for r in map(json.loads, open(sys.argv[1]))}
ok = (runs["train"]["raised"] is None and "FSDP" in runs["train"]["distributed_type"]
      and runs["resume"]["first_step"] == 4 and runs["resume"]["optimizer_step_at_first"] == 4.0
      and runs["damage"]["first_step"] == 4)
print(f"CHECK fsdp2_cuda: {'ok' if ok else 'FAILED'}: " + json.dumps({k: (v["raised"], v.get("first_step"))
      for k, v in runs.items()}), flush=True)
sys.exit(0 if ok else 1)
PY
    else
        echo "CHECK fsdp2_cuda: FAILED (the torchrun job exited non-zero)"; status=1
    fi
else
    echo "CHECK fsdp2_cuda: skipped (needs CUDA, datasets and tokenizers)"
fi
exit $status
