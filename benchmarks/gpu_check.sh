#!/usr/bin/env bash
# GPU check of mimswin for a CUDA machine that already has python3 with torch, timm, accelerate and transformers but
# no network (the shared kit's gpu_check.sh plus the loader rows): installs the few missing wheels from .device/whl
# (made by fetch_wheels.sh on a machine with the package index), then runs the CUDA-relevant tests, the GPU benchmark
# (with and without compile), the loader rows on photographs, and a tiny end-to-end pretrain -> resume -> fine-tune ->
# probe in bf16. Run from the project root: bash benchmarks/gpu_check.sh (copied into .device/ with the photographs)
# Logs and the bench JSON go to $OUT (default /tmp/gpu_out). About 8-10 minutes; each step has its own timeout.
set -u
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
export WANDB_MODE=disabled PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .device/whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || { echo "wheel install failed"; exit 1; }
step() { local name=$1 limit=$2; shift 2; echo "== $name"; timeout "$limit" "$@" >"$OUT/$name.log" 2>&1; local rc=$?;
         echo "   exit $rc; $(tail -n 3 "$OUT/$name.log" | tr '\n' ' ' | cut -c1-400)"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, timm, accelerate; print('torch', torch.__version__, 'timm', timm.__version__, 'accelerate', accelerate.__version__, torch.cuda.get_device_name())"
# 1. the test suite's CUDA-relevant parts on the GPU machine (CPU tests run in CI; here: do they pass with a GPU present?)
step pytest_gpu 180 python3 -m pytest -q -x -p no:cacheprovider tests -k "perf or bench or mae or swin or simmim or reliability"
# 2. the benchmark, bf16, ViT-B/16 and Swin-B (peer ratios and MFU against the measured bf16 GEMM ceiling)
step bench_gpu 200 python3 -m mimswin.cli bench --preset gpu --device cuda --steps 20 --warmup 5 --json "$OUT/bench_gpu.json"
step bench_gpu_compile 200 python3 -m mimswin.cli bench --preset gpu --device cuda --steps 20 --warmup 10 --compile --rows vit --json "$OUT/bench_gpu_compile.json"
# 2b. the loader rows on photographs (written here beforehand: python benchmarks/loader.py --write-photos .device/photos
#     --photos 4096) against the ViT-B/16 MAE step: resize in the workers, on the GPU, JPEG decode on the GPU (nvJPEG)
step bench_loaders 240 python3 -m mimswin.cli bench --preset gpu --device cuda --rows loaders,mimswin-mae --num-workers 15 --steps 20 --warmup 5 --data-path .device/photos --json "$OUT/bench_loaders.json"
# 3. end to end on CUDA, bf16: pretrain, kill, resume, fine-tune, probe (the embedded data; seconds on an H200)
R=/tmp/gpu_runs; rm -rf $R
step pretrain_bf16 120 python3 launch/pretrain.py --config tiny_mae_vit_cpu train.mixed_precision=bf16 train.output_dir=$R/mae
step resume_bf16 60 python3 launch/pretrain.py --config tiny_mae_vit_cpu train.mixed_precision=bf16 train.output_dir=$R/mae train.epochs=6 --resume
step pretrain_swin_bf16 120 python3 launch/pretrain.py --config tiny_mae_swin_cpu train.mixed_precision=bf16 train.output_dir=$R/swin
step finetune_bf16 120 python3 launch/finetune.py --config tiny_finetune_cpu --from $R/mae train.mixed_precision=bf16 train.output_dir=$R/ft
step linprobe_bf16 60 python3 launch/linprobe.py --config tiny_linprobe_cpu --from $R/mae train.output_dir=$R/lp
cp $R/mae/reconstruction.png "$OUT/" 2>/dev/null
echo "done; files in $OUT"
