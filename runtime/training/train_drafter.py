"""The DFlash training loop: target frozen, drafter layers (and fc / norms) trained.

Each step takes a few training sequences (prompt + the target's own response) and, in each,
random anchor positions p inside the response. A block `[token_p, MASK x (B - 1)]` at positions
p..p+B-1 sees the target's context features of tokens 0..p-1 and must predict tokens p+1..p+B-1,
exactly the query the runtime asks at a decode step whose bonus token sits at p. Cross-entropy
through the target's lm_head, weighted by block position (`losses.position_weights`: early positions
decide the accepted length, so they matter most), over chunks of positions (`losses.head_loss`).

Soft targets (`soft_target_weight` > 0): the loss also pulls the drafter's distribution at each
position toward the target's own (KL over the vocabulary shortlist, from the target's final hidden
state stored with the features). One label says which token the target chose; its distribution also
says how sure it was and what else it weighed: more signal per position, and confidences that mean
what they say, which the per-step verify rule reads.

At GPU speed: bf16 autocast on CUDA, each step's batch built on a background thread while the
previous one trains, and data-parallel under torchrun (`parallel`): every process draws the same
global batch plan from the step number and trains on its slice of it.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import math
import os
import random
import tempfile
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils import parametrize
from tqdm import tqdm

from ..blocks import accepted_prefix, anchored_draft_mask
from ..draft_vocab import DraftVocabulary, most_frequent_tokens
from ..drafter import DFlashDraftModel
from ..target import TargetModel
from .features import Sequence
from .losses import LOSS_CHUNK_POSITIONS, head_loss, position_weights
from .parallel import Workers, join
from .prompt_sets import prompt_part


def split_by_part(sequences: list[Sequence]) -> tuple[list[Sequence], list[Sequence]]:
    """(train, validation) by each prompt's fixed part; prompts reserved for the policy are left out."""
    parts = {"drafter-train": [], "drafter-validation": [], "policy": []}
    for s in sequences:
        parts[prompt_part(s.id)].append(s)
    return parts["drafter-train"], parts["drafter-validation"]


class TrainingBatch(NamedTuple):
    features: torch.Tensor  # [b, context, k * hidden] the target's context features
    tokens: torch.Tensor  # [b, W] each block: the anchor token, then masks
    positions: torch.Tensor  # [b, W]
    labels: torch.Tensor  # [b, W] the target's token at each predicted position, -100 where none
    visible: torch.Tensor  # the draft attention mask (blocks.anchored_draft_mask)
    teacher: torch.Tensor | None  # [b, W, hidden] the target's final hidden state that predicted each label


def make_batch(sequences: list[Sequence], rng: random.Random, anchors: int, block_size: int,
               mask_token_id: int, float_dtype: torch.dtype = torch.float32) -> TrainingBatch:
    """Tensors for one training step, at `anchors` random positions inside each response."""
    return batch_for_anchors(sequences, choose_anchors(sequences, rng, anchors), anchors, block_size,
                             mask_token_id, float_dtype)


def choose_anchors(sequences: list[Sequence], rng: random.Random, anchors: int) -> list[list[int]]:
    """Up to `anchors` random anchor positions inside each response, sorted."""
    chosen = []
    for s in sequences:
        candidates = range(s.prompt_len, len(s.tokens) - 1)  # the anchor needs at least one label after it
        chosen.append(sorted(rng.sample(candidates, min(anchors, len(candidates)))) if len(candidates) else [])
    return chosen


def batch_for_anchors(sequences: list[Sequence], chosen: list[list[int]], anchors: int, block_size: int,
                      mask_token_id: int, float_dtype: torch.dtype = torch.float32,
                      pin_memory: bool = False) -> TrainingBatch:
    """Context features, blocks, positions, labels, attention mask (and the soft targets' hidden states
    when the sequences carry them) for blocks at the given anchor positions (at most `anchors` per
    sequence; unused slots are inert). `float_dtype` float16 keeps the stored features' own type (no
    conversion on the CPU: `batch_to` makes them float32 on the training device). `pin_memory` puts the
    two big tensors in page-locked memory (reused from batch to batch) for a copy to a GPU."""
    batch_size = len(sequences)
    context_len = max(max(a) if a else 1 for a in chosen)
    width = anchors * block_size
    # Not zero-filled: every row is written below (the features, or zeros past a sequence's end).
    features = torch.empty(batch_size, context_len, sequences[0].features.shape[1], dtype=float_dtype,
                           pin_memory=pin_memory)
    tokens = torch.full((batch_size, width), mask_token_id, dtype=torch.long)
    positions = torch.zeros(batch_size, width, dtype=torch.long)
    labels = torch.full((batch_size, width), -100, dtype=torch.long)
    with_teacher = all(s.final_hidden is not None for s in sequences)
    teacher = (torch.zeros(batch_size, width, sequences[0].final_hidden.shape[1], dtype=float_dtype,
                           pin_memory=pin_memory) if with_teacher else None)
    offsets = torch.arange(block_size)
    for i, (s, anchor_list) in enumerate(zip(sequences, chosen)):
        known = min(context_len, len(s.tokens))
        features[i, :known].numpy()[:] = s.features[:context_len]  # numpy casts
        features[i, known:] = 0
        if not anchor_list:
            continue
        # All of a sequence's blocks at once (a Python loop over anchors is most of a GPU step's time):
        # block a fills columns a * B .. a * B + B - 1.
        seq = torch.from_numpy(s.tokens.astype(np.int64))
        count, starts = len(anchor_list), torch.tensor(anchor_list)
        cells = starts[:, None] + offsets  # [count, B] the sequence position of every block cell
        used = slice(0, count * block_size)
        positions[i, used] = cells.flatten()
        tokens[i, torch.arange(count) * block_size] = seq[starts]
        predicted = cells < len(seq)
        predicted[:, 0] = False  # the anchor itself is given, not predicted
        labels[i, used].view(count, block_size)[predicted] = seq[cells[predicted]]
        if with_teacher:  # the label at t was predicted from the target's hidden state at t - 1
            sources = (cells[predicted] - 1).numpy()
            teacher[i, used].view(count, block_size, -1)[predicted] = torch.from_numpy(
                np.asarray(s.final_hidden[sources])).to(float_dtype)
    visible = anchored_draft_mask(chosen, anchors, block_size, context_len)
    return TrainingBatch(features, tokens, positions, labels, visible, teacher)


class TrainingForward(torch.nn.Module):
    """The drafter over a training batch as one module call: what DistributedDataParallel wraps (it
    synchronises gradients around a module's forward, and the drafter's own entry points are others)."""

    def __init__(self, drafter: DFlashDraftModel):
        super().__init__()
        self.drafter = drafter

    def forward(self, features, block_embeddings, positions, visible):
        """Drafter outputs `[b, W, hidden]` (context K/V built with gradients)."""
        context_positions = torch.arange(features.shape[1], device=features.device).expand(features.shape[0], -1)
        kv = [(k.transpose(1, 2), v.transpose(1, 2)) for k, v in self.drafter.context_kv(features, context_positions)]
        return self.drafter.forward_block(block_embeddings, positions, kv, visible)


def drafter_hidden(drafter, target: TargetModel, features, tokens, positions, visible):
    """Drafter outputs `[b, W, hidden]` for a training batch; `drafter` is the drafter itself or the
    DistributedDataParallel around its TrainingForward."""
    forward = TrainingForward(drafter) if isinstance(drafter, DFlashDraftModel) else drafter
    return forward(features, target.embed_tokens(tokens), positions, visible)


def vocabulary_shortlist(answers: Iterable[np.ndarray], size: int) -> torch.Tensor | None:
    """The `size` most frequent tokens of the answers (response token ids), or None for the whole vocabulary.

    The lm_head over 49k tokens is most of a training step's cost on a CPU; the target's responses
    use far fewer (a few thousand cover >99.9%), so the softmax runs over those plus the batch's
    own labels. Validation and inference always use the full vocabulary.
    """
    if not size:
        return None
    return most_frequent_tokens(answers, size)


def answers_of(sequences: list[Sequence]) -> list[np.ndarray]:
    """Each sequence's response token ids."""
    return [s.tokens[s.prompt_len:] for s in sequences]


def step_loss(drafter, target, batch: TrainingBatch, weights, shortlist: torch.Tensor | None = None,
              soft_target_weight: float = 0.0, normaliser: torch.Tensor | None = None,
              chunk_positions: int = LOSS_CHUNK_POSITIONS):
    """(weighted loss, accuracy): `(1 - s) * cross-entropy + s * KL(target || drafter)` per position,
    s = `soft_target_weight` (the KL needs the batch's teacher states), through the vocabulary head
    in chunks of `chunk_positions` (`losses.head_loss`, which says what `normaliser` is for)."""
    if soft_target_weight and batch.teacher is None:
        raise ValueError("soft targets need the target's final hidden states: compute the features "
                         "with with_final_hidden (train.soft_target_weight > 0 does)")
    hidden = drafter_hidden(drafter, target, batch.features, batch.tokens, batch.positions, batch.visible)
    where = batch.labels >= 0
    targets = batch.labels[where]
    head = target.lm_head.weight
    if shortlist is not None:
        vocab = torch.unique(torch.cat([shortlist, targets]))  # sorted, so labels map by searchsorted
        head = head[vocab]
        targets = torch.searchsorted(vocab, targets)
    teacher = batch.teacher[where] if soft_target_weight else None
    loss, correct = head_loss(hidden[where], head, targets, weights.expand_as(batch.labels)[where], teacher,
                              soft_target_weight, normaliser, chunk_positions)
    return loss, float(correct) / max(len(targets), 1)


@torch.no_grad()
def expected_acceptance(drafter, target, sequences, block_size, mask_token_id, anchors=8, seed=1234) -> float:
    """Mean tokens per verify (bonus included) the drafter reaches from random points of held-out
    target responses. Optimistic: decoding only ever starts a block right after the drafter's last
    miss, where the text is harder than at a random point (see `replayed_acceptance`)."""
    rng = random.Random(seed)
    total, count = 0.0, 0
    for start in range(0, len(sequences), 8):
        batch = make_batch(sequences[start:start + 8], rng, anchors, block_size, mask_token_id)
        hidden = drafter_hidden(drafter, target, batch.features, batch.tokens, batch.positions, batch.visible)
        predictions = drafter.logits(target.lm_head, hidden).argmax(-1)
        grid_pred = predictions.view(len(batch.features), anchors, block_size)[..., 1:]
        grid_label = batch.labels.view(len(batch.features), anchors, block_size)[..., 1:]
        used = grid_label[..., 0] >= 0
        accepted = accepted_prefix(grid_pred, grid_label)
        total += float((accepted + 1)[used].sum())
        count += int(used.sum())
    return total / max(count, 1)


@torch.no_grad()
def replayed_acceptance(drafter, target, sequences: list[Sequence], block_size: int, limit: int = 64) -> float:
    """The runtime's acceptance length on held-out responses: greedy decoding at `block_size` replayed
    step by step (runtime/replay.py), each block starting where the previous one stopped."""
    from ..replay import prepare, replay_fixed_size

    replays = [prepare(drafter, s.id, s.tokens, s.prompt_len, np.asarray(s.features, dtype=np.float32),
                       len(s.tokens) - s.prompt_len) for s in sequences[:limit]]
    results = replay_fixed_size(target, drafter, replays, block_size)
    forwards = sum(r.target_forwards for r in results)
    return sum(r.generated_tokens - 1 for r in results) / max(forwards, 1)


def feature_scale(sequences: list[Sequence], sample_tokens: int = 50_000, seed: int = 0) -> torch.Tensor:
    """Per-dimension RMS of the target features over a sample of training tokens."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in rng.permutation(len(sequences))[: max(1, sample_tokens // 200)]:
        rows.append(np.asarray(sequences[s].features, dtype=np.float32))
    sample = np.concatenate(rows)[:sample_tokens]
    return torch.from_numpy(np.sqrt((sample ** 2).mean(0))).clamp_min(1e-2)


class DivideColumns(torch.nn.Module):
    """fc's weight as `trained / scale` (per input column).

    The target's hidden states carry massive activations (SmolLM2: |x| up to ~25k in a few
    dimensions of layers 18 and 27, typical |x| ~5): with fc trained directly, every Adam step on a
    weight of such a dimension moves the drafter's context by ~25k x lr and training crawls. Trained
    on unit-scale inputs instead and folded back into fc.weight at the end, the saved drafter keeps
    the published format unchanged."""

    def __init__(self, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("scale", scale)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight / self.scale

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        """A saved (folded) fc weight as the trained parameter: training continues a shipped drafter."""
        return weight * self.scale


def starting_weights(directory: str, drafter: DFlashDraftModel) -> dict:
    """The state of a saved drafter to continue training from, refused unless it has this recipe's shape.

    A recipe with more layers than the saved drafter keeps the saved layers and appends fresh ones
    whose output projections (attention o_proj, MLP down_proj) are zero: a residual layer that adds
    nothing, so training starts from exactly the saved drafter's predictions and grows the capacity."""
    saved = DFlashDraftModel.load(directory, dtype=torch.float32)
    mine, theirs = drafter.state_dict(), dict(saved.state_dict())
    added = range(saved.config.num_hidden_layers, drafter.config.num_hidden_layers)
    for i in added:
        for key, value in mine.items():
            if key.startswith(f"layers.{i}."):
                zero = key.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight"))
                theirs[key] = torch.zeros_like(value) if zero else value.clone()
    different = sorted(k for k in mine.keys() | theirs.keys()
                       if k not in mine or k not in theirs or mine[k].shape != theirs[k].shape)
    if different or saved.config.target_layer_ids != drafter.config.target_layer_ids:
        raise ValueError(f"train.init_from {directory}: that drafter's shape differs from the recipe's "
                         f"(weights {different[:4]}, target layers {saved.config.target_layer_ids} vs "
                         f"{drafter.config.target_layer_ids})")
    return theirs


class DeviceHeads(torch.nn.Module):
    """The two target pieces a training step uses (embeddings, lm_head), copied to the training device;
    the target itself stays on the CPU, where validation replays decoding with the runtime's code."""

    def __init__(self, target: TargetModel, device: torch.device):
        super().__init__()
        self.embed_tokens = copy.deepcopy(target.embed_tokens).to(device)
        self.lm_head = copy.deepcopy(target.lm_head).to(device)


def training_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def training_hardware(processes: int = 1) -> str:
    """Where the training steps run, in words (the model card says it); `processes` data-parallel ones."""
    import platform

    cpu = f"a {os.cpu_count()}-core {platform.machine()} CPU"
    if training_device().type == "cuda":
        gpus = "one" if processes == 1 else f"{processes} x"
        return f"{gpus} {torch.cuda.get_device_name()} (validation on {cpu})"
    return f"{cpu} (no GPU)" if processes == 1 else f"{processes} processes on {cpu} (no GPU)"


def batch_to(batch: TrainingBatch, device: torch.device) -> TrainingBatch:
    """The batch on `device`, float16 tensors (the stored features) widened to float32 there."""
    def moved(t):
        t = t.to(device, non_blocking=True)
        return t.float() if t.dtype == torch.float16 else t
    return TrainingBatch(*(moved(t) if t is not None else None for t in batch))


def learning_rate_at(cfg, step: int, budget_spent: float | None = None) -> float:
    """Linear warm-up over `cfg.warmup_steps`, then a cosine from `cfg.learning_rate` down to a tenth of
    it over the rest of `cfg.steps`, or over the rest of a time budget where `budget_spent` (the fraction
    of it used) is further on."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    if budget_spent is not None:
        progress = max(progress, budget_spent)
    return cfg.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def train(recipe, target: TargetModel, sequences: list[Sequence], log_path: Path,
          total_minutes: float | None = None, more_minutes: float | None = None,
          workers: Workers | None = None, answers: list[np.ndarray] | None = None) -> DFlashDraftModel:
    """Train (or resume) the recipe's drafter to `train.steps`; on a CUDA device when there is one (bf16
    autocast there, float32 on the CPU), validating on the CPU. It stops early, validated at the stop,
    once its training time (validation not counted) reaches `total_minutes` (equal budgets compare
    recipes, and a resumed run keeps its budget) or `more_minutes` beyond what its checkpoint holds.

    Under torchrun (`workers`, default `parallel.join()`) each process trains on its slice of every
    global batch of `train.sequences_per_step` sequences; only the first one validates and writes.

    `answers` (default: the training sequences' responses) are what the token statistics count (the
    draft vocabulary, the loss's shortlist): a run on part of a store still ranks tokens over all of it."""
    if total_minutes is not None and more_minutes is not None:
        raise ValueError("train(): give total_minutes or more_minutes, not both")
    workers = workers or join()
    cfg, shape = recipe.train, recipe.drafter
    train_set, validation = split_by_part(sequences)
    validation = validation[:cfg.validate_sequences]  # None: all of them
    answers = answers if answers is not None else answers_of(train_set)
    checkpoint = recipe.checkpoint_dir / "last.pt"
    drafter = DFlashDraftModel.for_target(target, num_layers=shape.num_layers,
                                          num_target_features=shape.num_target_features,
                                          block_size=shape.block_size, seed=cfg.seed).float().train()
    if shape.draft_vocab:  # validated, saved and shipped with the drafts it will make
        drafter.vocabulary = DraftVocabulary(vocabulary_shortlist(answers, shape.draft_vocab), target.vocab_size,
                                             source=f"the training set's {shape.draft_vocab} most frequent tokens")
    if cfg.init_from and not checkpoint.exists():
        drafter.load_state_dict(starting_weights(cfg.init_from, drafter))
    drafter.requires_grad_(True)
    parametrize.register_parametrization(drafter.fc, "weight", DivideColumns(feature_scale(train_set)))
    device = training_device()
    drafter.to(device)
    heads = target if device.type == "cpu" else DeviceHeads(target, device)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" or cfg.cpu_autocast
                else contextlib.nullcontext())
    optimizer = torch.optim.AdamW(drafter.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                  betas=(0.9, 0.95), fused=device.type == "cuda")
    step, elapsed, train_s = 0, 0.0, 0.0
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False, map_location=device)
        drafter.load_state_dict(state["drafter"])
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed, train_s = state["step"], state.get("elapsed_s", 0.0), state.get("train_s", 0.0)
    model = drafter
    if workers.world_size > 1:
        model = DistributedDataParallel(TrainingForward(drafter),
                                        device_ids=[torch.cuda.current_device()] if device.type == "cuda" else None)
    time_budget_s = (total_minutes * 60 if total_minutes is not None
                     else train_s + more_minutes * 60 if more_minutes is not None else None)
    mask_id = drafter.config.mask_token_id
    weights = position_weights(shape.block_size, cfg.anchors_per_sequence, cfg.loss_decay, cfg.loss_gamma).to(device)
    supervised, trained_before = 0, train_s  # labelled block positions, and training time, since this run (re)started
    shortlist = vocabulary_shortlist(answers, cfg.vocab_shortlist)
    shortlist = shortlist.to(device) if shortlist is not None else None

    def learning_rate(s: int, seconds: float) -> float:
        spent = None  # the fraction of this run's time budget spent
        if cfg.decay_within_budget and time_budget_s is not None and time_budget_s > trained_before:
            spent = (seconds - trained_before) / (time_budget_s - trained_before)
        return learning_rate_at(cfg, s, spent)

    def batch_of(s: int) -> TrainingBatch:
        """This process's slice of step `s`'s global batch, drawn from the step number alone: every process
        agrees on it whatever their count, and a resumed run continues with the batches it would have had."""
        rng = random.Random(f"{cfg.seed}:{s}")
        chosen = rng.sample(train_set, cfg.sequences_per_step)
        anchors = choose_anchors(chosen, rng, cfg.anchors_per_sequence)
        return batch_for_anchors(workers.shard(chosen), workers.shard(anchors), cfg.anchors_per_sequence,
                                 shape.block_size, mask_id, torch.float16, pin_memory=device.type == "cuda")

    if workers.main:
        log_path.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=cfg.steps, initial=step, desc="train drafter", unit="step", disable=not workers.main)
    began = time.perf_counter() - elapsed
    # The next batches are built on CPU threads while this one trains (copies from the memory-mapped
    # features, which release the GIL): a big batch takes one thread longer than a GPU step.
    ahead = max(1, min(4, (os.cpu_count() or 1) // (2 * workers.world_size)))
    builder = ThreadPoolExecutor(max_workers=ahead)
    upcoming = {s: builder.submit(batch_of, s) for s in range(step, min(step + ahead, cfg.steps))}
    while step < cfg.steps:
        step_began = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, train_s)
        batch = batch_to(upcoming.pop(step).result(), device)
        if step + ahead < cfg.steps:
            upcoming[step + ahead] = builder.submit(batch_of, step + ahead)
        where = batch.labels >= 0
        # The loss over the global batch: each process's weighted sum over the whole batch's weights.
        normaliser = workers.sum(weights.expand_as(batch.labels)[where].sum()) / workers.world_size
        with autocast:
            loss, accuracy = step_loss(model, heads, batch, weights, shortlist, cfg.soft_target_weight,
                                       normaliser, cfg.loss_chunk_positions)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(drafter.parameters(), 1.0)
        optimizer.step()
        step += 1
        labelled = int(where.sum())
        seconds = time.perf_counter() - step_began
        totals = workers.sum(torch.tensor([loss.item(), accuracy * labelled, labelled, seconds],
                                          dtype=torch.float64, device=device)).tolist()
        train_s += totals[3] / workers.world_size  # the mean: every process stops at the same step
        supervised += int(totals[2])
        now = time.perf_counter()
        out_of_time = time_budget_s is not None and train_s >= time_budget_s
        record = {"step": step, "loss": round(totals[0] / workers.world_size, 4),
                  "accuracy": round(totals[1] / max(totals[2], 1), 4), "lr": optimizer.param_groups[0]["lr"],
                  "elapsed_s": round(now - began, 1), "train_s": round(train_s, 3), "positions": supervised,
                  "supervised_per_s": round(supervised / max(train_s - trained_before, 1e-9), 1)}
        if workers.main:
            if validation and (step % cfg.validate_every == 0 or step == cfg.steps or out_of_time):
                record.update(validate(drafter, target, validation, shape.block_size, cfg.validate_block_sizes))
            with open(log_path, "a") as log:
                log.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=record["loss"], acc=record["accuracy"],
                            tau=record.get("val_replayed_acceptance_length", ""))
            bar.update(1)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps or out_of_time:
                checkpoint.parent.mkdir(parents=True, exist_ok=True)
                torch.save({"drafter": drafter.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                            "elapsed_s": time.perf_counter() - began, "train_s": train_s,
                            "config": asdict(cfg)}, checkpoint.with_suffix(".tmp"))
                checkpoint.with_suffix(".tmp").rename(checkpoint)
        if out_of_time:
            break
    builder.shutdown(cancel_futures=True)
    bar.close()
    workers.barrier()  # the last checkpoint written before any process goes on
    parametrize.remove_parametrizations(drafter.fc, "weight", leave_parametrized=True)
    return drafter.cpu().eval().requires_grad_(False)


def validate(drafter: DFlashDraftModel, target: TargetModel, validation: list[Sequence], block_size: int,
             replay_sizes: list[int]) -> dict:
    """Held-out acceptance, on the CPU (the runtime's replay): from random anchors at the training block
    size, and replayed decoding at it and at each of `replay_sizes`."""
    on_cpu = drafter if next(drafter.parameters()).device.type == "cpu" else copy.deepcopy(drafter).cpu()
    was_training = on_cpu.training
    on_cpu.eval()
    mask_id = drafter.config.mask_token_id
    record = {"val_acceptance_length": round(expected_acceptance(on_cpu, target, validation, block_size, mask_id), 4),
              "val_replayed_acceptance_length": round(replayed_acceptance(on_cpu, target, validation, block_size), 4)}
    for size in replay_sizes:
        record[f"val_replayed_acceptance_at_{size}"] = (
            record["val_replayed_acceptance_length"] if size == block_size
            else round(replayed_acceptance(on_cpu, target, validation, size), 4))
    on_cpu.train(was_training)
    return record


def synthetic_sequences(recipe, target: TargetModel, count: int, prompt_len: int = 128,
                        seed: int = 0) -> list[Sequence]:
    """`count` training sequences of the recipe's shapes with random content: prompts of `prompt_len`
    tokens, responses of `data.max_new_tokens`, tokens drawn from as many ids as the vocabulary
    shortlist holds (so the loss's head has the size real data gives it), random float16 features
    (views of one array: no memory per sequence); all in the training part of the split."""
    from ..drafter import build_target_layer_ids

    rng = np.random.default_rng(seed)
    length = prompt_len + recipe.data.max_new_tokens
    width = len(build_target_layer_ids(target.num_layers, recipe.drafter.num_target_features)) * target.hidden_size
    features = rng.standard_normal((length + count, width), dtype=np.float32).astype(np.float16)
    final = (rng.standard_normal((length + count, target.hidden_size), dtype=np.float32).astype(np.float16)
             if recipe.train.soft_target_weight else None)
    vocab = min(target.vocab_size, recipe.train.vocab_shortlist or target.vocab_size)
    ids = (f"synthetic-{i}" for i in itertools.count())
    return [Sequence(name, rng.integers(1, vocab, length), prompt_len, features[i: i + length],
                     final[i: i + length] if final is not None else None)
            for i, name in enumerate(itertools.islice((n for n in ids if prompt_part(n) == "drafter-train"), count))]


def training_throughput(recipe, target: TargetModel, steps: int = 20, warmup: int = 3,
                        workers: Workers | None = None) -> dict | None:
    """Supervised positions per second that `train` reaches at the recipe's batch shape, drafter and
    loss (synthetic sequences of its lengths: the rate depends on shapes, not on the text), over
    `steps` steps after `warmup` (allocations, kernel choices). Under torchrun the rate is every
    process's together; the first process gets the figures, the others None."""
    workers = workers or join()
    cfg = replace(recipe.train, steps=warmup + steps, init_from=None, checkpoint_every=10 ** 9,
                  validate_every=10 ** 9)
    sequences = synthetic_sequences(recipe, target, max(2 * cfg.sequences_per_step, 8))
    with tempfile.TemporaryDirectory() as work:
        log = Path(work) / "train_log.jsonl"
        train(replace(recipe, work_dir=work, train=cfg), target, sequences, log, workers=workers)
        if not workers.main:
            return None
        records = [json.loads(line) for line in log.read_text().splitlines()]
    first = records[warmup - 1] if warmup else {"positions": 0, "train_s": 0.0}
    last = records[-1]
    return {"supervised_positions_per_s": round((last["positions"] - first["positions"])
                                                / max(last["train_s"] - first["train_s"], 1e-9), 1),
            "steps": steps, "warmup_steps": warmup, "positions_per_step": round(last["positions"] / len(records)),
            "sequences_per_step": cfg.sequences_per_step, "anchors_per_sequence": cfg.anchors_per_sequence,
            "block_size": recipe.drafter.block_size, "num_layers": recipe.drafter.num_layers,
            "hardware": training_hardware(workers.world_size)}
