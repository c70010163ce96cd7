#!/usr/bin/env bash
# Every GPU benchmark of docs/benchmarks.md in calls of at most ~9 minutes each (a device session has little time:
# run them as two commands, each writing its logs and markdown tables under OUT).
#
#   OUT=results bash benchmarks/gpu_battery.sh lora    # LoRA: training (traced), inference, layer; ~3 min
#   OUT=results bash benchmarks/gpu_battery.sh dora    # DoRA (traced), then LORAKIT_DORA_TRITON modes A/B; ~3 min
#   OUT=results bash benchmarks/gpu_battery.sh init    # init methods, all five; ~7 min
#   OUT=results bash benchmarks/gpu_battery.sh graph   # CUDA-graph steps, shared-input groups, autocast A/B; ~3 min
#
# Each step has its own timeout so that a slow one cannot take the others' time; logs are flushed line by line.
set -u
OUT="${OUT:-results}"
mkdir -p "$OUT"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)/src"
step() {  # step NAME SECONDS COMMAND...: run with a timeout, log to OUT/NAME.log, report the exit status
    local name=$1 seconds=$2
    shift 2
    timeout "$seconds" "$@" > "$OUT/$name.log" 2>&1
    echo "$name: exit $?"
}
case "${1:-}" in
    lora)
        step lora 280 python -u benchmarks/run.py --profile gpu --groups training,inference,layer --trace --out "$OUT/lora.md"
        step host 90 python -u benchmarks/bench_host_overhead.py --device cuda --cases layer,model,mixed --rounds 3 --calls 20
        ;;
    dora)
        step dora 170 python -u benchmarks/bench_dora.py --profile gpu --steps 20 --warmup 5 --trace
        step dora_ab 120 python -u benchmarks/bench_dora.py --profile gpu --steps 20 \
            --warmup 5 --cases floor,lorakit-dora,lorakit-dora:0,lorakit-dora:1,lorakit-dora,floor
        ;;
    init)
        step init 560 python -u benchmarks/bench_init.py --profile gpu --device cuda --warmup 0 --repeats 2 --budget-s 20 \
            --methods olora pissa_niter_4 pissa corda eva --json "$OUT/init.json"
        ;;
    graph)
        step graph 200 python -u benchmarks/bench_dora.py --profile gpu --steps 20 --warmup 5 --cases \
            floor,floor:graph,lorakit-lora,lorakit-lora:graph,peft-lora,peft-lora:graph,lorakit-dora,lorakit-dora:graph,peft-dora:graph
        step graph_ab 150 python -u benchmarks/bench_dora.py --profile gpu --steps 20 --warmup 5 --phases --cases \
            floor,lorakit-lora,lorakit-lora:shared=0,lorakit-lora:autocast,peft-lora:autocast,lorakit-lora,lorakit-lora:shared=0
        ;;
    *)
        echo "usage: OUT=dir bash benchmarks/gpu_battery.sh lora|dora|init|graph" >&2
        exit 2
        ;;
esac
