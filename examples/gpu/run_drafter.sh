#!/usr/bin/env bash
# A drafter's data, features and training on a GPU machine, as one prepared command (v4's recipe by
# default; docs/drafter-training.md says how the pieces get there and what comes back).
#
#   bash examples/gpu/run_drafter.sh smoke      # the GPU paths' tests (tests/test_device_paths.py)
#   bash examples/gpu/run_drafter.sh            # target, data appended to the store, features, train, pack into $OUT
#   bash examples/gpu/run_drafter.sh rehearse   # the same run on the CPU at tiny scale (examples/gpu/rehearsal.py)
#
# It reads from $BUNDLE what was copied there before: the default target's GGUF in parts (part-*), its
# tokenizer and config (model-files.tgz) and weights digest (model-digest.txt), the gguf wheel (*.whl)
# and, optionally, the drafter the recipe starts from (init/, copied to its train.init_from; else the
# checkout's shipped drafter is copied there) and response shards that did not fit the checkout's copy
# (store/, merged into the recipe's data.store). examples/gpu/bundle.py makes that bundle in pieces. A recipe that
# names its own `model` skips the GGUF. No network is needed. CONFIG names the recipe.
set -uo pipefail
if [ "${1:-run}" = rehearse ]; then
  root=$(mktemp -d /tmp/bp-rehearsal.XXXXXX)
  python3 examples/gpu/rehearsal.py "$root" || exit 1
  CONFIG=$root/recipe.yaml BUNDLE=$root/bundle OUT=${OUT:-$root/out} BLOCKPILOT_CACHE=$root/cache \
    TOTAL_SECONDS=${TOTAL_SECONDS:-600} DATA_SECONDS=${DATA_SECONDS:-120} exec bash "$0" run
fi
BUNDLE=${BUNDLE:-/tmp/bp-bundle}
OUT=${OUT:-/tmp/bp-out}
DATA_SECONDS=${DATA_SECONDS:-240}  # the data stage's share; it stops between chunks, keeping every chunk it made
DEADLINE=$(( $(date +%s) + ${TOTAL_SECONDS:-540} ))
CONFIG=${CONFIG:-configs/drafter-smollm2-v4-gpu.yaml}
SHIPPED_DRAFTER=runtime/assets/smollm2-135m-instruct-dflash
PART_BYTES=15000000  # each file back at most 16 MiB; at most 8 files
export BLOCKPILOT_CACHE=${BLOCKPILOT_CACHE:-/tmp/bp-cache} PYTHONUNBUFFERED=1
mkdir -p /tmp/bp-pkg "$OUT" "$BLOCKPILOT_CACHE/downloads"
ln -sfn "$PWD" /tmp/bp-pkg/blockpilot  # the repo's folders as the one package `blockpilot`, as installed
export PYTHONPATH=/tmp/bp-pkg:/tmp/bp-site
for wheel in "$BUNDLE"/gguf-*.whl; do
  [ -e "$wheel" ] && { python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/bp-site "$wheel" || exit 1; }
done
step() { echo "=== $(date +%T) $*"; }
source examples/gpu/target_from_bundle.sh
settings=$(python3 -c "from blockpilot.runtime.training.recipe import DrafterRecipe as R
r = R.from_yaml('$CONFIG'); print(r.work_dir, r.train.init_from, r.store_dir, r.model, r.output_dir)") || exit 1
read -r WORK INIT STORE MODEL DRAFTER <<< "$settings"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

if [ "${1:-run}" = smoke ]; then
  step "GPU paths' tests"
  exec python3 -m pytest -q -p no:cacheprovider tests/test_device_paths.py -k "cuda or waits_for_the_gpu or moved_to_a_device"
fi

if [ "$MODEL" = None ]; then
  rebuild_default_target
fi
mkdir -p "$STORE" && [ -d "$BUNDLE/store" ] && cp -r "$BUNDLE/store/." "$STORE/"
# the drafter to continue from: the bundle's init/ where one travelled, else the checkout's shipped one
# (a 33 MB file that every copy of the checkout carries already)
if [ "$INIT" != None ]; then
  rm -rf "$INIT" && mkdir -p "$INIT" || exit 1
  if [ -d "$BUNDLE/init" ]; then cp -r "$BUNDLE/init/." "$INIT/" || exit 1
  else cp "$SHIPPED_DRAFTER/config.json" "$SHIPPED_DRAFTER/model.safetensors" "$INIT/" || exit 1; fi
fi
shards() { ls "$STORE"/responses-*.npz "$STORE"/instructions/responses-*.npz 2>/dev/null; }
mkdir -p "$WORK" && shards | sort > "$WORK/carried-shards.txt"

step "data stage (at most ${DATA_SECONDS} s): appended to $STORE"
minutes=$(python3 -c "print($DATA_SECONDS / 60)")
timeout $(( DATA_SECONDS + 120 )) python3 -m blockpilot.runtime.cli train-drafter --config "$CONFIG" --stage data --minutes "$minutes"
python3 -m blockpilot.runtime.training.response_store info "$STORE"

step "features"
python3 -c "
from blockpilot.runtime.training.recipe import DrafterRecipe, _training_data
_training_data(DrafterRecipe.from_yaml('$CONFIG'), with_final_hidden=True)" || exit 1
df -h /tmp | tail -1

minutes=$(python3 -c "print(max(${MIN_TRAIN_MINUTES:-1.0}, ($DEADLINE - $(date +%s) - 130) / 60))")
step "train stage (${minutes} min)"
python3 -m blockpilot.runtime.cli train-drafter --config "$CONFIG" --stage train --minutes "$minutes"

step "pack into $OUT"
split -b $PART_BYTES -d "$DRAFTER/model.safetensors" "$OUT/drafter.safetensors.part-"
tar -czf "$OUT/meta.tgz" -C "$DRAFTER" config.json training_summary.json \
  $( [ -f "$DRAFTER/draft_vocab.pt" ] && echo draft_vocab.pt ) -C "$WORK" train_log.jsonl
# the shards this run added and the store's manifests (npz is compressed already: a plain tar)
new=$(comm -13 "$WORK/carried-shards.txt" <(shards | sort) | sed "s|^$STORE/||")
tar -cf "$WORK/data-new.tar" -C "$STORE" manifest.json $( [ -f "$STORE/instructions/manifest.json" ] && echo instructions/manifest.json) $new
split -b $PART_BYTES -d "$WORK/data-new.tar" "$OUT/data-new.tar.part-"
ls -la "$OUT"
files=$(ls "$OUT" | wc -l)
[ "$files" -le 8 ] || { echo "$files files in $OUT: at most 8 come back"; exit 1; }
step done
