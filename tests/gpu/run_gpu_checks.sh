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
exec timeout 540 python3 tests/gpu/gpu_checks.py
