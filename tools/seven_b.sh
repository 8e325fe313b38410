#!/usr/bin/env bash
# LLaMA-7B through the CLI on this machine: step 1 (every basis built) with a checkpoint, then a resume that runs
# step 2, checkpoints again and exports the Hugging Face folder; peak RSS of each process from /usr/bin/time.
#   tools/seven_b.sh NAME FLAGS...      e.g. tools/seven_b.sh galore-int8 --dtype int8 --method galore --base adamw8bit \
#                                            --rank 1024 --svd randomized   (--svd only for the SVD trackers)
set -euo pipefail
name=$1; shift
out=${OUT_ROOT:-runs/7b}/$name
py=${PYTHON:-.venv/bin/python}
rm -rf "$out"
mkdir -p "$(dirname "$out")"
common=(--preset 7b --layerwise --grad-clip 0 --grad-checkpointing --batch-size 1 --seq-len 256
        --steps 2 --save-every 1 --eval-every 0 --eval-batches 1 --log-every 1 --threads 2)
lscpu | grep -m1 'Model name' | sed 's/^ */cpu: /'
/usr/bin/time -v "$py" -m gradspace pretrain "${common[@]}" "$@" --out "$out" --stop-after 1 2> "$out.step1.err" || true
grep -E "Maximum resident|Elapsed" "$out.step1.err" | sed 's/^\s*/step 1: /'
/usr/bin/time -v "$py" -m gradspace pretrain --resume "$out" --threads 2 2> "$out.step2.err"
grep -E "Maximum resident|Elapsed" "$out.step2.err" | sed 's/^\s*/resume, step 2, export: /'
"$py" - "$out" <<'PY'
import json, sys
for line in open(sys.argv[1] + "/metrics.jsonl"):
    r = json.loads(line)
    if "step" in r and "loss" in r:
        parts = ", ".join(f"{k} {r[k]:.1f} s" for k in ("forward_time", "backward_time", "optimizer_time",
                                                        "subspace_update_time") if k in r)
        print(f"step {r['step']}: loss {r['loss']:.4f}, step {r['step_time']:.1f} s ({parts}; layer-wise: the "
              "optimizer's time is inside the backward's)")
PY
ls "$out/model"
