#!/usr/bin/env bash
# The GPU rows of BENCHMARKS.md, prepared to run as few device commands, each stage under its own
# time limit, every result (logs, JSON, the trained checkpoint without its optimiser state) under $OUT.
#
#   bash benchmarks/device_session.sh train eval picard backbones tokens    # ~9 min on one H100/H200
#   bash benchmarks/device_session.sh generate serve picard_sd placement    # ~9 min
#
# On a GPU machine without the project installed, put `platform` on PYTHONPATH first
# (`export PYTHONPATH=platform:$PYTHONPATH`; README "GPU benchmarks in one go"). SMOKE=1 runs every stage with tiny sizes on the CPU, to check the script.
# TRAIN_MIN (default 5) is the training stage's constant-lr budget in minutes, COOL_MIN (default 2)
# the lr cooldown's after it; PYTHON (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/device}
mkdir -p "$OUT"
SMOKE=${SMOKE:-0}
PY=${PYTHON:-python3}
TRAIN_MIN=${TRAIN_MIN:-5}
TRAINED=runs/gpu-gaussian$( [ "$SMOKE" = 1 ] && echo -smoke )  # a smoke run never seeds a real one
[ $# -gt 0 ] || set -- train eval picard backbones tokens
STAGES=" train eval placement picard backbones tokens generate serve picard_sd "
for what in "$@"; do  # every name checked before any work: a typo must not cost a session's last stage
  [[ "$STAGES" == *" $what "* ]] || { echo "unknown stage $what ($STAGES)"; exit 2; }
done

small() { [ "$SMOKE" = 1 ] && echo "$1" || echo "$2"; }  # small() CPU-smoke GPU
COOL_MIN=${COOL_MIN:-$(small 0.05 2)}

stage() {  # stage NAME SECONDS COMMAND...: run it under a time limit, log to $OUT/NAME.log, go on if it fails
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$OUT/stages.txt"
  tail -n 25 "$OUT/$name.log"
}

newest() { ls -d "$TRAINED"/step-* 2>/dev/null | tail -n 1; }
limit_s() { awk "BEGIN { print int($1 * 60 + 120) }"; }  # limit_s MINUTES: a stage's budget plus start-up

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no GPU"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"; } > "$OUT/machine.txt"
cat "$OUT/machine.txt"

for what in "$@"; do
  case $what in
  train)  # shapes-gaussian's recipe from scratch, in this process (no Ray), bf16 autocast on the GPU
    [ -d data/shapes32 ] || stage render 300 "$PY" -m socarrat.cli shapes-shards --out data/shapes32 \
      --count "$(small 2000 60000)" --shard-size 5000 --size-px 32 --seed 1
    stage train "$(limit_s "$TRAIN_MIN")" "$PY" -m jobs.train --shards data/shapes32 --out "$TRAINED" \
      --size-px 32 --steps "$(small 20 200000)" --batch-size "$(small 16 256)" --lr 1e-3 \
      --max-minutes "$TRAIN_MIN" --checkpoint-every 2000 --log-every 100 --num-workers 0
    # Anneal: resume the same run (optimiser and EMA state) for as many steps as its measured rate
    # fits in COOL_MIN minutes, the lr falling linearly to 0 over them (--cooldown-steps).
    if step=$(newest) && [ -n "$step" ]; then
      cool=$("$PY" -c "import json, sys; t = json.load(open(sys.argv[1]))['training']
print(t['step'], max(1, int(t['images_per_s'] * $COOL_MIN * 60 / t['config']['batch_size'])))" "$step/config.json")
      read -r done_steps cool_steps <<< "$cool"
      stage cool "$(limit_s "$COOL_MIN")" "$PY" -m jobs.train --shards data/shapes32 \
        --out "$TRAINED" --size-px 32 --steps $((done_steps + cool_steps)) --cooldown-steps "$cool_steps" \
        --batch-size "$(small 16 256)" --lr 1e-3 --max-minutes "$(awk "BEGIN { print $COOL_MIN * 1.5 }")" \
        --checkpoint-every 2000 --log-every 100 --num-workers 0
    fi
    if step=$(newest) && [ -n "$step" ]; then  # the weights come back; train_state.pt (optimiser) stays
      mkdir -p "$OUT/gpu-gaussian" && cp "$step"/config.json "$step"/model.safetensors "$OUT/gpu-gaussian/"
    fi ;;
  eval)  # the trained model and both bundled Gaussian models, on the default prompt set
    [ -n "$(newest)" ] && stage eval_trained 300 "$PY" -m jobs.evaluate --model "$(newest)" \
      --prompts "$(small 10 300)" --seeds "$(small 1 2)" --out "$OUT/eval-trained"
    stage backbones_eval 400 "$PY" -m benchmarks.backbones --sizes "$(small 32 64)" --repeats 3 --eval \
      --eval-prompts "$(small 10 300)" --eval-seeds "$(small 1 2)" --out "$OUT/backbones_eval.json" ;;
  placement)  # is placement learnt: the trained model (else the bundled one), and the architecture
    # trained from scratch on one-object placement captions only, with each loss weighting
    stage placement 420 "$PY" -m benchmarks.placement --model "$(newest | grep . || echo shapes-gaussian)" \
      --train-steps "$(small 2 2000)" --batch-size "$(small 4 256)" --examples "$(small 100 20000)" \
      --seeds "$(small 2 24)" --steps "$(small 2 30)" --out "$OUT/placement.json" ;;
  picard)
    stage picard 420 "$PY" -m benchmarks.picard --steps-list "$(small ddpm:20,ddim:10 ddpm:1000,ddim:200,ddim:50)" \
      --window "$(small 8 64)" --out "$OUT/picard.json" ;;
  backbones)  # random weights, 64-512 px, batch 8, bf16 (the benchmark's GPU defaults)
    stage backbones 300 "$PY" -m benchmarks.backbones $( [ "$SMOKE" = 1 ] && echo --sizes 32 --batch 2 ) \
      --out "$OUT/backbones.json" ;;
  tokens)
    stage tokens 240 "$PY" -m benchmarks.tokens --batch-size "$(small 2 64)" --out "$OUT/tokens.json" ;;
  generate)
    stage generate 420 "$PY" -m benchmarks.generate --prompts-count "$(small 32 10000)" --steps "$(small 5 50)" \
      --batch-size "$(small 8 64)" --shard-size "$(small 16 1024)" --out "$OUT/generate.json" ;;
  serve)
    stage serve 420 "$PY" -m benchmarks.serve_load $( [ "$SMOKE" = 1 ] && echo --concurrency 1,4 --duration-s 3 \
      --picard-steps 20 --steps 5 ) --out "$OUT/serve_load.json" ;;
  picard_sd)  # needs the diffusers extra (in the device bundle)
    stage picard_sd 420 "$PY" -m benchmarks.picard_sd $( [ "$SMOKE" = 1 ] && echo --config tiny ) \
      --out "$OUT/picard_sd.json" ;;
  esac
done
cat "$OUT/stages.txt"
