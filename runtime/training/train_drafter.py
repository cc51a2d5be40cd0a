"""The DFlash training loop: target frozen, drafter layers (and fc / norms) trained.

Each step takes a few training sequences (prompt + the target's own response) and, in each,
random anchor positions p inside the response. A block `[token_p, MASK x (B - 1)]` at positions
p..p+B-1 sees the target's context features of tokens 0..p-1 and must predict tokens p+1..p+B-1,
exactly the query the runtime asks at a decode step whose bonus token sits at p. Cross-entropy
through the target's lm_head, with weight `decay ** (j - 1)` for block position j: early positions
decide the accepted length, so they matter most.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize
from tqdm import tqdm

from ..blocks import accepted_prefix, anchored_draft_mask
from ..drafter import DFlashDraftModel
from ..target import TargetModel
from .features import Sequence
from .prompt_sets import prompt_part


def split_by_part(sequences: list[Sequence]) -> tuple[list[Sequence], list[Sequence]]:
    """(train, validation) by each prompt's fixed part; prompts reserved for the policy are left out."""
    parts = {"drafter-train": [], "drafter-validation": [], "policy": []}
    for s in sequences:
        parts[prompt_part(s.id)].append(s)
    return parts["drafter-train"], parts["drafter-validation"]


def make_batch(sequences: list[Sequence], rng: random.Random, anchors: int, block_size: int, mask_token_id: int):
    """Tensors for one training step, at `anchors` random positions inside each response."""
    chosen = []
    for s in sequences:
        candidates = range(s.prompt_len, len(s.tokens) - 1)  # the anchor needs at least one label after it
        chosen.append(sorted(rng.sample(candidates, min(anchors, len(candidates)))) if len(candidates) else [])
    return batch_for_anchors(sequences, chosen, anchors, block_size, mask_token_id)


def batch_for_anchors(sequences: list[Sequence], chosen: list[list[int]], anchors: int, block_size: int,
                      mask_token_id: int):
    """Context features, blocks, positions, labels and attention mask for blocks starting at the given
    anchor positions (at most `anchors` per sequence; unused slots are inert)."""
    batch_size = len(sequences)
    context_len = max(max(a) if a else 1 for a in chosen)
    width = anchors * block_size
    features = torch.zeros(batch_size, context_len, sequences[0].features.shape[1])
    tokens = torch.full((batch_size, width), mask_token_id, dtype=torch.long)
    positions = torch.zeros(batch_size, width, dtype=torch.long)
    labels = torch.full((batch_size, width), -100, dtype=torch.long)
    offsets = torch.arange(block_size)
    for i, (s, anchor_list) in enumerate(zip(sequences, chosen)):
        features[i, : min(context_len, len(s.tokens))] = torch.from_numpy(
            np.asarray(s.features[:context_len], dtype=np.float32))
        seq = torch.from_numpy(s.tokens.astype(np.int64))
        for a, p in enumerate(anchor_list):
            cols = slice(a * block_size, (a + 1) * block_size)
            tokens[i, a * block_size] = seq[p]
            positions[i, cols] = p + offsets
            targets = p + offsets[1:]
            valid = targets < len(seq)
            labels[i, a * block_size + 1: (a + 1) * block_size][valid] = seq[targets[valid]]
    visible = anchored_draft_mask(chosen, anchors, block_size, context_len)
    return features, tokens, positions, labels, visible


def drafter_hidden(drafter: DFlashDraftModel, target: TargetModel, features, tokens, positions, visible):
    """Drafter outputs `[b, W, hidden]` for a training batch (context K/V built with gradients)."""
    context_positions = torch.arange(features.shape[1]).expand(features.shape[0], -1)
    kv = [(k.transpose(1, 2), v.transpose(1, 2)) for k, v in drafter.context_kv(features, context_positions)]
    return drafter.forward_block(target.embed_tokens(tokens), positions, kv, visible)


def position_weights(block_size: int, anchors: int, decay: float) -> torch.Tensor:
    per_block = torch.tensor([0.0] + [decay ** (j - 1) for j in range(1, block_size)])
    return per_block.repeat(anchors)


def vocabulary_shortlist(sequences: list[Sequence], size: int) -> torch.Tensor | None:
    """The `size` most frequent response tokens, or None for the whole vocabulary.

    The lm_head over 49k tokens is most of a training step's cost on a CPU; the target's responses
    use far fewer (a few thousand cover >99.9%), so the softmax runs over those plus the batch's
    own labels. Validation and inference always use the full vocabulary.
    """
    if not size:
        return None
    counts = np.zeros(int(max(int(s.tokens.max()) for s in sequences)) + 1, dtype=np.int64)
    for s in sequences:
        np.add.at(counts, s.tokens[s.prompt_len:], 1)
    order = np.argsort(-counts, kind="stable")[:size]
    return torch.from_numpy(np.sort(order[counts[order] > 0]))


def step_loss(drafter, target, batch, weights, shortlist: torch.Tensor | None = None):
    features, tokens, positions, labels, visible = batch
    hidden = drafter_hidden(drafter, target, features, tokens, positions, visible)
    where = labels >= 0
    targets = labels[where]
    if shortlist is None:
        logits = target.lm_head(hidden[where])
    else:
        vocab = torch.unique(torch.cat([shortlist, targets]))  # sorted, so labels map by searchsorted
        logits = F.linear(hidden[where], target.lm_head.weight[vocab])
        targets = torch.searchsorted(vocab, targets)
    losses = F.cross_entropy(logits.float(), targets, reduction="none")
    w = weights.expand_as(labels)[where]
    loss = (losses * w).sum() / w.sum()
    accuracy = (logits.argmax(-1) == targets).float().mean()
    return loss, float(accuracy)


@torch.no_grad()
def expected_acceptance(drafter, target, sequences, block_size, mask_token_id, anchors=8, seed=1234) -> float:
    """Mean tokens per verify (bonus included) the drafter reaches from random points of held-out
    target responses. Optimistic: decoding only ever starts a block right after the drafter's last
    miss, where the text is harder than at a random point (see `replayed_acceptance`)."""
    rng = random.Random(seed)
    total, count = 0.0, 0
    for start in range(0, len(sequences), 8):
        batch = make_batch(sequences[start:start + 8], rng, anchors, block_size, mask_token_id)
        features, tokens, positions, labels, visible = batch
        hidden = drafter_hidden(drafter, target, features, tokens, positions, visible)
        predictions = target.lm_head(hidden).argmax(-1)
        grid_pred = predictions.view(len(features), anchors, block_size)[..., 1:]
        grid_label = labels.view(len(features), anchors, block_size)[..., 1:]
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


def train(recipe, target: TargetModel, sequences: list[Sequence], log_path: Path) -> DFlashDraftModel:
    cfg, shape = recipe.train, recipe.drafter
    train_set, validation = split_by_part(sequences)
    checkpoint = recipe.checkpoint_dir / "last.pt"
    drafter = DFlashDraftModel.for_target(target, num_layers=shape.num_layers,
                                          num_target_features=shape.num_target_features,
                                          block_size=shape.block_size, seed=cfg.seed).float().train()
    drafter.requires_grad_(True)
    parametrize.register_parametrization(drafter.fc, "weight", DivideColumns(feature_scale(train_set)))
    optimizer = torch.optim.AdamW(drafter.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                  betas=(0.9, 0.95))
    step, rng, elapsed = 0, random.Random(cfg.seed), 0.0
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False)
        drafter.load_state_dict(state["drafter"])
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed = state["step"], state.get("elapsed_s", 0.0)
        rng.setstate(state["rng"])
    mask_id = drafter.config.mask_token_id
    weights = position_weights(shape.block_size, cfg.anchors_per_sequence, cfg.loss_decay)
    shortlist = vocabulary_shortlist(train_set, cfg.vocab_shortlist)

    def learning_rate(s):
        if s < cfg.warmup_steps:
            return cfg.learning_rate * (s + 1) / cfg.warmup_steps
        progress = (s - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))

    log_path.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=cfg.steps, initial=step, desc="train drafter", unit="step")
    began = time.perf_counter() - elapsed
    while step < cfg.steps:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step)
        batch = make_batch(rng.sample(train_set, cfg.sequences_per_step), rng, cfg.anchors_per_sequence,
                           shape.block_size, mask_id)
        loss, accuracy = step_loss(drafter, target, batch, weights, shortlist)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(drafter.parameters(), 1.0)
        optimizer.step()
        step += 1
        record = {"step": step, "loss": round(loss.item(), 4), "accuracy": round(accuracy, 4),
                  "lr": learning_rate(step - 1), "elapsed_s": round(time.perf_counter() - began, 1)}
        if step % cfg.validate_every == 0 or step == cfg.steps:
            drafter.eval()
            record["val_acceptance_length"] = round(
                expected_acceptance(drafter, target, validation, shape.block_size, mask_id), 4)
            record["val_replayed_acceptance_length"] = round(
                replayed_acceptance(drafter, target, validation, shape.block_size), 4)
            drafter.train()
        with open(log_path, "a") as log:
            log.write(json.dumps(record) + "\n")
        bar.set_postfix(loss=record["loss"], acc=record["accuracy"], tau=record.get("val_replayed_acceptance_length", ""))
        bar.update(1)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"drafter": drafter.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                        "rng": rng.getstate(), "elapsed_s": time.perf_counter() - began,
                        "config": asdict(cfg)}, checkpoint.with_suffix(".tmp"))
            checkpoint.with_suffix(".tmp").rename(checkpoint)
    bar.close()
    parametrize.remove_parametrizations(drafter.fc, "weight", leave_parametrized=True)
    return drafter.eval().requires_grad_(False)
