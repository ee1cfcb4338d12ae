#!/usr/bin/env bash
# The GPU checks of dsmoe in one call on a lent GPU machine (see README, "GPU").
#
#   bash benchmarks/gpu_session.sh [tests|layer|model|all] [extra dsmoe bench options]
#
# Uses the machine's preinstalled python3 (torch with CUDA, cuda-python, pytest, hypothesis,
# click, rich, safetensors) and imports dsmoe from this checkout through a symlinked package
# (passes/, plugins/, export/, benchmarks/ as dsmoe.passes, .plugins, .export, .bench: what the wheel installs), so no
# build tools are needed. Writes at most 8 files under $OUT (default out/gpu): nvidia-smi.txt,
# gpu-tests.log and the
# benchmark's <gpu>-<suite>.{json,md,png}. Ends with a short summary (the device tool returns
# the end of the output).
set -uo pipefail
what=${1:-all}
shift || true
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1   # the machine's triton (3.6) compiles the kernels on first use
PY=${PYTHON:-python3}

SITE=$(mktemp -d /tmp/dsmoe-site.XXXX)
mkdir "$SITE/dsmoe"
ln -s "$PWD"/dsmoe/*.py "$SITE/dsmoe/"
ln -s "$PWD/dsmoe/app" "$SITE/dsmoe/app"
for sub in passes plugins export; do ln -s "$PWD/$sub" "$SITE/dsmoe/$sub"; done
ln -s "$PWD/benchmarks" "$SITE/dsmoe/bench"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
PY="$PY -P"   # no checkout directory on sys.path: dsmoe comes from $SITE
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
$PY -c "import torch, dsmoe.passes, dsmoe.plugins, dsmoe.bench, dsmoe.app.cli; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
  torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO CUDA', dsmoe.plugins.__file__)"

rc=0
# the TensorRT plugins' enqueue needs a prebuilt library (no nvcc there): dsmoe build-plugins --out out/trt-plugins
if [[ -z ${DSMOE_TRT_PLUGINS:-} && -f out/trt-plugins/libdsmoe_trt_plugins.so ]]; then
  export DSMOE_TRT_PLUGINS=$PWD/out/trt-plugins
fi
if [[ $what == tests || $what == all ]]; then
  # Triton kernels vs the CPU ops (the interpreter sweeps rerun compiled), fused generation on
  # CUDA, CUDA-graph decode, the bench backends, the TensorRT plugins' enqueue
  timeout 540 $PY -m pytest -q -x -p no:cacheprovider tests/test_cuda_ops.py tests/test_runtime.py tests/test_trt_enqueue.py \
    2>&1 | tee "$OUT/gpu-tests.log" | tail -n 40
  rc=${PIPESTATUS[0]}
fi
bench() {
  $PY -c "from dsmoe.app.cli import main; main()" bench --device cuda --out "$OUT" "$@" 2>&1 \
    | grep -v '^· ' | tail -n 40
}
if [[ $what == layer || $what == all ]]; then
  bench --suite moe-layer "$@" || rc=1
fi
if [[ $what == model || $what == all ]]; then
  bench --suite model "$@" || rc=1
fi
ls -la "$OUT"
exit "$rc"
