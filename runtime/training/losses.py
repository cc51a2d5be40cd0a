"""The drafter's loss over the target's vocabulary head, and the weight of each block position.

Per supervised block position: cross-entropy on the target's token, optionally mixed with the KL to
the target's own distribution there (soft targets), weighted by the position in its block. The head
(the target's frozen lm_head) is most of a training step's cost, and its logits most of its memory:
16K positions x 49K vocabulary is 3 GB in float32, and autograd would keep several such tensors.
`head_loss` runs over chunks of positions and works out each chunk's gradient as it goes (the head
is frozen, so d loss / d hidden is all backward needs): one chunk's logits exist at a time, and the
head still costs two matmuls per position, as unchunked.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOSS_CHUNK_POSITIONS = 4096  # [4096, 49K] float32 logits: 0.8 GB per tensor on a GPU
# Log-probabilities are floored here before exp: below about -87, exp's float32 result underflows to a
# denormal, which a CPU's vectorised exp computes many times slower (a whole chunk slowed with it); e^-80 is
# 2e-35, nothing beside a probability.
EXP_FLOOR = -80.0


def position_weights(block_size: int, anchors: int, decay: float = 0.9, gamma: float | None = None) -> torch.Tensor:
    """The loss weight of each cell of `anchors` blocks side by side: 0 for the anchor (given, not
    predicted), then `decay ** (k - 1)` at block position k; with `gamma`, exp(-(k - 1) / gamma),
    the form z-lab's and SpecForge's DFlash drafters train with (gamma 7). Early positions decide
    the accepted length, so they weigh most."""
    if gamma:
        decay = math.exp(-1.0 / gamma)
    per_block = torch.tensor([0.0] + [decay ** (k - 1) for k in range(1, block_size)])
    return per_block.repeat(anchors)


class _ChunkedHeadLoss(torch.autograd.Function):
    """sum(weights * per-position loss) / normaliser, and the number of positions whose argmax is the label."""

    @staticmethod
    def forward(ctx, hidden, head, targets, weights, teacher, soft, normaliser, chunk):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for start in range(0, len(hidden), chunk):
            rows = slice(start, start + chunk)
            labels = targets[rows]
            logits = F.linear(hidden[rows], head).float()
            correct += (logits.argmax(-1) == labels).sum()
            log_q = logits.log_softmax(-1)
            del logits
            losses = -log_q.gather(1, labels[:, None]).squeeze(1)
            if soft:
                log_p = F.linear(teacher[rows], head).float().log_softmax(-1)
                p = log_p.clamp(min=EXP_FLOOR).exp_()
                losses = (1 - soft) * losses + soft * (p * (log_p - log_q)).sum(-1)
                del log_p
            scale = weights[rows] / normaliser
            total += (losses * scale).sum()
            if grad is not None:
                # d/dlogits of (1 - s) * CE + s * KL(p || q) is q - (1 - s) * onehot - s * p
                g = log_q.clamp_(min=EXP_FLOOR).exp_()
                g[torch.arange(len(labels), device=g.device), labels] -= 1 - soft
                if soft:
                    g -= soft * p
                g *= scale[:, None]
                grad[rows] = torch.matmul(g.to(head.dtype), head)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(correct)
        return total, correct

    @staticmethod
    def backward(ctx, grad_total, _grad_correct):
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None, None, None, None, None


def head_loss(hidden: torch.Tensor, head: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
              teacher: torch.Tensor | None = None, soft_target_weight: float = 0.0,
              normaliser: torch.Tensor | float | None = None,
              chunk_positions: int = LOSS_CHUNK_POSITIONS) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, correct) over supervised positions: `hidden` [N, H] the drafter's outputs, `head` [V, H]
    the (frozen) vocabulary head, `targets` [N] label indices into it, `weights` [N].

    Per position `(1 - s) * CE + s * KL(teacher || drafter)`, s = `soft_target_weight`, `teacher`
    [N, H] the target's own final hidden state there. The loss is the weighted sum over
    `normaliser` (default: the sum of the weights; data-parallel training passes the global batch's
    share so that each process's gradient adds up to the whole batch's). `correct` counts positions
    whose argmax is the label."""
    if soft_target_weight and teacher is None:
        raise ValueError("soft targets need the target's final hidden states: compute the features "
                         "with with_final_hidden (train.soft_target_weight > 0 does)")
    weights = weights.float()
    if normaliser is None:
        normaliser = weights.sum()
    return _ChunkedHeadLoss.apply(hidden, head.detach(), targets, weights, teacher, float(soft_target_weight),
                                  normaliser, max(1, int(chunk_positions)))
