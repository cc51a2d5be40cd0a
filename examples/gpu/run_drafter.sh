#!/usr/bin/env bash
# A drafter's data, features and training on a GPU machine, as one prepared command (v2's recipe by
# default; docs/drafter-training.md says how the pieces get there and what comes back).
#
#   bash examples/gpu/run_drafter.sh smoke   # the GPU paths' tests (tests/test_device_paths.py)
#   bash examples/gpu/run_drafter.sh         # rebuild the target, data, features, train, pack into $OUT
#
# It reads from $BUNDLE what was copied there before: the default target's GGUF in parts
# (part-*), its tokenizer and config (model-files.tgz) and weights digest (model-digest.txt), the earlier
# runs' data (data.tgz), the drafter the recipe starts from (init/, copied to its train.init_from) and
# the gguf wheel (*.whl). No network is needed. CONFIG names the recipe (v2's GPU run by default).
set -uo pipefail
BUNDLE=${BUNDLE:-/tmp/bp-bundle}
OUT=${OUT:-/tmp/bp-out}
DATA_SECONDS=${DATA_SECONDS:-170}  # the data stage's share; it resumes shard by shard, so a cut loses little
DEADLINE=$(( $(date +%s) + ${TOTAL_SECONDS:-540} ))
CONFIG=${CONFIG:-configs/drafter-smollm2-v2-gpu.yaml}
GGUF_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
export BLOCKPILOT_CACHE=${BLOCKPILOT_CACHE:-/tmp/bp-cache} PYTHONUNBUFFERED=1
mkdir -p /tmp/bp-pkg "$OUT" "$BLOCKPILOT_CACHE/downloads"
ln -sfn "$PWD" /tmp/bp-pkg/blockpilot  # the repo's folders as the one package `blockpilot`, as installed
export PYTHONPATH=/tmp/bp-pkg:/tmp/bp-site
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/bp-site "$BUNDLE"/gguf-*.whl || exit 1
step() { echo "=== $(date +%T) $*"; }
recipe() { python3 -c "from blockpilot.runtime.training.recipe import DrafterRecipe as R; print(R.from_yaml('$CONFIG').$1)"; }
WORK=$(recipe work_dir) && INIT=$(recipe train.init_from) || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

if [ "${1:-run}" = smoke ]; then
  step "GPU paths' tests"
  exec python3 -m pytest -q -p no:cacheprovider tests/test_device_paths.py -k cuda
fi

step "target: the default model rebuilt from its GGUF, checked weight for weight"
gguf=$BLOCKPILOT_CACHE/downloads/SmolLM2-135M-Instruct.Q4_1.gguf
cat "$BUNDLE"/part-* > "$gguf"
echo "$GGUF_SHA256  $gguf" | sha256sum -c - || exit 1
model_dir=$(python3 -c "from blockpilot.runtime.assets import ensure_default_model; print(ensure_default_model())") || exit 1
tar -xzf "$BUNDLE/model-files.tgz" -C "$model_dir"  # this project's tokenizer and config files, byte for byte
digest=$(python3 examples/gpu/model_digest.py "$model_dir")
[ "$digest" = "$(cat "$BUNDLE/model-digest.txt")" ] || { echo "target weights digest $digest differs"; exit 1; }
mkdir -p "$WORK/data" && [ -n "$(ls "$WORK/data")" ] || tar -xzf "$BUNDLE/data.tgz" -C "$WORK/data"
rm -rf "$INIT" && cp -r "$BUNDLE/init" "$INIT"

step "data stage (at most ${DATA_SECONDS} s)"
timeout "$DATA_SECONDS" python3 -m blockpilot.runtime.cli train-drafter --config $CONFIG --stage data
echo "responses: $(cat "$WORK"/data/responses-*.jsonl | wc -l)"

step "features"
python3 -c "
from blockpilot.runtime.training.recipe import DrafterRecipe, _training_data
_training_data(DrafterRecipe.from_yaml('$CONFIG'), with_final_hidden=True)" || exit 1
df -h /tmp | tail -1

minutes=$(python3 -c "print(max(1.0, ($DEADLINE - $(date +%s) - 130) / 60))")
step "train stage (${minutes} min)"
python3 -m blockpilot.runtime.cli train-drafter --config $CONFIG --stage train --minutes "$minutes"

step "pack into $OUT"
assets=runtime/assets/smollm2-135m-instruct-dflash
split -b 15000000 -d "$assets/model.safetensors" "$OUT/drafter.safetensors.part-"
tar -czf "$OUT/meta.tgz" -C "$assets" config.json training_summary.json -C "$WORK" train_log.jsonl
tar -czf "$OUT/data-gpu.tgz" -C "$WORK/data" --exclude='features-*' .
ls -la "$OUT"
step done
