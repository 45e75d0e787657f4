#!/usr/bin/env bash
# The GPU measurements in one short run: supernet step time and peak memory per micro-batch
# (DeiT-S, DeiT-B), supernet against dense training throughput, compressed models' inference
# speedup against their MACs ratio, and the latency table's prediction error; each bench
# under its own time limit, its output in OUT/<name>.txt, the device's description in
# OUT/device.txt.
#
#   bench/gpu_session.sh --wheels       # here, with pip: pydantic's wheels for Python 3.12 into .whl/
#   bench/gpu_session.sh OUT            # on the GPU machine, from the repository's root (about 8 minutes)
#   bench/gpu_session.sh OUT --quick    # the same steps on the CPU with vit_digits, to check them (a minute)
#
# A GPU machine without internet access may lack pydantic (flora_steps needs it): with .whl/
# present the script installs it into /tmp/site first. Every bench runs in bfloat16 autocast
# on CUDA (compute.amp), the setting the ImageNet profiles train and time in.
set -u
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--wheels" ]; then
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl pydantic==2.14.3 pydantic_core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 \
        typing_extensions==4.16.0
    exit
fi

out=${1:?usage: bench/gpu_session.sh OUT [--quick] | --wheels}
quick=${2:-}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python=${PYTHON:-python3}
if [ -d .whl ]; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

# one bench: a name, a time limit in seconds, then its arguments
bench() {
    local name=$1 limit=$2
    shift 2
    echo "== $name ($limit s at most): $*"
    timeout "$limit" "$python" "$@" >"$out/$name.txt" 2>&1
    echo "== $name: exit $? after $SECONDS s in all"
    grep -v -i warning "$out/$name.txt" | tail -n 12
}

{
    nvidia-smi 2>&1 || echo "no nvidia-smi"
    "$python" -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, 'cuda', torch.cuda.is_available())"
} >"$out/device.txt" 2>&1
cat "$out/device.txt"

if [ "$quick" = "--quick" ]; then
    device=cpu small=vit_digits base=vit_digits
    bench memory_small 60 bench/supernet_memory.py --model $small --micro-batches 16 32 --steps 2
    bench memory_base 60 bench/supernet_memory.py --model $base --micro-batches 16 --steps 2
    bench throughput 60 bench/supernet_throughput.py --device $device --amp --models $small --batch 64 --steps 2 --repeats 1
    bench speedup 60 bench/inference_latency.py --device $device --amp --models $small --batch 16 --repeats 3
    bench prediction 90 bench/latency_prediction.py --device $device --amp --models $small --batch 16 --repeats 3 \
        --budgets 0.45 --subnets 1
    exit
fi

models="deit_small_patch16_224 deit_base_patch16_224"
bench memory_small 75 bench/supernet_memory.py --model deit_small_patch16_224 --micro-batches 128 256 512 1024 --steps 5
bench memory_base 90 bench/supernet_memory.py --model deit_base_patch16_224 --micro-batches 64 128 256 512 --steps 5
bench throughput 90 bench/supernet_throughput.py --device cuda --amp --models $models --batch 256 128 --steps 10 --repeats 3
bench speedup 75 bench/inference_latency.py --device cuda --amp --models $models --batch 64 --repeats 21
bench prediction 120 bench/latency_prediction.py --device cuda --amp --models $models --batch 64 --repeats 21
