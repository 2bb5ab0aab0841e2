#!/usr/bin/env bash
# Prepared GPU check (issue 29): tiny-moe on one CUDA device in bf16 for 50 steps.
# Prints the CUDA losses beside a CPU run of the same config, MFU and peak memory from
# metrics.jsonl, and the dry run's memory for the same run beside torch's
# max_memory_allocated. On a machine without a CUDA device it says so and exits 0.
#   scripts/gpu_check.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device on this machine (torch.cuda.is_available() is False); nothing to check"
  exit 0
fi
out="${1:-$(mktemp -d -t moefold-gpu-check-XXXX)}"
sets=(--set train.steps=50 --set train.dtype=bf16 --set train.eval_every=0)
python -m moefold train --config tiny-moe "${sets[@]}" --device cuda --out "$out/cuda"
python -m moefold train --config tiny-moe "${sets[@]}" --device cpu --out "$out/cpu"
python -m moefold dry-run --config tiny-moe --world-size 1 "${sets[@]}" --json > "$out/dry_run.json"
python - "$out" <<'PY'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
def rows(run):
    lines = (out / run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r and "step" in r]
cuda, cpu = rows("cuda"), rows("cpu")
print(f"{'step':>5} {'cuda loss':>10} {'cpu loss':>10} {'rel diff':>9}")
worst = 0.0
for a, b in zip(cuda, cpu):
    rel = abs(a["loss"] - b["loss"]) / abs(b["loss"])
    worst = max(worst, rel)
    if a["step"] % 10 == 0 or a is cuda[-1]:
        print(f"{a['step']:>5} {a['loss']:>10.4f} {b['loss']:>10.4f} {rel:>9.2e}")
print(f"largest relative loss difference over {len(cuda)} steps: {worst:.2e} (bf16: ~1e-2 expected)")
last = cuda[-1]
print(f"cuda MFU {last.get('mfu')}, peak memory {last.get('peak_memory_mb')} MiB "
      "(torch.cuda.max_memory_allocated)")
dry = json.loads((out / "dry_run.json").read_text())["ranks"][0]["memory_bytes"]
print("dry run (MiB): " + ", ".join(f"{k} {v / 2**20:.1f}" for k, v in dry.items()))
PY
