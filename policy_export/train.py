"""Training the block-size policy on oracle labels, and judging choices on held-out prompts.

Prompts are split by a stable hash of their id into train / validation / test, so no test prompt
is ever seen in training. The classifier is trained full-batch (a few hundred prompts), with
early stopping on the validation loss.

Three objectives:
- "acceptance" (the paper's): cross-entropy on the size with the highest acceptance length;
- "speed": cross-entropy on the size with the most projected tokens/s;
- "expected-speed" (cost-sensitive): minimise the expected speed lost, sum_k p_k (1 - speed_k / best),
  over the policy's softmax. Most prompts are near-ties between neighbouring sizes; a hard label
  makes the policy fight over a coin flip, while this loss only pays for choices that cost speed.
"""

from __future__ import annotations

import copy
import random
import zlib
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from blockpilot.runtime.policy import PolicyFeatureSpec
from blockpilot.runtime.step_cost import step_ms

from .model import PolicyMLP


@dataclass
class PolicyTrainConfig:
    objective: str = "speed"  # one of OBJECTIVES
    hidden_size: int = 256
    num_hidden_layers: int = 2
    dropout: float = 0.2
    learning_rate: float = 1e-3
    weight_decay: float = 1e-2
    max_epochs: int = 400
    patience: int = 40
    validation_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0


OBJECTIVES = ("acceptance", "speed", "expected-speed")


def split_of(prompt_id: str, config: PolicyTrainConfig) -> str:
    # Salted: the prompts a policy trains on were themselves picked by an unsalted crc32 of the id
    # (training/prompt_sets.prompt_part), so the same hash would put them all in one split.
    position = zlib.crc32(f"policy-split:{prompt_id}".encode()) % 10_000 / 10_000
    if position < config.test_fraction:
        return "test"
    if position < config.test_fraction + config.validation_fraction:
        return "validation"
    return "train"


def train_policy(ids: list[str], features: np.ndarray, labels: dict[str, int], sizes: list[int],
                 spec: PolicyFeatureSpec, config: PolicyTrainConfig,
                 relative_speed: dict[str, np.ndarray] | None = None) -> tuple[PolicyMLP, dict]:
    """Fit the MLP to `labels` (prompt id -> best size), or for "expected-speed" to `relative_speed`
    (prompt id -> each size's speed over the prompt's best; `labels` then only score accuracy).
    Returns the best-validation model and a summary."""
    if config.objective not in OBJECTIVES:
        raise ValueError(f"unknown policy objective {config.objective!r}; choose one of {OBJECTIVES}")
    if config.objective == "expected-speed" and relative_speed is None:
        raise ValueError("the expected-speed objective needs each prompt's relative speed at every size")
    torch.manual_seed(config.seed)
    index = {pid: i for i, pid in enumerate(ids)}
    parts = {name: [pid for pid in ids if pid in labels and split_of(pid, config) == name]
             for name in ("train", "validation", "test")}
    if not parts["train"] or not parts["validation"]:
        raise ValueError(f"too few labelled prompts to train a policy: {({k: len(v) for k, v in parts.items()})}")

    def tensors(part):
        x = torch.from_numpy(features[[index[p] for p in parts[part]]]).float()
        y = torch.tensor([sizes.index(labels[p]) for p in parts[part]])
        regret = (torch.tensor(np.stack([1.0 - relative_speed[p] for p in parts[part]]), dtype=torch.float32)
                  if config.objective == "expected-speed" else None)
        return x, y, regret

    def objective_loss(logits, y, regret):
        if regret is not None:
            return (torch.softmax(logits, -1) * regret).sum(-1).mean()  # expected fraction of speed lost
        return F.cross_entropy(logits, y)

    (x_train, y_train, r_train), (x_val, y_val, r_val) = tensors("train"), tensors("validation")
    spec = spec.with_normalisation(x_train.numpy())
    model = PolicyMLP.for_spec(spec, len(sizes), hidden_size=config.hidden_size,
                               num_hidden_layers=config.num_hidden_layers, dropout=config.dropout)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    best, best_loss, since_best, epochs = copy.deepcopy(model), float("inf"), 0, 0
    for epochs in range(1, config.max_epochs + 1):
        model.train()
        loss = objective_loss(model(x_train), y_train, r_train)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.eval()
        with torch.no_grad():
            val_loss = float(objective_loss(model(x_val), y_val, r_val))
        if val_loss < best_loss * (1 - 1e-4):  # relative: the objectives' losses differ in scale
            best, best_loss, since_best = copy.deepcopy(model), val_loss, 0
        else:
            since_best += 1
            if since_best >= config.patience:
                break
    best.eval()

    def accuracy(part):
        if not parts[part]:
            return None
        x, y, _ = tensors(part)
        with torch.no_grad():
            return round(float((best(x).argmax(-1) == y).float().mean()), 4)

    summary = {"config": asdict(config), "epochs": epochs, "best_validation_loss": round(best_loss, 5),
               "prompts": {k: len(v) for k, v in parts.items()},
               "accuracy": {k: accuracy(k) for k in parts}, "candidate_sizes": sizes,
               "label_distribution": {str(s): sum(1 for p in parts["train"] if labels[p] == s) for s in sizes}}
    return best, summary


def per_prompt_costs(rows: list[dict], costs: dict, choices: dict[str, int]) -> np.ndarray:
    """[prompts, 3]: each prompt's committed tokens, target forwards and projected ms at its chosen size,
    in the order of `choices`."""
    by_key = {(r["id"], r["block_size"]): r for r in rows}
    picked = [(by_key[(prompt_id, size)], size) for prompt_id, size in choices.items()]
    return np.array([(r["generated_tokens"] - 1, r["target_forwards"], r["target_forwards"] * step_ms(costs, size))
                     for r, size in picked], dtype=np.float64).reshape(-1, 3)


def score_choices(rows: list[dict], costs: dict, choices: dict[str, int]) -> dict:
    """Acceptance length, target forwards per token and projected tokens/s of running each prompt at
    its chosen size (aggregated over prompts: total tokens over total forwards / total time)."""
    tokens, forwards, time_ms = per_prompt_costs(rows, costs, choices).sum(axis=0).tolist()
    return {"acceptance_length": round(tokens / forwards, 4), "target_forwards_per_token": round(forwards / tokens, 4),
            "projected_tokens_per_s": round(tokens / time_ms * 1e3, 3), "prompts": len(choices)}


def paired_win_rate(rows: list[dict], costs: dict, challenger: dict[str, int], incumbent: dict[str, int],
                    resamples: int = 2000, seed: int = 0) -> float:
    """The fraction of bootstrap resamples of the prompts (drawn with replacement, the same draw for
    both) in which `challenger`'s choices project more tokens/s than `incumbent`'s: how sure a gain
    measured on a few prompts is to hold on others."""
    mine = per_prompt_costs(rows, costs, {p: challenger[p] for p in incumbent})
    theirs = per_prompt_costs(rows, costs, incumbent)
    draws = np.random.default_rng(seed).integers(0, len(incumbent), size=(resamples, len(incumbent)))

    def speed(table):  # tokens per ms of each resample
        return table[draws, 0].sum(1) / table[draws, 2].sum(1)
    return float((speed(mine) > speed(theirs)).mean())


def compare_policies(rows: list[dict], costs: dict, prompt_ids: list[str], sizes: list[int],
                     policy_choice: dict[str, int], oracle: dict[str, dict[str, int]], seed: int = 0) -> dict:
    """Fixed sizes vs the policy vs the per-prompt oracles vs a random and a constant policy."""
    rng = random.Random(seed)
    table = {f"fixed-{s}": score_choices(rows, costs, {p: s for p in prompt_ids}) for s in sizes}
    best_fixed = max(sizes, key=lambda s: table[f"fixed-{s}"]["projected_tokens_per_s"])
    table["policy"] = score_choices(rows, costs, {p: policy_choice[p] for p in prompt_ids})
    table["oracle-speed"] = score_choices(rows, costs, {p: oracle[p]["speed"] for p in prompt_ids})
    table["oracle-acceptance"] = score_choices(rows, costs, {p: oracle[p]["acceptance"] for p in prompt_ids})
    table["random"] = score_choices(rows, costs, {p: rng.choice(sizes) for p in prompt_ids})
    majority = max(sizes, key=lambda s: sum(1 for p in prompt_ids if policy_choice[p] == s))
    table["constant-policy-mode"] = score_choices(rows, costs, {p: majority for p in prompt_ids})
    fixed, best, mine = (table[f"fixed-{best_fixed}"]["projected_tokens_per_s"],
                         table["oracle-speed"]["projected_tokens_per_s"], table["policy"]["projected_tokens_per_s"])
    gap_closed = (mine - fixed) / (best - fixed) if best > fixed else None
    return {"variants": table, "best_fixed_size": best_fixed,
            "gap_closed_to_oracle": round(gap_closed, 4) if gap_closed is not None else None}
