#!/usr/bin/env bash
# Rerun every benchmark in one go, each with its own RAY_TMPDIR and timed, print how long each took, then
# rewrite the provenance table at the top of BENCHMARKS.md (scripts/bench/provenance.py). Each benchmark writes
# its results file and its own BENCHMARKS.md section.
#
#   bash scripts/bench/setup_peers.sh          # first, once: serve_load.py runs CTranslate2 and llama.cpp beside
#                                              # raydist (~10 min, it compiles llama.cpp); without them serve is skipped
#   bash scripts/bench/all.sh                  # every benchmark
#   bash scripts/bench/all.sh compress sweep   # only these (finetune distill compress sweep serve pipeline
#                                              # compress_gpu distill_gpu gpu)
#
# The GPU benchmarks (compress_gpu, distill_gpu, gpu) run only where torch sees CUDA; compress_gpu and distill_gpu
# also need SHAPE_DIR, a directory with SmolLM2-135M's config.json and tokenizer files (gpu.py builds its own
# shapes); elsewhere they are skipped. distill needs the seed tasks at
# ../shared/data/seed_tasks.jsonl (skipped without them). Run it on an otherwise idle machine: the figures are
# timings, and each benchmark records the machine's load beside them.
#
# Expected duration: about 2 h 15 min on a quiet 2-core AMD EPYC (the box the current results were measured on).
# Measured by this script there: `all.sh finetune distill pipeline` took 62.5 min (finetune 15.8, distill 26.6,
# pipeline 20.0). From the wall times the other results files record: compress 32 min, sweep 10.3 min
# (sweep_wall_s + naive_wall_s), serve 7 min (wall_min). distill has since gained two on-policy runs and the
# generation metric (not measured yet; roughly +20 min by the other runs' times). The GPU benchmarks add a few
# minutes each (distill_gpu: 79 + 81 s of runs in distill_gpu.json; gpu: budgeted for under 9 min, its wall_s in
# gpu.json once measured).
set -uo pipefail
cd "$(dirname "$0")/../.."

PY=.venv/bin/python
ALL=(finetune distill compress sweep serve pipeline compress_gpu distill_gpu gpu)
WANT=("$@")
[ ${#WANT[@]} -eq 0 ] && WANT=("${ALL[@]}")
for name in "${WANT[@]}"; do
  case " ${ALL[*]} " in *" $name "*) ;; *) echo "unknown benchmark '$name' (choose from: ${ALL[*]})" >&2; exit 2 ;; esac
done
if [ ! -x "$PY" ]; then
  echo "no $PY: run scripts/setup.sh first" >&2
  exit 1
fi

LOGS=$(mktemp -d /tmp/raydist-bench-all-XXXXXX)
HAS_CUDA=$($PY -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
declare -A SECONDS_OF STATUS_OF

# run NAME CMD...: run one benchmark with its own RAY_TMPDIR, log to $LOGS/NAME.log, record time and status.
run() {
  local name=$1
  shift
  local ray_tmp=/tmp/rb-$name
  [ "$name" = serve ] && ray_tmp=/tmp/r-serve # the command serve_load.py records and BENCHMARKS.md shows
  echo "=== $name: RAY_TMPDIR=$ray_tmp $* (log $LOGS/$name.log)"
  local t0=$SECONDS
  RAY_TMPDIR=$ray_tmp "$@" 2>&1 | tee "$LOGS/$name.log"
  local rc=${PIPESTATUS[0]}
  SECONDS_OF[$name]=$((SECONDS - t0))
  STATUS_OF[$name]=$([ "$rc" -eq 0 ] && echo ok || echo "FAILED (exit $rc)")
}

skip() {
  SECONDS_OF[$1]=0
  STATUS_OF[$1]="skipped: $2"
  echo "=== $1: skipped ($2)"
}

for name in "${WANT[@]}"; do
  case $name in
    finetune) run finetune $PY scripts/bench/finetune_overhead.py ;;
    distill)
      if [ -f ../shared/data/seed_tasks.jsonl ]; then
        run distill $PY scripts/bench/distill.py
      else
        skip distill "no ../shared/data/seed_tasks.jsonl"
      fi
      ;;
    compress) run compress $PY scripts/bench/compress.py ;;
    sweep) run sweep $PY scripts/bench/sweep.py ;;
    serve)
      if $PY -c "import ctranslate2" 2>/dev/null && [ -x .venv-llamacpp/bin/python ]; then
        run serve $PY scripts/bench/serve_load.py --update-benchmarks-md
      else
        skip serve "peers missing: run bash scripts/bench/setup_peers.sh first"
      fi
      ;;
    pipeline) run pipeline $PY scripts/bench/pipeline_smollm2.py ;;
    gpu)
      if [ "$HAS_CUDA" != 1 ]; then
        skip gpu "no CUDA device"
      else
        run gpu $PY scripts/bench/gpu.py --update-benchmarks-md
      fi
      ;;
    compress_gpu | distill_gpu)
      if [ "$HAS_CUDA" != 1 ]; then
        skip "$name" "no CUDA device"
      elif [ -z "${SHAPE_DIR:-}" ]; then
        skip "$name" "SHAPE_DIR (SmolLM2 config + tokenizer dir) not set"
      elif [ "$name" = compress_gpu ]; then
        run compress_gpu $PY scripts/bench/compress_gpu.py --shape "$SHAPE_DIR"
      else
        run distill_gpu $PY scripts/bench/distill_gpu.py --shape "$SHAPE_DIR" --steps 60 --micro 16 --seq-len 512
      fi
      ;;
  esac
done

$PY scripts/bench/provenance.py --update-benchmarks-md

echo
echo "benchmark     duration   status"
total=0
failed=0
for name in "${WANT[@]}"; do
  s=${SECONDS_OF[$name]}
  total=$((total + s))
  printf '%-13s %4d:%02d   %s\n' "$name" $((s / 60)) $((s % 60)) "${STATUS_OF[$name]}"
  case ${STATUS_OF[$name]} in FAILED*) failed=1 ;; esac
done
printf '%-13s %4d:%02d   (logs in %s)\n' total $((total / 60)) $((total % 60)) "$LOGS"
exit $failed
