#!/usr/bin/env bash
# The runtime on a GPU machine, as one prepared command (docs/gpu-deployment.md, "The runtime on a GPU"):
#
#   bash examples/gpu/run_gpu_checks.sh            # CUDA tests, the GPU's step-cost table, bench, FlashInfer check
#   bash examples/gpu/run_gpu_checks.sh rehearse   # the same run on the CPU at tiny scale, in about a minute
#
# It reads from $BUNDLE what was copied there before: the default target's GGUF in parts (part-*), its
# tokenizer and config (model-files.tgz) and weights digest (model-digest.txt), the gguf wheel, MT-Bench's
# question.jsonl, and the flashinfer-python wheel in pieces (flashinfer_python-*.whl.part-*, joined here)
# with any wheels it needs that the machine lacks (*.whl). The drafter, its policy and calibration travel
# in the checkout. No network is needed. Back under $OUT (at most 8 files of at most 16 MiB): the GPU's
# step-cost table (step_costs.json; table-path.txt says where it ships), the bench figures
# (bench-batch1.png, bench-batch16.png), summary.txt, and results.tgz (every report and log).
set -uo pipefail
if [ "${1:-run}" = rehearse ]; then
  root=$(mktemp -d /tmp/bp-gpu-rehearsal.XXXXXX)
  DEVICE=cpu TABLE=$root/step_costs.json BUNDLE=$root/bundle OUT=${OUT:-$root/out} TOTAL_SECONDS=${TOTAL_SECONDS:-300} \
    WIDTHS=1-3 BATCH_SIZES=1,2 TABLE_REPEATS=2 BENCH_SIZES=2,4 BENCH_PROMPTS=2 BENCH_TOKENS=6 BENCH_REPEATS=1 \
    BIG_BATCH=2 exec bash "$0" run
fi
BUNDLE=${BUNDLE:-/tmp/bp-bundle}
OUT=${OUT:-/tmp/bp-out}
DEADLINE=$(( $(date +%s) + ${TOTAL_SECONDS:-540} ))
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bfloat16}  # the table and the bench; the tests run float32 and bfloat16
WIDTHS=${WIDTHS:-1-16,24,32}
BATCH_SIZES=${BATCH_SIZES:-1,2,4,8,16,32}
TABLE_REPEATS=${TABLE_REPEATS:-11}
BENCH_SIZES=${BENCH_SIZES:-2,4,8,16}
BENCH_PROMPTS=${BENCH_PROMPTS:-6}  # at batch 1; the large batch runs BIG_BATCH prompts in one batch
BENCH_TOKENS=${BENCH_TOKENS:-128}
BENCH_REPEATS=${BENCH_REPEATS:-2}
BIG_BATCH=${BIG_BATCH:-16}
# The tests that need the GPU (the rest of those files run in CI on a CPU, and FlashInfer's comparison runs
# in the background job below, not a second time inside pytest)
TEST_SELECT=${TEST_SELECT:-cuda or waits_for_the_gpu or moved_to_a_device}
TESTS=${TESTS:-}  # extra pytest arguments
WORK=$(mktemp -d /tmp/bp-gpu-work.XXXXXX)
export BLOCKPILOT_CACHE=${BLOCKPILOT_CACHE:-$HOME/.cache/blockpilot} PYTHONUNBUFFERED=1
mkdir -p /tmp/bp-pkg "$OUT" "$BLOCKPILOT_CACHE/downloads"
ln -sfn "$PWD" /tmp/bp-pkg/blockpilot  # the repo's folders as the one package `blockpilot`, as installed
export PYTHONPATH=/tmp/bp-pkg:/tmp/bp-site
step() { echo "=== $(date +%T) $*"; }
source examples/gpu/target_from_bundle.sh
left() { local s=$(( DEADLINE - $(date +%s) - ${1:-0} )); echo $(( s > 10 ? s : 10 )); }  # to the deadline, less a reserve
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

step "wheels from the bundle"
for pieces in "$BUNDLE"/*.whl.part-00; do
  [ -e "$pieces" ] && cat "${pieces%.part-00}".part-* > "$WORK/$(basename "${pieces%.part-00}")"
done
for wheel in "$BUNDLE"/*.whl "$WORK"/*.whl; do
  [ -e "$wheel" ] && { python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/bp-site "$wheel" || exit 1; }
done
[ -f "$BUNDLE/question.jsonl" ] && cp "$BUNDLE/question.jsonl" "$BLOCKPILOT_CACHE/downloads/"
if ls "$BUNDLE"/part-* > /dev/null 2>&1; then
  rebuild_default_target
fi

# FlashInfer compiles its kernels on first use (CPU work): while the tests run, not while anything is timed
step "FlashInfer under the draft mask (in the background)"
# SIGINT at the time limit: the script still writes its report with what it compared
timeout -s INT -k 20 "$(left 240)" python3 examples/gpu/flashinfer_draft_mask.py --report "$WORK/flashinfer.json" \
  > "$WORK/flashinfer.log" 2>&1 &
flashinfer=$!

step "CUDA tests (float32 and bfloat16: greedy output equal to the model's own generate)"
# SIGINT at the time limit: pytest stops, reports what ran and still writes the junit XML (SIGTERM loses it)
timeout -s INT -k 30 "$(left 300)" python3 -m pytest -q -p no:cacheprovider -rs tests/test_device_paths.py \
  -k "$TEST_SELECT" --junitxml "$WORK/tests.xml" $TESTS 2>&1 | tee "$WORK/tests.log" | tail -25

wait $flashinfer; echo "flashinfer check exit $?" >> "$WORK/flashinfer.log"
cat "$WORK/flashinfer.log"

TABLE=${TABLE:-$(python3 -c "from blockpilot.runtime import assets
print(assets.shipped_machine_step_costs_path(assets.DEFAULT_STEP_COSTS_PATH, '$DEVICE'))")}
step "step-cost table ($DTYPE, batch $BATCH_SIZES, widths $WIDTHS): $TABLE"
timeout "$(left 200)" python3 -m blockpilot.runtime.cli step-costs --device "$DEVICE" --dtypes "$DTYPE" \
  --widths "$WIDTHS" --batch-sizes "$BATCH_SIZES" --repeats "$TABLE_REPEATS" --output "$TABLE" \
  --report "$WORK/step_costs_raw.json" | tee "$WORK/step_costs.log"
[ -f "$TABLE" ] && cp "$TABLE" "$OUT/step_costs.json" && echo "${TABLE#$PWD/}" > "$OUT/table-path.txt"

for batch in 1 "$BIG_BATCH"; do
  prompts=$([ "$batch" = 1 ] && echo "$BENCH_PROMPTS" || echo "$batch")
  reserve=$([ "$batch" = 1 ] && echo 110 || echo 25)
  step "bench at batch $batch: plain vs fixed sizes $BENCH_SIZES vs the policy's, full verify and the rule"
  timeout "$(left $reserve)" python3 -m blockpilot.runtime.cli bench --device "$DEVICE" --dtype "$DTYPE" \
    --block-size auto --block-sizes "$BENCH_SIZES" --batch-size "$batch" --max-batch-size "$batch" \
    --num-prompts "$prompts" --max-new-tokens "$BENCH_TOKENS" --repeats "$BENCH_REPEATS" --verify both \
    $([ -f "$TABLE" ] && echo --step-costs "$TABLE") --output-dir "$WORK/bench-batch$batch" \
    | tee "$WORK/bench-batch$batch.log" | tail -16
  [ -f "$WORK/bench-batch$batch/bench.png" ] && cp "$WORK/bench-batch$batch/bench.png" "$OUT/bench-batch$batch.png"
done

step "summary and pack into $OUT"
python3 - "$WORK" "$OUT/summary.txt" <<'EOF'
"""The bench tables side by side, and a plain step's cost beyond its forward (launches, host syncs)."""
import json, sys
from pathlib import Path
work, lines = Path(sys.argv[1]), []
table = json.loads((work / "step_costs_raw.json").read_text()) if (work / "step_costs_raw.json").exists() else []
for bench in sorted(work.glob("bench-batch*/bench.json")):
    report = json.loads(bench.read_text())
    setup = report["setup"]
    lines.append(f"{bench.parent.name}: {setup['prompts']} prompts x {setup['max_new_tokens']} tokens, batch "
                 f"{setup['batch_size']}, {setup['dtype']}, {setup['device']}; greedy outputs identical across "
                 f"variants: {report['greedy_outputs_identical_across_block_sizes']}")
    for row in report["variants"]:
        lines.append(f"  {row['name']:>16}  accept {row['acceptance_length']:5.2f}  decode tok/s "
                     f"{row['decode_tokens_per_s']:8.1f}  x plain {row['speedup_vs_plain']:5.2f}")
    forward = next((t["target_ms"].get("1") for t in table if t["batch_size"] == setup["batch_size"]), None)
    plain = report["variants"][0]["decode_tokens_per_s"]  # per request: one token a step
    if forward and plain:
        step_ms = 1e3 / plain
        lines.append(f"  plain step {step_ms:.2f} ms, of which the target's forward {forward:.2f} ms: "
                     f"{step_ms - forward:.2f} ms of step overhead (sampling, bookkeeping, host syncs)")
text = "\n".join(lines) or "no bench report"
Path(sys.argv[2]).write_text(text + "\n")
print(text)
EOF
cp "$OUT/summary.txt" "$WORK/" 2>/dev/null
tar -czf "$OUT/results.tgz" -C "$WORK" --exclude='*.png' .
ls -la "$OUT"
files=$(ls "$OUT" | wc -l)
[ "$files" -le 8 ] || { echo "$files files in $OUT: at most 8 come back"; exit 1; }
failed=$(python3 -c "import xml.etree.ElementTree as E; r = E.parse('$WORK/tests.xml').getroot(); r = r if r.tag == 'testsuite' else r[0]
print(int(r.get('failures')) + int(r.get('errors')))" 2>/dev/null || echo "no test report")
step "done (tests failed: $failed)"
[ "$failed" = 0 ]
