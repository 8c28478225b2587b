#!/usr/bin/env bash
# The GPU rows of BENCHMARKS.md, prepared to run as few device commands, each stage under its own
# time limit, every result (logs, JSON, the trained checkpoints without optimiser state) under $OUT.
#
#   bash benchmarks/device_session.sh train eval picard backbones tokens    # ~9 min on one H100/H200
#   bash benchmarks/device_session.sh generate serve picard_sd placement    # ~9 min
#   bash benchmarks/device_session.sh picard_compiled precision             # ~6 min, compiled model calls
#
# On a GPU machine without the project installed, put `platform` on PYTHONPATH first
# (`export PYTHONPATH=platform:$PYTHONPATH`; README "GPU benchmarks in one go"). SMOKE=1 runs every stage with tiny sizes on the CPU, to check the script.
# The train stage trains the bundled models' architectures from scratch side by side on the one GPU
# (TRAIN_FAMILIES, default "gaussian hdit token": small models leave a GPU mostly idle between kernel
# launches, so three processes share it at little cost to each): TRAIN_MIN (default 5) minutes at a
# constant lr, then COOL_MIN (default 2) with the lr falling to 0. DEADLINE_S, if set, is the
# script's own wall-time budget in seconds: each stage's limit is cut to what is left of it, and
# stages that would start with under 20 s left are skipped. PYTHON (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/device}
mkdir -p "$OUT"
SMOKE=${SMOKE:-0}
PY=${PYTHON:-python3}
TRAIN_MIN=${TRAIN_MIN:-5}
TRAIN_FAMILIES=${TRAIN_FAMILIES:-gaussian hdit token}
DEADLINE_S=${DEADLINE_S:-0}
[[ "$DEADLINE_S" =~ ^[0-9]+$ ]] || { echo "DEADLINE_S must be whole seconds, got $DEADLINE_S"; exit 2; }
RUNS=runs/gpu$( [ "$SMOKE" = 1 ] && echo -smoke )  # a smoke run never seeds a real one
[ $# -gt 0 ] || set -- train eval picard backbones tokens
STAGES=" train eval placement picard picard_compiled precision backbones tokens generate serve picard_sd "
for what in "$@"; do  # every name checked before any work: a typo must not cost a session's last stage
  [[ "$STAGES" == *" $what "* ]] || { echo "unknown stage $what ($STAGES)"; exit 2; }
done
for family in $TRAIN_FAMILIES; do
  [[ " gaussian hdit token " == *" $family "* ]] || { echo "unknown family $family in TRAIN_FAMILIES"; exit 2; }
done

small() { [ "$SMOKE" = 1 ] && echo "$1" || echo "$2"; }  # small() CPU-smoke GPU
COOL_MIN=${COOL_MIN:-$(small 0.05 2)}
COOL_RESERVE_S=$(awk "BEGIN { print int($COOL_MIN * 60 + 60) }")  # the cooldown and its start-up

stage() {  # stage NAME SECONDS COMMAND...: run it under a time limit, log to $OUT/NAME.log, go on if it fails
  local name=$1 limit=$2; shift 2
  if [ "$DEADLINE_S" -gt 0 ]; then
    local left=$((DEADLINE_S - SECONDS))
    [ "$left" -ge 20 ] || { echo "$name skipped: ${left}s left of DEADLINE_S" | tee -a "$OUT/stages.txt"; return; }
    [ "$left" -ge "$limit" ] || limit=$left
  fi
  echo "== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$OUT/stages.txt"
  tail -n 5 "$OUT/$name.log" | cut -c1-300
}

newest() { ls -d "$1"/step-* 2>/dev/null | tail -n 1; }  # newest RUN: its newest checkpoint
gaussian_model() { newest "$RUNS-gaussian" | grep . || echo shapes-gaussian; }  # the trained one, else the bundled
limit_s() { awk "BEGIN { print int($1 * 60 + 120) }"; }  # limit_s MINUTES: a stage's budget plus start-up
# minutes WANTED RESERVE_S: WANTED, or less, so that RESERVE_S seconds of DEADLINE_S are left after it:
# a run that --max-minutes stops keeps a checkpoint, one that its stage's time limit kills does not.
minutes() {
  [ "$DEADLINE_S" -gt 0 ] || { echo "$1"; return; }
  awk "BEGIN { m = ($DEADLINE_S - $SECONDS - $2) / 60; m = m < $1 ? m : $1; print (m > 0.1 ? m : 0.1) }"
}

train_family() {  # train_family FAMILY: the bundled model's architecture from scratch, then its cooldown
  local family=$1 run=$RUNS-$1 shards=data/shapes32 extra=()
  [ "$family" = token ] && shards=data/shapes64 && extra=(--vq-steps "$(small 5 800)")
  local spec=platform/socarrat/assets/shapes-$family/config.json  # the architecture only: no --init
  if [ "$family" = hdit ]; then  # with the place features the bundled shapes-hdit predates
    spec=$run-spec.json && mkdir -p "$(dirname "$spec")"
    "$PY" -c "import json, sys; m = json.load(open(sys.argv[1]))['model']; m['hdit']['absolute_pos'] = True
json.dump(m, open(sys.argv[2], 'w'))" "platform/socarrat/assets/shapes-hdit/config.json" "$spec"
  fi
  local common=(--shards "$shards" --out "$run" --model-spec "$spec" --batch-size "$(small 8 256)" --lr 1e-3
                --checkpoint-every 2000 --log-every 100 --num-workers 0 "${extra[@]}")
  stage "train-$family" "$(limit_s "$TRAIN_MIN")" "$PY" -m jobs.train "${common[@]}" \
    --steps "$(small 20 200000)" --max-minutes "$(minutes "$TRAIN_MIN" $((COOL_RESERVE_S + 60)))"
  local step; step=$(newest "$run"); [ -n "$step" ] || return
  # Anneal: resume the same run (optimiser and EMA state) for as many steps as its measured rate
  # fits in COOL_MIN minutes, the lr falling linearly to 0 over them (--cooldown-steps).
  local done_steps cool_steps
  read -r done_steps cool_steps <<< "$("$PY" -c "import json, sys; t = json.load(open(sys.argv[1]))['training']
print(t['step'], max(1, int(t['images_per_s'] * $COOL_MIN * 60 / t['config']['batch_size'])))" "$step/config.json")"
  stage "cool-$family" "$(limit_s "$COOL_MIN")" "$PY" -m jobs.train "${common[@]}" \
    --steps $((done_steps + cool_steps)) --cooldown-steps "$cool_steps" \
    --max-minutes "$(minutes "$(awk "BEGIN { print $COOL_MIN * 1.5 }")" 60)"
  step=$(newest "$run")  # the weights come back; train_state.pt (optimiser) stays
  mkdir -p "$OUT/gpu-$family" && cp "$step"/config.json "$step"/model.safetensors "$OUT/gpu-$family/"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no GPU"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"; } > "$OUT/machine.txt"
cat "$OUT/machine.txt"

for what in "$@"; do
  case $what in
  train)  # each family in its own process (no Ray), side by side, bf16 autocast on the GPU
    [ -d data/shapes32 ] || stage render32 300 "$PY" -m socarrat.cli shapes-shards --out data/shapes32 \
      --count "$(small 2000 60000)" --shard-size 5000 --size-px 32 --seed 1 &
    [[ " $TRAIN_FAMILIES " != *" token "* || -d data/shapes64 ]] || stage render64 300 "$PY" -m socarrat.cli \
      shapes-shards --out data/shapes64 --count "$(small 1000 30000)" --shard-size 5000 --size-px 64 --seed 2 &
    wait
    for family in $TRAIN_FAMILIES; do train_family "$family" & done
    wait ;;
  eval)  # each trained model on the default prompt set, with its family's default sampler, side by
    # side (the scores are what counts here; images/s are the tokens and backbones stages')
    for family in $TRAIN_FAMILIES; do
      step=$(newest "$RUNS-$family")
      [ -z "$step" ] || stage "eval-$family" 240 "$PY" -m jobs.evaluate --model "$step" \
        --prompts "$(small 10 300)" --seeds "$(small 1 2)" --out "$OUT/eval-$family" &
    done
    wait ;;
  placement)  # is placement learnt: the trained model (else the bundled one), and the architecture
    # trained from scratch on one-object placement captions only, with each loss weighting
    stage placement 420 "$PY" -m benchmarks.placement --model "$(gaussian_model)" \
      --train-steps "$(small 2 2000)" --batch-size "$(small 4 256)" --examples "$(small 100 20000)" \
      --seeds "$(small 2 24)" --steps "$(small 2 30)" --out "$OUT/placement.json" ;;
  picard)
    stage picard 150 "$PY" -m benchmarks.picard --model "$(gaussian_model)" --steps-list "$(small ddpm:20,ddim:10 ddpm:1000,ddim:200,ddim:50)" \
      --window "$(small 8 64)" --out "$OUT/picard.json" ;;
  picard_compiled)  # the same with every model call a CUDA graph (torch.compile), sequential included
    stage picard_compiled 300 "$PY" -m benchmarks.picard --model "$(gaussian_model)" --compile --ref-tolerances "" \
      --steps-list "$(small ddim:4 ddpm:1000,ddim:200,ddim:50)" --window "$(small 4 64)" --out "$OUT/picard_compiled.json" ;;
  precision)  # the bundled models' calls in bf16 (auto), fp32 and compiled bf16, side by side
    stage precision 240 "$PY" -m benchmarks.precision --modes bf16,fp32,bf16+compile --prompts "$(small 2 256)" \
      --batch-size "$(small 2 64)" --models "$(small shapes-token shapes-gaussian,shapes-hdit,shapes-token)" \
      --out "$OUT/precision.json" ;;
  backbones)  # random weights, 64-512 px, batch 8, bf16 (the benchmark's GPU defaults)
    stage backbones 120 "$PY" -m benchmarks.backbones $( [ "$SMOKE" = 1 ] && echo --sizes 32 --batch 2 ) \
      --out "$OUT/backbones.json" ;;
  tokens)
    stage tokens 120 "$PY" -m benchmarks.tokens --batch-size "$(small 2 64)" --out "$OUT/tokens.json" ;;
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
