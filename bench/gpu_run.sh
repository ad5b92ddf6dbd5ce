#!/usr/bin/env bash
# One short device-machine run: GPU checks of the host tests and the benchmarks, on a CUDA ComfyUI.
# Needs .gpu/ (excluded from git): a ComfyUI source copy and wheels the GPU image lacks (torchsde, trampoline, av).
set -uo pipefail
export PYTHONUNBUFFERED=1 MACE_TEST_GPU=1 COMFYUI_PATH="$PWD/.gpu/ComfyUI"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
out="${OUT:-/tmp/out}"; mkdir -p "$out"
nvidia-smi -L | tee "$out/device.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$out/device.txt"
timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/host/test_refine.py tests/host/test_fuse.py \
  tests/host/test_train.py tests/host/test_frozen_weights.py 2>&1 | tail -25 | tee "$out/tests.txt"
timeout 150 python3 bench/bench_refine.py --counts 1,10,100 2>&1 | grep -v Warning | tail -8 | tee "$out/refine.txt"
timeout 90 python3 bench/bench_fuse.py --counts 1,10,100 2>&1 | tail -10 | tee "$out/fuse.txt"
timeout 120 python3 bench/bench_train.py --sd15 --size 64 --threads 8 2>&1 | tail -14 | tee "$out/train.txt"
# issue 18: many concepts per training step; batches that do not fit are reported, not crashed on
timeout 150 python3 bench/bench_train_batch.py --model sd15 --size 64 --threads 8 --steps 5 --rounds 2 \
  --data-batches 1,4 --images 4 2>&1 | tail -14 | tee "$out/train_batch_sd15.txt"
timeout 180 python3 bench/bench_train_batch.py --model sdxl --size 128 --fp16 --threads 8 --batches 1,4,16 \
  --steps 3 --rounds 1 --warmup 1 --data-batches 1,4 --images 2 2>&1 | tail -13 | tee "$out/train_batch_sdxl.txt"
# issue 15: one SDXL training step at 1024 px against a 24 GB card, measured (the CPU only predicts it)
timeout 120 python3 bench/bench_train_memory.py --sizes 64,96,128 --threads 8 2>&1 | tail -12 | tee "$out/train_memory_sdxl.txt"
# issue 5's scaling run: refine and fuse at 1..1000 concepts on SD1.5-sized layers, then the 10-concept erase
timeout 200 python3 bench/bench_scale.py --suffix _gpu 2>&1 | grep -v Warning | tail -22 | tee "$out/scale.txt"
cp bench/out/scale_gpu.md bench/out/scale_gpu.png "$out/" 2>/dev/null
