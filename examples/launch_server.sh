#!/usr/bin/env bash
# An SGLang server with BlockPilot per-request block sizes (`--speculative-algorithm blockpilot`).
#
#   examples/launch_server.sh                      # default model + shipped drafter, GPU if visible else CPU
#   MODEL=~/models/Qwen3-4B DRAFTER=~/models/Qwen3-4B-DFlash-b16 examples/launch_server.sh --max-running-requests 16
#
# Settings (environment; extra arguments go to sglang.launch_server unchanged):
#   MODEL     target HF directory          (default: the default model, converted once: `blockpilot prepare`)
#   DRAFTER   DFlash drafter directory     (default: the drafter shipped in the blockpilot package)
#   DEVICE    cpu | cuda                   (default: cuda when torch sees a GPU)
#   HOST, PORT                             (default: 127.0.0.1, 30000)
#   PYTHON    the venv's python            (default: python)
#   CUDA_GRAPH_MAX_BS  largest decode batch captured in CUDA graphs (GPU; default 48, BLOCKPILOT's
#                      default --max-running-requests)
#   BLOCKPILOT_POLICY       policy .onnx, or "none" (default: blockpilot_policy.onnx beside the drafter, if there)
#   BLOCKPILOT_BLOCK_SIZES  candidate range, e.g. 12-20 (default: 2 up to the drafter's / policy's largest size)
#   BLOCKPILOT_PAD_TO       batch | server (default: batch on CPU, server on GPU, see below)
# The plugin reads the BLOCKPILOT_* variables itself, in every SGLang process (plugins/sglang/settings.py).
#
# CPU needs the venv prepared by .ci/install_sglang_cpu.sh (torchvision and sgl_kernel start-up fixes);
# the flags below are the ones docs/sglang-cpu-notes.md measured. GPU: pip install "blockpilot[sglang,gpu]",
# see docs/gpu-deployment.md.
set -euo pipefail

PYTHON=${PYTHON:-python}
HOST=${HOST:-127.0.0.1}
PORT=${PORT:-30000}
assets() { "$PYTHON" -c "from blockpilot.runtime import assets; print($1)"; }
MODEL=${MODEL:-$(assets "assets.ensure_default_model()")}
DRAFTER=${DRAFTER:-$(assets "assets.DEFAULT_DRAFTER_DIR")}
DEVICE=${DEVICE:-$("$PYTHON" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")}

if [[ ! -f "$DRAFTER/config.json" ]]; then
    echo "no DFlash drafter at $DRAFTER: set DRAFTER, or train the default model's one with" >&2
    echo "  blockpilot train-drafter --config configs/drafter-smollm2.yaml" >&2
    exit 1
fi
if [[ -n "${BLOCKPILOT_POLICY:-}" ]]; then
    echo "policy: $BLOCKPILOT_POLICY (BLOCKPILOT_POLICY)"
elif [[ -f "$DRAFTER/blockpilot_policy.onnx" ]]; then
    echo "policy: $DRAFTER/blockpilot_policy.onnx (beside the drafter)"
else
    echo "policy: none (requests without their own size get the drafter's training size)"
fi

if [[ "$DEVICE" == cpu ]]; then
    # SGLang takes its CPU path only with SGLANG_USE_CPU_ENGINE=1. float32: the bf16 draft attention
    # calls a Triton kernel. --sleep-on-idle: an idle scheduler otherwise busy-polls a whole core.
    # --mem-fraction-static: SGLang's static budget is that fraction of the memory free now, and a
    # fixed one fails on a busier machine; this one covers both models' weights, the KV cache of
    # --max-total-tokens and some headroom (LocalServer's rule; a --mem-fraction-static given below wins).
    export SGLANG_USE_CPU_ENGINE=1
    MEM_FRACTION=$("$PYTHON" -c 'import sys
from blockpilot.plugins.sglang.local_server import cpu_mem_fraction
try:
    print(cpu_mem_fraction(sys.argv[1], ["--speculative-draft-model-path", sys.argv[2]]))
except RuntimeError as err:
    sys.exit(f"launch_server.sh: {err}")' "$MODEL" "$DRAFTER")
    device_args=(--device cpu --attention-backend torch_native --dtype float32
                 --max-total-tokens 8192 --mem-fraction-static "$MEM_FRACTION" --sleep-on-idle)
else
    # FlashInfer for the target and (resolved from it by the plugin) the draft. CUDA graphs are on by
    # default and captured at the server's width, the top of the block-size range; the plugin then pads
    # every step to that width (pad_to server, chosen when decode graphs are on, as DFlashWorkerV2
    # decides to capture them), so narrower requests run inside the same graphs.
    device_args=(--attention-backend flashinfer --cuda-graph-max-bs-decode "${CUDA_GRAPH_MAX_BS:-48}")
fi

echo "target: $MODEL"
echo "drafter: $DRAFTER"
echo "device: $DEVICE"
exec "$PYTHON" -m sglang.launch_server \
    --model-path "$MODEL" \
    --speculative-algorithm blockpilot \
    --speculative-draft-model-path "$DRAFTER" \
    --host "$HOST" --port "$PORT" \
    "${device_args[@]}" "$@"
