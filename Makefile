# BlockPilot developer entry points. `make demo` and `make test` set everything up themselves
# (a virtualenv in .venv, the default model converted once into $BLOCKPILOT_CACHE) and are idempotent.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# This machine kind has a CPU build of torch on local disk; pip takes it for this exact version.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

# The SGLang plugin is tested in its own virtualenv: SGLang's CPU install pins and patches things
# (.ci/install_sglang_cpu.sh) that the core runtime must not depend on.
SGL_VENV := .venv-sglang
SGL_BIN := $(SGL_VENV)/bin
SGL_STAMP := $(SGL_VENV)/.installed

.PHONY: install install-sglang demo test test-core test-sglang test-fast bench serve-bench serve-64 draft-vocab-sizes bench-draft-vocab padding-cost step-costs step-costs-here drafter-depth-cost linear-layouts \
	bench-sampled calibrate-verify eval-verify drafter-v1-weights drafter-v2 drafter-compare train-throughput data-throughput data-dtypes drafter-data-cpu drafter-train-cpu ship-drafter refit drafter-compare-v4 gpu-bundle clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: install
	$(BIN)/blockpilot prepare
	$(BIN)/blockpilot demo

install-sglang: $(SGL_STAMP)

$(SGL_STAMP): pyproject.toml .ci/install_sglang_cpu.sh plugins/sglang/boot.py
	test -x $(SGL_BIN)/python || $(PYTHON) -m venv $(SGL_VENV)
	$(SGL_BIN)/python -m pip install --quiet --upgrade pip
	$(SGL_BIN)/python -c "import torch" 2>/dev/null || $(SGL_BIN)/pip install --quiet "$(TORCH_SPEC)"
	bash .ci/install_sglang_cpu.sh $(SGL_BIN)/python
	$(SGL_BIN)/pip install --quiet -e ".[dev]" openai -c .ci/sglang-constraints.txt
	touch $(SGL_STAMP)

# Everything: the runtime, policy and training tests, then the SGLang plugin against real servers.
# SGLang's venv installs (mostly downloads) while the core tests run: CI is a fresh clone.
test: install
	$(MAKE) -j2 --no-print-directory test-core install-sglang
	$(MAKE) --no-print-directory test-sglang

test-core: install
	$(BIN)/blockpilot prepare
	$(BIN)/python -m pytest -q --durations=15 tests

test-sglang: install install-sglang
	$(BIN)/blockpilot prepare
	SGLANG_USE_CPU_ENGINE=1 $(SGL_BIN)/python -m pytest -q --durations=15 plugins/sglang/tests

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" tests

# Plain decoding vs fixed sizes vs the shipped policy, each with full verify and with the per-step
# verify rule, batch 1, side by side (about 16 min on a 2-core Xeon). BENCH_BATCH=8 for continuous batching.
# Sizes 2-4: the ones that can pay on this CPU (the v2 drafter's best fixed size is 3).
BENCH_SIZES ?= 2,3,4
BENCH_BATCH ?= 1
# a batch of B runs B prompts at once (batch 1: 6 in a row)
BENCH_PROMPTS ?= $(if $(filter 1,$(BENCH_BATCH)),6,$(BENCH_BATCH))
# interleaved repeats: at batch 1, 3 runs each of the 18 orders of the 9 variants (runtime/bench.py) once
BENCH_REPEATS ?= 3
bench: install
	$(BIN)/blockpilot prepare
	$(BIN)/blockpilot bench --num-prompts $(BENCH_PROMPTS) --block-sizes $(BENCH_SIZES) --block-size auto --repeats $(BENCH_REPEATS) \
		--max-new-tokens 256 --batch-size $(BENCH_BATCH) --max-batch-size $(BENCH_BATCH) --verify both \
		--output-dir runs/bench-batch$(BENCH_BATCH)

# Sampled requests (temperature 1, the paper's setting): plain vs fixed sizes 3 and 4, each with the
# drafter's sampled drafts and with argmax drafts (SGLang DFLASH's way), full verify, batch 1, side by
# side (about 8 min here).
bench-sampled: install
	$(BIN)/blockpilot prepare
	$(BIN)/blockpilot bench --temperature 1 --seed 0 --num-prompts 8 --block-sizes 3,4 --repeats 2 \
		--max-new-tokens 96 --verify full --compare-draft-sampling --output-dir runs/bench-sampled

# The BlockPilot SGLang server against SGLang without speculation, same model and flags, concurrency
# 1/8/16, alternating (about 25 min here; outside CI). SERVE_VARIANTS: policy mixed dflash fixed-N fixed-N-full;
# SERVE_ENV: BLOCKPILOT_* settings for the BlockPilot server, e.g. BLOCKPILOT_VERIFY=full.
SERVE_CONCURRENCY ?= 1 8 16
SERVE_VARIANTS ?= policy mixed dflash
# SERVE_REPEATS: interleaved passes per level (medians over them); 2 doubles the ~25 min.
SERVE_REPEATS ?= 1
SERVE_ENV ?=
serve-bench: install install-sglang
	$(BIN)/blockpilot prepare
	$(SGL_BIN)/python -m blockpilot.plugins.sglang.serve_bench --concurrency $(SERVE_CONCURRENCY) \
		--variants $(SERVE_VARIANTS) --repeats $(SERVE_REPEATS) $(if $(SERVE_ENV),--env $(SERVE_ENV)) --output-dir runs/serve-bench

# 64 concurrent requests at mixed block sizes (1, 2, 3, 6, auto, policy) against the plain server:
# all complete, and how many outputs equal the plain server's token for token (outside CI).
serve-64: install install-sglang
	$(BIN)/blockpilot prepare
	$(SGL_BIN)/python -m blockpilot.plugins.sglang.serve_bench --concurrency 64 --rounds 1 --max-new-tokens 48 \
		--variants mixed --output-dir runs/serve-64

# Draft vocabularies of several sizes beside every token, for the shipped drafter: MT-Bench acceptance
# (replayed) and the draft's cost here (measured interleaved; nothing else may run). About 8 min.
draft-vocab-sizes: install
	$(BIN)/blockpilot prepare
	$(BIN)/python examples/draft_vocab_sizes.py --output runs/draft_vocab_sizes.json

# Decoding at block 3 from the draft vocabulary and from every token, side by side with plain decoding.
bench-draft-vocab: install
	$(BIN)/blockpilot prepare
	$(BIN)/blockpilot bench --num-prompts $(BENCH_PROMPTS) --block-sizes 3 --repeats 3 --verify full \
		--max-new-tokens 256 --compare-draft-vocab --output-dir runs/bench-draft-vocab

# Ragged vs padded-to-widest decode steps for mixed-width batches (the SGLang plugin pads).
padding-cost: install
	$(BIN)/blockpilot step-costs --mixed 16,16,16,16 12,14,16,20 12,12,12,20 12-20 4,16 --output runs/padding_cost.json

# What a linear layer costs per row count in each weight layout here (why `runtime/cpu_linear.py`
# keeps two); nothing else may run meanwhile.
linear-layouts: install
	$(BIN)/python examples/linear_layouts.py

# This machine's step-cost table (what the per-step verify rule reads); the shipped one came from
# `make step-costs STEP_COSTS=runtime/assets/smollm2-135m-instruct-dflash/step_costs.json` on an idle machine.
STEP_COSTS ?= runs/step_costs.json
step-costs: install
	$(BIN)/blockpilot step-costs --dtypes float32 --output $(STEP_COSTS) --report runs/step_costs_raw.json

# This machine's own tables, where the engine and the SGLang plugin (measured GEMM kernels; torch's
# F.linear: the plugin with BLOCKPILOT_TARGET_KERNELS=sglang) look for them
# first (the cache folder, by CPU model): a table measured on another CPU can price steps far off.
# About 2 min on an idle machine.
step-costs-here: install
	$(BIN)/blockpilot prepare
	$(BIN)/blockpilot step-costs --dtypes float32 --this-machine
	$(BIN)/blockpilot step-costs --dtypes float32 --this-machine --cpu-weight-layouts 1

# What a deeper drafter costs per decode step beside the verify (fresh 2-5 layer drafters shaped as the
# shipped one), and the acceptance gain each depth must bring to pay; nothing else may run meanwhile.
drafter-depth-cost: install
	$(BIN)/blockpilot prepare
	$(BIN)/blockpilot step-costs --drafter-layers 2-5 --widths 2,3,4,6,8 --batch-sizes 1,8 --repeats 21 \
		--report runs/drafter_depth_cost.json

# The drafter data stage's generated tokens/s (its batched generator), at a small scale; on a GPU machine
# run the same command without the --set options (the recipe's batch of 512 rows).
data-throughput: install
	$(BIN)/blockpilot prepare
	$(BIN)/blockpilot train-drafter --config configs/drafter-smollm2-v4-gpu.yaml --stage bench-data \
		--set data.batch_size=4 --set data.max_new_tokens=16 --set data.instruction_max_tokens=16

# The same generator on this CPU at a batch that keeps 2 cores busy, float32 against bfloat16, one after
# the other (nothing else may run meanwhile).
data-dtypes: install
	$(BIN)/blockpilot prepare
	for dtype in float32 bfloat16; do $(BIN)/blockpilot train-drafter --config configs/drafter-smollm2-v4-gpu.yaml \
		--stage bench-data --set data.cpu_dtype=$$dtype --set data.batch_size=64 --set data.max_new_tokens=128 \
		--set data.instruction_max_tokens=64 || exit 1; done

# Adds the target's responses to the drafter's carried store (runtime/assets/.../data) on a CPU, for
# DATA_MINUTES: new instructions the target writes, its answers, second turns, then the stdlib prompts;
# it stops between chunks and keeps what it made, and the next run goes on from there. Commit the store after.
DATA_MINUTES ?= 60
DATA_CPU_SET ?= --set data.cpu_dtype=bfloat16 --set data.batch_size=64 --set data.instructions=4000 \
	--set data.self_questions=0
drafter-data-cpu: install
	$(BIN)/blockpilot prepare
	$(BIN)/blockpilot train-drafter --config configs/drafter-smollm2-v4-gpu.yaml --stage data \
		--minutes $(DATA_MINUTES) $(DATA_CPU_SET)
	$(BIN)/python -m blockpilot.runtime.training.response_store info runtime/assets/smollm2-135m-instruct-dflash/data

# A drafter v4 candidate trained on this CPU between GPU runs (configs/drafter-smollm2-v4-cpu.yaml): the
# shipped drafter continued on the carried store for TRAIN_MINUTES of training (features first, once:
# ~1 min per store shard on 2 cores), the eval stage on MT-Bench into the candidate's folder, then the
# shipped drafter and the candidate replayed side by side on the same MT-Bench answers. It never writes
# the shipped asset; a candidate that beats it is shipped by `make ship-drafter`. Stages resume:
# to continue a newly shipped drafter, first remove the work folder's checkpoints/ (its features stay).
DRAFTER_V4_CPU := configs/drafter-smollm2-v4-cpu.yaml
# the CPU recipe's work_dir
DRAFTER_V4_CPU_WORK = $(BLOCKPILOT_CACHE_DIR)/drafter-smollm2-v4-cpu
# the shipped drafter beside others, replayed on the eval stage's MT-Bench answers
REPLAY_BESIDE_SHIPPED = $(BIN)/python examples/compare_drafters.py --sizes 2-8 --reference $(DRAFTER_V4_CPU_WORK)/eval-reference $(SHIPPED_DRAFTER)
SHIPPED_DRAFTER := runtime/assets/smollm2-135m-instruct-dflash
BLOCKPILOT_CACHE_DIR = $(shell $(BIN)/python -c "from blockpilot.runtime.assets import cache_dir; print(cache_dir())")
TRAIN_MINUTES ?= 60
# recipe overrides for both stages, e.g. the shipped drafter's own shape:
# TRAIN_CPU_SET='--set drafter.num_layers=2 --set drafter.block_size=4 --set train.validate_block_sizes=[2,4]'
TRAIN_CPU_SET ?=
drafter-train-cpu: install
	$(BIN)/blockpilot prepare
	$(BIN)/blockpilot train-drafter --config $(DRAFTER_V4_CPU) --stage train --minutes $(TRAIN_MINUTES) $(TRAIN_CPU_SET)
	$(BIN)/blockpilot train-drafter --config $(DRAFTER_V4_CPU) --stage eval $(TRAIN_CPU_SET)
	$(REPLAY_BESIDE_SHIPPED) $(DRAFTER_V4_CPU_WORK)/candidate

# Ship the CPU recipe's evaluated candidate (the same TRAIN_CPU_SET as it was trained with): weights,
# config and summaries into the shipped asset, its model card rewritten there; then refit what names
# the drafter it was fitted for.
ship-drafter: install
	$(BIN)/blockpilot train-drafter --config $(DRAFTER_V4_CPU) --stage ship $(TRAIN_CPU_SET)
	$(MAKE) --no-print-directory refit

# After a new drafter: the policy (collect replays it on the kept greedy references, then train,
# export with its one-size guard, evaluate on MT-Bench into docs/policy-smollm2) and the verify rule
# (calibration beside the drafter, then its evaluation into docs/verify-smollm2).
POLICY_RECIPE := configs/policy-smollm2.yaml
refit: install
	$(BIN)/blockpilot prepare
	for stage in collect train-policy export-policy eval-policy calibrate-verify eval-verify; do \
		$(BIN)/blockpilot $$stage --config $(POLICY_RECIPE) || exit 1; done

# Drafter v4's recipe, chosen by measurement on the carried store: each variant continues the shipped
# drafter for COMPARE_MINUTES of training (bf16 autocast) and is then replayed on the store's held-out
# part, and all beside the shipped drafter on MT-Bench (work folder's compare/: table, JSON, plot).
drafter-compare-v4: install
	$(BIN)/blockpilot prepare
	$(BIN)/blockpilot train-drafter --config $(DRAFTER_V4_CPU) --stage compare --minutes $(COMPARE_MINUTES) \
		--set "train.validate_block_sizes=[2,4,6,8]" \
		--variant "block4:train.loss_decay=0.8" \
		--variant "block8:drafter.block_size=8" \
		--variant "block8-gamma7:drafter.block_size=8,train.loss_gamma=7" \
		--variant "block8-3layers:drafter.block_size=8,drafter.num_layers=3" $(COMPARE_MORE)
	$(REPLAY_BESIDE_SHIPPED) $(DRAFTER_V4_CPU_WORK)/compare/*/drafter

# What a prepared GPU command reads (GPU_RUN=checks: examples/gpu/run_gpu_checks.sh; drafter: run_drafter.sh),
# in pieces that each travel beside the checkout in one copy to a GPU machine reached only by copying
# files, and .gpu/PLAN.md: the copies and the run, in order (docs/gpu-deployment.md, docs/drafter-training.md).
GPU_RUN ?= checks
gpu-bundle: install
	$(BIN)/python examples/gpu/bundle.py --for $(GPU_RUN)

# The verify rule's calibration (held-apart prompts) and its held-out evaluation (MT-Bench, projected).
calibrate-verify: install
	$(BIN)/blockpilot prepare
	$(BIN)/blockpilot calibrate-verify --config $(POLICY_RECIPE)

eval-verify: install
	$(BIN)/blockpilot prepare
	$(BIN)/blockpilot eval-verify --config $(POLICY_RECIPE)

# Drafter v2: v1 continued with soft targets on chat-like data. Each stage resumes.
# `drafter-compare` trains recipe variants for the same minutes from v1 on the same data, side by side.
DRAFTER_V2 := configs/drafter-smollm2-v2.yaml
DRAFTER_V1_COMMIT := 205eb63
DRAFTER_V1_DIR = $(BLOCKPILOT_CACHE_DIR)/drafter-smollm2-v1
COMPARE_MINUTES ?= 10
# more variants, e.g. COMPARE_MORE='--variant "soft-deeper:train.soft_target_weight=0.5,drafter.num_layers=3"'
COMPARE_MORE ?=
# what every compared variant sets (validated twice as often as the recipe: the curves need points)
COMPARE_EVERY_VARIANT = train.validate_every=100
drafter-v1-weights: install
	mkdir -p $(DRAFTER_V1_DIR)
	git archive $(DRAFTER_V1_COMMIT) runtime/assets/smollm2-135m-instruct-dflash/config.json \
		runtime/assets/smollm2-135m-instruct-dflash/model.safetensors | tar -x --strip-components=3 -C $(DRAFTER_V1_DIR)

drafter-v2: install drafter-v1-weights
	$(BIN)/blockpilot prepare
	$(BIN)/blockpilot train-drafter --config $(DRAFTER_V2)

drafter-compare: install drafter-v1-weights
	$(BIN)/blockpilot prepare
	$(BIN)/blockpilot train-drafter --config $(DRAFTER_V2) --stage compare --minutes $(COMPARE_MINUTES) \
		--variant "hard:train.soft_target_weight=0,$(COMPARE_EVERY_VARIANT)" \
		--variant "soft:train.soft_target_weight=0.5,$(COMPARE_EVERY_VARIANT)" \
		--variant "soft-early:train.soft_target_weight=0.5,drafter.block_size=4,train.anchors_per_sequence=64,$(COMPARE_EVERY_VARIANT)" \
		$(COMPARE_MORE)

# Training's supervised positions per second at a recipe's shapes (synthetic data: no stage before it),
# the same command on a CPU and on a GPU; under `torchrun --nproc_per_node N` every process's together.
# On a CPU, a small batch gives the figure in seconds:
#   make train-throughput TRAIN_BENCH_STEPS=3 TRAIN_BENCH_SET="--set train.sequences_per_step=4 --set train.anchors_per_sequence=16"
TRAIN_BENCH_CONFIG ?= configs/drafter-smollm2-v3-gpu.yaml
TRAIN_BENCH_STEPS ?= 20
TRAIN_BENCH_SET ?=
train-throughput: install
	$(BIN)/blockpilot prepare
	$(BIN)/blockpilot train-drafter --config $(TRAIN_BENCH_CONFIG) --stage bench-train --steps $(TRAIN_BENCH_STEPS) \
		$(TRAIN_BENCH_SET)

clean:
	rm -rf $(VENV) $(SGL_VENV) runs *.egg-info
