#!/usr/bin/env bash
# The GPU figures issues #9 and #13 ask for, in one run on a lent GPU machine (about 6 minutes on one
# H200): training images/s and peak memory per model x precision (AMP goal: <= 0.6x fp32 memory), DDP
# over NCCL launched by torchrun with loader workers feeding it (samples/s and the share of time the
# GPU waited for data), loader workers on the machine's cores, and detect-then-classify scenes/s.
#
# Runs from the repository root without installing anything: PYTHONPATH=src over the machine's own
# torch, torchvision, numpy, pillow, fsspec, rich, matplotlib. Logs go to $OUT (default gpu-check/);
# the last line of each step is printed. A failing step does not stop the others.
#   bash scripts/gpu_check.sh                      # on the GPU machine
#   DEVICE=cpu SMALL=1 bash scripts/gpu_check.sh   # a quick smoke run of the same steps on a CPU
set -u
OUT=${OUT:-gpu-check}
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python3}
SMALL=${SMALL:-0}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 COLUMNS=${COLUMNS:-250}
mkdir -p "$OUT"
MODELS=small_cnn,msnet,stn_msnet PRECISIONS=fp32,bf16,fp16
if [ "$SMALL" = 1 ]; then N=3000; STEPS=4; TSTEPS=6; WORKERS=1; SCENES=20; DSTEPS=4; MODELS=small_cnn; PRECISIONS=fp32,bf16
else N=60000; STEPS=60; TSTEPS=400; WORKERS=${WORKERS:-6}; SCENES=400; DSTEPS=300; fi

step() {  # step NAME CMD...: run, keep the log, print its last line
  local name=$1; shift
  local t0=$SECONDS
  timeout "${STEP_TIMEOUT:-300}" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  printf '== %-12s rc=%s %4ss  %s\n' "$name" "$rc" "$((SECONDS - t0))" "$(tail -n 1 "$OUT/$name.log")"
}

{ nvidia-smi || true; $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"; } \
  >"$OUT/machine.txt" 2>&1

# 1. images/s and peak memory, fp32 vs bf16 vs fp16, each model in its own process
step bench-train $PY -m signscale bench train --device "$DEVICE" --models "$MODELS" \
  --precisions "$PRECISIONS" --steps "$STEPS" --batch-size 256

# 2. torchrun + DDP (NCCL on a GPU) from raw shards, loader workers augmenting on the CPU side only
#    when there is no GPU: the summary line says how much of the loop waited for data
step pack $PY -m signscale pack "synthetic:?n=$N&size=32" "$OUT/data/train" --workers 8
step ddp $PY -m torch.distributed.run --nproc-per-node 1 -m signscale train --data="$OUT/data/train" \
  --model=msnet --precision=bf16 --channels-last=true --max-steps="$TSTEPS" --workers="$WORKERS" \
  --device="$DEVICE" --progress=false --out="$OUT/run"

# 3. loader workers on this machine's cores: shards vs files, per-sample vs per-batch augmentation
step bench-io $PY -m signscale bench io --no-s3 --workers 0,4,8 --limit "$N"

# 4. detect-then-classify scenes/s on the device (detector trained briefly; speed, not accuracy)
step scenes $PY -m signscale pack-scenes "scenes-synthetic:?n=$SCENES&seed=1" "$OUT/data/scenes"
step detector $PY -m signscale train-detector --data="$OUT/data/scenes" --out="$OUT/detector" \
  --backbone="$OUT/run/model" --freeze_stages=2 --fpn_channels=32 --tile=224,160 --batch_size=8 \
  --max_steps="$DSTEPS" --device="$DEVICE" --precision=bf16 --workers=2
step scenes-per-s $PY - "$OUT" "$DEVICE" <<'PYEOF'
import sys, time
import torch
from signscale.detection.detect import load_pipeline
from signscale.data.sources.scenes import iter_scenes
out, device = sys.argv[1], sys.argv[2]
scenes = [img for img, _ in iter_scenes(f"{out}/data/scenes")]
pipe = load_pipeline(f"{out}/detector/model", f"{out}/run/model", device=device)
pipe.detect(scenes[:8])  # warm-up
for batch in (1, 8):
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    found = sum(len(r) for i in range(0, len(scenes), batch) for r in pipe.detect(scenes[i:i + batch]))
    if device == "cuda":
        torch.cuda.synchronize()
    print(f"batch {batch}: {len(scenes) / (time.perf_counter() - t):,.1f} scenes/s on {device} "
          f"({len(scenes)} scenes of 512x320, {found} signs found, detector + classifier)")
PYEOF
echo "logs in $OUT/"
