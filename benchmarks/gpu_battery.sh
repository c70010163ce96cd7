#!/usr/bin/env bash
# Every GPU benchmark of docs/benchmarks.md in calls of at most ~9 minutes each (a device session has little time:
# run them as two commands, each writing its logs and markdown tables under OUT).
#
#   OUT=results bash benchmarks/gpu_battery.sh lora    # LoRA: training (traced), inference, layer; ~3 min
#   OUT=results bash benchmarks/gpu_battery.sh dora    # DoRA (traced), then LORAKIT_DORA_TRITON modes A/B; ~3 min
#   OUT=results bash benchmarks/gpu_battery.sh init    # init methods, all five; ~7 min
#   OUT=results bash benchmarks/gpu_battery.sh graph   # CUDA-graph steps, shared-input groups, autocast A/B; ~3 min
#   OUT=results bash benchmarks/gpu_battery.sh h200    # issue 20 in one call of ~9 min, in priority order: the CUDA
#       tests that matter most (~120 s), LoRA training + inference (~200 s), the fused loss's longest sequence on the
#       8B / 128k-vocabulary shape (what is left of H200_BUDGET_S, default 540 s), the QLoRA step if bitsandbytes
#       imports (it is not in the device image: then skipped, and the log says so); H200_DRY=1 only collects the tests
#
# Each step has its own timeout so that a slow one cannot take the others' time; logs are flushed line by line.
set -u
OUT="${OUT:-results}"
mkdir -p "$OUT"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)/src"
PY="${PY:-python}"
command -v "$PY" > /dev/null || PY=python3
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
    h200)
        budget="${H200_BUDGET_S:-540}"
        {
            date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
            "$PY" -c "import torch, transformers, peft, triton; print('torch', torch.__version__, 'cuda', \
torch.version.cuda, 'transformers', transformers.__version__, 'peft', peft.__version__, 'triton', triton.__version__)"
            nproc; uname -r
        } > "$OUT/env.log" 2>&1
        tests=()
        for path in tests/kernels tests/loss tests/integrations/test_cuda_graphs.py tests/layers/test_bnb_layers.py \
            tests/kernels/test_kernels_bnb.py; do
            [ -e "$path" ] && tests+=("$path")
        done
        step tests 120 "$PY" -m pytest -q -x -p no:cacheprovider ${H200_DRY:+--collect-only} "${tests[@]}"
        step run 200 "$PY" -u benchmarks/run.py --profile gpu --groups training,inference --out "$OUT/run.md"
        left=$((budget - SECONDS - 15))
        if [ "$left" -gt 60 ]; then
            step longest "$left" "$PY" -u benchmarks/bench_longest_sequence.py --budget-s $((left - 60)) \
                --json "$OUT/longest.json"
        else
            echo "longest: not run, ${left}s left" | tee "$OUT/longest.log"
        fi
        if "$PY" -c "import bitsandbytes" > "$OUT/qlora.log" 2>&1; then
            echo "bitsandbytes imports; no GPU QLoRA benchmark in this mode yet" >> "$OUT/qlora.log"
        else
            echo "QLoRA skipped: bitsandbytes does not import on this machine (not in the image, no CUDA wheel carried)" \
                >> "$OUT/qlora.log"
        fi
        echo "qlora: $(tail -n 1 "$OUT/qlora.log")"
        echo "h200: ${SECONDS}s"
        ;;
    *)
        echo "usage: OUT=dir bash benchmarks/gpu_battery.sh lora|dora|init|graph|h200" >&2
        exit 2
        ;;
esac
