#!/usr/bin/env bash
# All GPU figures of BENCHMARKS.md in one command, most important first. Each step writes its report
# and log under OUT as soon as it finishes, and a failing step does not stop the later ones, so a
# session cut short keeps what it measured:
#
#   bash benchmarks/gpu_session.sh [OUT]        # OUT defaults to $OUT, else outputs/benchmarks/gpu
#
# 1. time to accuracy: BBN then CE, 200 epochs of CIFAR-10-LT (ratio 100), trainer=gpu_fast, data on the GPU
# 2. throughput: ltlib vs the plain loop, all four methods, gpu_fast settings on both paths
# 3. BBN with one concatenated trunk pass (method.trunk_pass=concatenated): its time and accuracy
# 4. microbench: sustained TFLOP/s of ResNet-32's shapes, kernels per step, launch latency, floors
# 5. throughput with plain GPU settings (fp32, eager), then the CPU-loader run of BBN (accuracy parity)
set -uo pipefail
OUT="$(realpath -m "${1:-${OUT:-outputs/benchmarks/gpu}}")"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv" 2>&1
# GPU utilisation, sampled every second while the benchmarks run
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 1 > "$OUT/gpu_utilisation.csv" 2>/dev/null &
SAMPLER_PID=$!
trap 'kill "$SAMPLER_PID" 2>/dev/null' EXIT

step() {  # step NAME COMMAND...: run, log to OUT/NAME.log, report the outcome in one line
    local name=$1
    shift
    local start=$SECONDS
    if "$@" > "$OUT/$name.log" 2>&1; then
        echo "ok     $name ($((SECONDS - start)) s)"
    else
        echo "FAILED $name ($((SECONDS - start)) s): see $OUT/$name.log"
    fi
}

step time_to_accuracy python benchmarks/time_to_accuracy.py --methods bbn ce --out "$OUT/time_to_accuracy"
step throughput_fast python benchmarks/throughput.py --out "$OUT/throughput_fast.json"
step time_to_accuracy_bbn_concatenated python benchmarks/time_to_accuracy.py --methods bbn \
    --override method.trunk_pass=concatenated --out "$OUT/time_to_accuracy_bbn_concatenated"
step microbench python benchmarks/microbench.py --compile --out "$OUT/microbench.json"
step throughput_plain_settings python benchmarks/throughput.py --no-fast --out "$OUT/throughput_plain_settings.json"
step time_to_accuracy_cpu_loader python benchmarks/time_to_accuracy.py --methods bbn --loaders cpu \
    --override data.num_workers=8 --out "$OUT/time_to_accuracy_cpu_loader"
for log in "$OUT"/*.log; do
    echo "== $log"
    grep -v -i "warn" "$log" | grep "^|" | tail -n 12
done
