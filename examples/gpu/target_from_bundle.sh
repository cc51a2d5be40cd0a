# Sourced by the prepared GPU commands (run_drafter.sh, run_gpu_checks.sh): the default target rebuilt
# on the GPU machine from what the bundle carries, checked weight for weight. Needs $BUNDLE and
# $BLOCKPILOT_CACHE set and a `step` function; exits the calling script on any mismatch.
DEFAULT_TARGET_GGUF_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

rebuild_default_target() {
  step "target: the default model rebuilt from its GGUF, checked weight for weight"
  local gguf=$BLOCKPILOT_CACHE/downloads/SmolLM2-135M-Instruct.Q4_1.gguf model_dir digest
  cat "$BUNDLE"/part-* > "$gguf"
  echo "$DEFAULT_TARGET_GGUF_SHA256  $gguf" | sha256sum -c - || exit 1
  model_dir=$(python3 -c "from blockpilot.runtime.assets import ensure_default_model; print(ensure_default_model())") || exit 1
  tar -xzf "$BUNDLE/model-files.tgz" -C "$model_dir"  # this project's tokenizer and config files, byte for byte
  digest=$(python3 examples/gpu/model_digest.py "$model_dir")
  # another transformers or gguf than the bundle's maker may convert differently: say which ran
  [ "$digest" = "$(cat "$BUNDLE/model-digest.txt")" ] || { echo "target weights digest $digest differs (converted by" \
    "$(python3 -c 'from importlib.metadata import version as v; print("transformers", v("transformers"), "gguf", v("gguf"))' 2>&1 | tail -1))"; exit 1; }
}
