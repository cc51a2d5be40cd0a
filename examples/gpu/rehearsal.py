"""A tiny GPU run for the CPU: `run_drafter.sh rehearse` runs the prepared command on what this writes
into FOLDER, so every stage of it (data appended to a store that an earlier run began, features,
training continued from a drafter in the bundle, packing) is tried here in seconds before GPU time
is spent. The target is random (4 layers of width 64) with the default model's tokenizer, so its text
is noise but its shapes, chat template and vocabulary are the real ones."""

import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from blockpilot.runtime.assets import ensure_default_model
from blockpilot.runtime.drafter import DFlashDraftModel
from blockpilot.runtime.target import TargetModel
from blockpilot.runtime.training.datagen import DeviceGenerator, append_responses
from blockpilot.runtime.prompts import PromptRecord, encode_prompt
from blockpilot.runtime.training.response_store import ResponseStore

RECIPE = """\
work_dir: {root}/cache/work
output_dir: {root}/drafter
model: {root}/target
dtype: float32
data:
  store: {root}/store
  max_new_tokens: 12
  batch_size: 4
  check_every: 4
  instructions: 6
  instruction_max_tokens: 12
  self_questions: 4
  follow_ups: true
  num_prompts: 6
drafter:  # as v4's recipe grows the shipped drafter: one layer more, blocks twice as wide
  num_layers: 2
  num_target_features: 2
  block_size: 8
  draft_vocab: 16384  # as the GPU recipe's
train:
  init_from: {root}/cache/init
  steps: 2
  decay_within_budget: true
  sequences_per_step: 2
  anchors_per_sequence: 2
  vocab_shortlist: 256
  soft_target_weight: 0.5
  checkpoint_every: 2
  validate_every: 2
  validate_block_sizes: [4, 8]
  validate_sequences: 2
"""


def main(root: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(ensure_default_model())
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  max_position_embeddings=2048, tie_word_embeddings=True,
                                  eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(root / "target")
    tokenizer.save_pretrained(root / "target")
    target = TargetModel.load(root / "target")
    DFlashDraftModel.for_target(target, num_layers=1, num_target_features=2, block_size=4).save(root / "bundle" / "init")
    # what an earlier run left in the store
    earlier = [PromptRecord(id=f"earlier-{i}", prompt=f"Tell me about {s}.") for i, s in enumerate(["tea", "maps"])]
    append_responses(DeviceGenerator(target), earlier, ResponseStore(root / "store", target=target.weights_fingerprint()),
                     lambda r: encode_prompt(tokenizer, r), max_new_tokens=8)
    (root / "recipe.yaml").write_text(RECIPE.format(root=root))


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve())
