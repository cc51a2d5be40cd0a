"""Replayed greedy decoding: what speculative decoding at block size B does to a known greedy output,
at a fraction of the cost of running it.

With greedy decoding the output does not depend on the block size (losslessness), so the target's
own greedy continuation is known after one plain run. A decode step whose bonus token sits at
position p drafts `[token_p, MASK x (B - 1)]` against the drafter's context (target features of
tokens 0..p-1), accepts the longest prefix of drafts equal to the known continuation, and moves
on by accepted + 1. Replaying that needs the drafter only, never the target's verify pass (5x the
drafter's FLOPs here), and the lm_head only up to the first mismatch. The counts it gives are the
runtime's (`tests/test_replay.py` checks them against `SpeculativeEngine`); speed follows from
counts x the machine's step-cost table.

Sampled outputs replay too. With argmax drafts (SGLang DFLASH's way) a draft survives when it
equals the target's sample, so replaying the sampled output counts exactly what the engine did. With
sampled drafts (the engine's default for sampled requests) a draft d ~ q survives with probability
min(1, p(d) / q(d)); the output still follows the target, and given the output token x at a draft
position, the draft there survived with probability min(1, q(x) / p(x)) (the chance of "d = x and it
survived", min(p, q)(x), over the chance of x, p(x)), position by position until the first failure.
So a sampled output replays sampled drafts by a coin per position with that chance: its counts
follow the engine's in distribution (`tests/test_replay.py` compares them), needing the target's
probability of each output token (`token_probabilities`, one target pass per output).

Used by the drafter's evaluation curve, by `blockpilot collect` (policy labels) and by the
within-request analysis.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import torch

from . import blocks
from .drafter import DFlashDraftModel
from .target import TargetModel


@dataclass
class ReplaySequence:
    """One output ready for replay: tokens, where the response starts, and the drafter's context
    K/V for every token (per drafter layer, `[kv_heads, len, head_dim]`). `temperature`: what the
    response was sampled at (0: greedy). `token_probs` (sampled outputs): the target's probability
    of each token given the ones before it, at that temperature ([len]; the first unused); with
    them a replay drafts samples of the drafter's distribution, without them its argmax."""
    id: str
    tokens: torch.Tensor
    prompt_len: int
    max_new_tokens: int
    context: list[tuple[torch.Tensor, torch.Tensor]]
    temperature: float = 0.0
    token_probs: torch.Tensor | None = None

    @property
    def sampled_drafts(self) -> bool:
        return self.temperature > 0 and self.token_probs is not None

    @property
    def response_len(self) -> int:
        return len(self.tokens) - self.prompt_len


@torch.inference_mode()
def prepare(drafter: DFlashDraftModel, sequence_id: str, tokens, prompt_len: int, features,
            max_new_tokens: int, temperature: float = 0.0, token_probs: torch.Tensor | None = None) -> ReplaySequence:
    """Context K/V of a whole output (sampled at `temperature`; 0: greedy) from its target features
    `[len, k * hidden]`; `token_probs` for a replay with sampled drafts (`token_probabilities`)."""
    features = torch.as_tensor(np.asarray(features))
    kv = [(k.transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous())  # [heads, len, dim]
          for k, v in drafter.context_kv(features, torch.arange(len(features)))]
    return ReplaySequence(sequence_id, torch.as_tensor(np.asarray(tokens), dtype=torch.long), prompt_len,
                          max_new_tokens, kv, temperature, token_probs)


@torch.inference_mode()
def token_probabilities(target: TargetModel, sequences: list[list[int]], temperature: float,
                        batch_tokens: int = 4096, lm_head_rows: int = 512) -> list[torch.Tensor]:
    """[len] per sequence: the target's probability of each token given the ones before it, at
    `temperature` (float32; the first token's is 1: it is given)."""
    from .target import _groups_by_tokens

    out: list[torch.Tensor | None] = [None] * len(sequences)
    for group in _groups_by_tokens(sequences, batch_tokens):
        run = target.prefill([sequences[i] for i in group])
        following = torch.cat([torch.as_tensor(sequences[i][1:] + [0], dtype=torch.long) for i in group])
        probs = torch.empty(len(following))
        for start in range(0, len(following), lm_head_rows):
            logits = target.lm_head(run.hidden[start:start + lm_head_rows]).float() / temperature
            chunk = following[start:start + lm_head_rows].to(logits.device)
            probs[start:start + len(chunk)] = torch.softmax(logits, dim=-1).gather(1, chunk[:, None]).squeeze(1).cpu()
        offsets = run.layout.offsets
        for r, i in enumerate(group):
            out[i] = torch.cat([torch.ones(1), probs[int(offsets[r]): int(offsets[r + 1]) - 1]])
    return out


@torch.inference_mode()
def draft_block_at(target: TargetModel, drafter: DFlashDraftModel, sequences: list[ReplaySequence],
                   positions: list[int], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The drafter's outputs `[n, width, hidden]` for a `width`-wide block whose bonus token sits at
    `positions[i]` of `sequences[i]` (one row per pair), and the known continuation `[n, width - 1]`
    each draft is checked against (-1 past the end of the output: never matches)."""
    n = len(sequences)
    context_len = max(max(int(p) for p in positions), 1)
    kv_heads, head_dim = sequences[0].context[0][0].shape[0], sequences[0].context[0][0].shape[2]
    dtype = sequences[0].context[0][0].dtype
    context = []
    for layer in range(len(drafter.layers)):
        keys = torch.zeros(n, kv_heads, context_len, head_dim, dtype=dtype)
        values = torch.zeros_like(keys)
        for i, (s, p) in enumerate(zip(sequences, positions)):
            keys[i, :, :p], values[i, :, :p] = s.context[layer][0][:, :p], s.context[layer][1][:, :p]
        context.append((keys, values))
    p = torch.tensor(positions)
    block = torch.full((n, width), drafter.config.mask_token_id, dtype=torch.long)
    block[:, 0] = torch.stack([s.tokens[q] for s, q in zip(sequences, positions)])
    labels = torch.full((n, width - 1), -1, dtype=torch.long)
    for i, (s, q) in enumerate(zip(sequences, positions)):
        known = s.tokens[q + 1: q + width]
        labels[i, : len(known)] = known
    layout = blocks.RaggedLayout.build(torch.full((n,), width), p)
    visible = blocks.draft_mask(layout, context_lens=p, kv_len=context_len)
    hidden = drafter.forward_block(target.embed_tokens(block), p[:, None] + torch.arange(width)[None, :], context,
                                   visible)
    return hidden, labels


def survival_chances(draft_logits: torch.Tensor, labels: torch.Tensor, sequences: list[ReplaySequence],
                     first_columns: list[int]) -> torch.Tensor:
    """[n, k] the chance that each draft survives given the output: the drafter's logits
    `draft_logits` [n, k, V] at k consecutive block columns, the output's tokens there `labels`
    [n, k] (-1 past its end), `first_columns[i]`: the position in `sequences[i]` of the token before
    the first of them. Argmax drafts: 1 where the draft equals the output token, else 0. Sampled
    drafts (`ReplaySequence.sampled_drafts`): min(1, q(x) / p(x)) at the output token x, q the
    drafter's distribution at the sequence's temperature, p the target's (module docstring)."""
    chance = (draft_logits.argmax(-1) == labels).float().cpu()
    sampled = [i for i, s in enumerate(sequences) if s.sampled_drafts]
    if sampled:
        width = labels.shape[1]
        logits = draft_logits[sampled].float()
        temperatures = torch.tensor([sequences[i].temperature for i in sampled], device=logits.device)
        known = labels[sampled].clamp(min=0).to(logits.device)
        q = torch.softmax(logits / temperatures.view(-1, 1, 1), dim=-1).gather(2, known.unsqueeze(2)).squeeze(2).cpu()
        p = torch.ones(len(sampled), width)
        for row, i in enumerate(sampled):
            given = sequences[i].token_probs[first_columns[i] + 1: first_columns[i] + 1 + width]
            p[row, : len(given)] = given
        chance[sampled] = torch.where(labels[sampled].cpu() >= 0, (q / p.clamp(min=1e-30)).clamp(max=1.0), 0.0)
    return chance


def coins_at(sequences: list[ReplaySequence], positions: list[int], width: int) -> torch.Tensor:
    """[n, width - 1] uniform coins for the drafts of a `width`-wide block whose bonus token sits at
    `positions[i]` of `sequences[i]`: one fixed stream per sequence and position, so every replay of
    the same block (another rule, another call) flips the same coins, the first k of a wider block's
    included. A draft survives where its coin is below its chance (`survival_chances`). Argmax
    drafts' chances are 0 or 1, so their rows keep coins of 0 and draw nothing."""
    coins = torch.zeros(len(sequences), max(width - 1, 0))
    for i, (s, q) in enumerate(zip(sequences, positions)):
        if s.sampled_drafts:
            stream = torch.Generator().manual_seed(zlib.crc32(s.id.encode()) * 100_003 + int(q))
            coins[i] = torch.rand(max(width - 1, 0), generator=stream)
    return coins


@torch.inference_mode()
def accepted_at(target: TargetModel, drafter: DFlashDraftModel, sequences: list[ReplaySequence],
                positions: list[int], width: int, max_lm_head_chunk: int = 8) -> torch.Tensor:
    """Drafts accepted by a `width`-wide block whose bonus token sits at `positions[i]` of
    `sequences[i]` (one row per pair). The lm_head runs chunk by chunk and only for rows whose
    drafts still all match: acceptance is decided by the first mismatch. Rows of sequences with
    sampled drafts survive each position by a coin (`survival_chances`, `coins_at`)."""
    n = len(sequences)
    hidden, labels = draft_block_at(target, drafter, sequences, positions, width)
    coins = coins_at(sequences, positions, width)
    accepted = torch.zeros(n, dtype=torch.long)
    alive = torch.ones(n, dtype=torch.bool)
    start, chunk = 1, 1  # chunks of 1, 2, 4, ... positions: most rows stop at the first draft or two
    while start < width:
        rows = alive.nonzero().squeeze(1)
        if len(rows) == 0:
            break
        stop = min(start + chunk, width)
        chance = survival_chances(drafter.logits(target.lm_head, hidden[rows, start:stop]),
                                  labels[rows, start - 1: stop - 1], [sequences[i] for i in rows.tolist()],
                                  [positions[i] + start - 1 for i in rows.tolist()])
        run = torch.cumprod((coins[rows, start - 1: stop - 1] < chance).long(), dim=1).sum(dim=1)
        accepted[rows] += run
        alive[rows] = run == stop - start
        start, chunk = stop, min(2 * chunk, max_lm_head_chunk)
    return accepted


@dataclass
class ReplayResult:
    id: str
    block_size: int
    generated_tokens: int  # the first comes from prefill, the rest from decode steps
    target_forwards: int  # decode steps
    accepted: list[int]  # drafts accepted at each step

    @property
    def acceptance_length(self) -> float:
        """Tokens committed per target forward, bonus included (the runtime's definition)."""
        return (self.generated_tokens - 1) / self.target_forwards if self.target_forwards else 0.0


@torch.inference_mode()
def replay_fixed_size(target: TargetModel, drafter: DFlashDraftModel, sequences: list[ReplaySequence],
                      block_size: int, rows_per_call: int = 32) -> list[ReplayResult]:
    """Decoding at one block size, replayed for every sequence (batched across sequences). Mirrors
    `SpeculativeEngine._decode_step`: a step's width is min(block size, tokens still allowed), and
    tokens past the known output (after eos) never match."""
    committed = [1] * len(sequences)  # the prefill's token
    steps: list[list[int]] = [[] for _ in sequences]
    active = [i for i, s in enumerate(sequences) if s.response_len > 1 and s.max_new_tokens > 1]
    while active:
        by_width: dict[int, list[int]] = {}
        for i in active:
            width = blocks.step_width(block_size, sequences[i].max_new_tokens - committed[i])
            by_width.setdefault(width, []).append(i)
        for width, rows in by_width.items():
            for start in range(0, len(rows), rows_per_call):
                chunk = rows[start:start + rows_per_call]
                if width == 1:
                    accepted = [0] * len(chunk)
                else:
                    positions = [sequences[i].prompt_len + committed[i] - 1 for i in chunk]
                    accepted = accepted_at(target, drafter, [sequences[i] for i in chunk], positions, width).tolist()
                for i, a in zip(chunk, accepted):
                    a = min(a, sequences[i].response_len - committed[i] - 1)
                    steps[i].append(a)
                    committed[i] += a + 1
        active = [i for i in active if committed[i] < sequences[i].response_len]
    return [ReplayResult(s.id, block_size, committed[i], len(steps[i]), steps[i]) for i, s in enumerate(sequences)]


@torch.inference_mode()
def acceptance_profile(target: TargetModel, drafter: DFlashDraftModel, sequence: ReplaySequence, sizes: list[int],
                       rows_per_call: int = 64) -> np.ndarray:
    """`acc[i, j]`: drafts accepted by a block of size `sizes[j]` whose bonus token sits at
    `sequence.prompt_len + i` (every position of the output, for the within-request analysis)."""
    positions = list(range(sequence.prompt_len, len(sequence.tokens) - 1))
    profile = np.zeros((len(positions), len(sizes)), dtype=np.int64)
    for j, size in enumerate(sizes):
        for start in range(0, len(positions), rows_per_call):
            chunk = positions[start:start + rows_per_call]
            profile[start:start + len(chunk), j] = accepted_at(target, drafter, [sequence] * len(chunk), chunk,
                                                               size).numpy()
    return profile


def replay_every_size(target: TargetModel, drafter: DFlashDraftModel, outputs: list[dict], sizes: list[int],
                      max_new_tokens: int, show_progress: bool = True, sampled_at: float = 0.0) -> list[dict]:
    """Rows like `blockpilot collect`'s (id, block_size, generated_tokens, target_forwards,
    acceptance_length) for every output (`id`, `prompt_ids`, `response_ids`) at every size: greedy
    outputs, or with `sampled_at` outputs the target sampled at that temperature, replayed with
    sampled drafts (without it, a sampled output replays argmax drafts)."""
    from tqdm import tqdm

    token_lists = [o["prompt_ids"] + o["response_ids"] for o in outputs]
    features = target.sequence_features(token_lists, drafter.config.target_layer_ids)
    probs = token_probabilities(target, token_lists, sampled_at) if sampled_at else [None] * len(outputs)
    sequences = [prepare(drafter, o["id"], tokens, len(o["prompt_ids"]), f, max_new_tokens, sampled_at, p)
                 for o, tokens, f, p in zip(outputs, token_lists, features, probs)]
    rows = []
    for size in tqdm(sizes, desc="replay block sizes", unit="size", disable=not show_progress):
        for s, result in zip(sequences, replay_fixed_size(target, drafter, sequences, size)):
            rows.append({"id": s.id, "block_size": size, "prompt_tokens": s.prompt_len,
                         "generated_tokens": result.generated_tokens, "target_forwards": result.target_forwards,
                         "acceptance_length": round(result.acceptance_length, 4), "decode_s": None,
                         "replayed": True, "accepted_per_step": result.accepted})
    return rows
