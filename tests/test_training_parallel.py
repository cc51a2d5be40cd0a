"""Drafter training at GPU speed, checked on the CPU: the chunked loss over the vocabulary head equals
the plain one (value and gradient), data-parallel training under torchrun (gloo) takes the steps one
process takes over the same global batch, and the throughput command runs. The CUDA paths are
checked where a GPU is present.

Run as a script (`torchrun --nproc_per_node N tests/test_training_parallel.py OUT`), this file is the
data-parallel test's worker."""

from __future__ import annotations

import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from blockpilot.runtime.training.losses import head_loss, position_weights

from conftest import tiny_target

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _plain_loss(hidden, head, targets, weights, teacher=None, soft=0.0):
    """The loss as written down, all logits at once."""
    log_q = F.log_softmax(hidden @ head.T, -1)
    losses = F.nll_loss(log_q, targets, reduction="none")
    if soft:
        log_p = F.log_softmax(teacher @ head.T, -1)
        losses = (1 - soft) * losses + soft * (log_p.exp() * (log_p - log_q)).sum(-1)
    return (losses * weights).sum() / weights.sum()


@pytest.mark.parametrize("soft", [0.0, 0.5])
def test_chunked_head_loss_equals_the_plain_loss_and_gradient(soft):
    torch.manual_seed(0)
    hidden = torch.randn(53, 16, dtype=torch.float64, requires_grad=True)
    head, teacher = torch.randn(40, 16, dtype=torch.float64), torch.randn(53, 16, dtype=torch.float64)
    targets, weights = torch.randint(0, 40, (53,)), torch.rand(53, dtype=torch.float64)
    expected = _plain_loss(hidden, head, targets, weights, teacher, soft)
    (expected_grad,) = torch.autograd.grad(2.5 * expected, hidden)
    for chunk in (1, 7, 53, 4096):  # one position, uneven chunks, exactly one chunk, more than all
        loss, correct = head_loss(hidden, head, targets, weights, teacher, soft, chunk_positions=chunk)
        (grad,) = torch.autograd.grad(2.5 * loss, hidden)
        assert torch.allclose(loss.double(), expected, atol=1e-5), (chunk, float(loss), float(expected))
        assert torch.allclose(grad, expected_grad, atol=1e-6), chunk
        assert int(correct) == int(((hidden @ head.T).argmax(-1) == targets).sum())


def test_head_loss_normaliser_and_no_gradient_mode():
    torch.manual_seed(1)
    hidden, head = torch.randn(12, 8), torch.randn(20, 8)
    targets, weights = torch.randint(0, 20, (12,)), torch.rand(12)
    plain, _ = head_loss(hidden, head, targets, weights)
    halved, _ = head_loss(hidden, head, targets, weights, normaliser=2 * weights.sum())
    assert torch.allclose(halved, plain / 2)
    with torch.no_grad():  # validation-like use: no gradient is worked out
        assert torch.allclose(head_loss(hidden, head, targets, weights, chunk_positions=5)[0], plain)
    with pytest.raises(ValueError, match="final hidden"):
        head_loss(hidden, head, targets, weights, soft_target_weight=0.5)


def test_position_weights_decay_and_gamma():
    assert position_weights(4, 2, 0.5).tolist() == [0.0, 1.0, 0.5, 0.25] * 2
    gamma = position_weights(8, 1, gamma=7.0)
    assert gamma[0] == 0  # the anchor is given, not predicted
    assert torch.allclose(gamma[1:], torch.tensor([math.exp(-(k - 1) / 7) for k in range(1, 8)]))


def _tiny_run(work_dir: Path, steps: int = 3):
    """A recipe, tiny random target and training sequences of uneven lengths (so two halves of a global
    batch carry different numbers of labels): the same in every process that builds it."""
    from blockpilot.runtime.drafter import build_target_layer_ids
    from blockpilot.runtime.training.features import Sequence
    from blockpilot.runtime.training.prompt_sets import prompt_part
    from blockpilot.runtime.training.recipe import DrafterRecipe, DrafterShape, TrainConfig

    target = tiny_target(vocab_size=32, seed=0)
    layer_ids = build_target_layer_ids(target.num_layers, 2)
    rng = random.Random(0)
    names = [n for n in (f"seq-{i}" for i in range(200)) if prompt_part(n) == "drafter-train"][:16]
    sequences = []
    for name in names:  # all in the training part: no validation, which only the first process would run
        tokens = [rng.randrange(1, 32) for _ in range(rng.randrange(7, 22))]
        columns = target.sequence_features([tokens], layer_ids)[0]
        sequences.append(Sequence(name, np.array(tokens), 4, columns))
    recipe = DrafterRecipe(work_dir=str(work_dir), output_dir=str(work_dir / "out"),
                           drafter=DrafterShape(num_layers=1, num_target_features=2, block_size=4),
                           train=TrainConfig(steps=steps, sequences_per_step=4, anchors_per_sequence=6,
                                             learning_rate=3e-3, warmup_steps=1, vocab_shortlist=0, loss_gamma=7.0,
                                             loss_chunk_positions=16, checkpoint_every=100, validate_every=100))
    return recipe, target, sequences


@pytest.fixture
def no_tokenizer(monkeypatch):
    """The tiny target has no tokenizer to choose a mask token from: token 0 is it."""
    from blockpilot.runtime import drafter as drafter_module
    monkeypatch.setattr(drafter_module, "choose_mask_token_id", lambda tokenizer: 0)


def _ddp_worker(out_dir: str) -> None:
    from blockpilot.runtime import drafter as drafter_module
    from blockpilot.runtime.training.parallel import join, leave
    from blockpilot.runtime.training.train_drafter import train

    drafter_module.choose_mask_token_id = lambda tokenizer: 0
    workers = join()
    assert workers.world_size == 2
    recipe, target, sequences = _tiny_run(Path(out_dir) / "ddp")
    drafter = train(recipe, target, sequences, Path(out_dir) / "ddp" / "log.jsonl", workers=workers)
    if workers.main:
        torch.save(drafter.state_dict(), Path(out_dir) / "ddp.pt")
    leave(workers)


def test_two_processes_train_the_weights_one_process_trains(tmp_path, no_tokenizer):
    """torchrun with 2 gloo processes, each on half of every global batch, ends at the weights of one
    process on the whole batch (float tolerance); only the first process wrote the log and checkpoint."""
    import json

    from blockpilot.runtime.drafter import DFlashDraftModel
    from blockpilot.runtime.training.train_drafter import train

    launched = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                                 __file__, str(tmp_path)], cwd=Path(__file__).parent, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    recipe, target, sequences = _tiny_run(tmp_path / "one")  # meanwhile, one process
    alone = train(recipe, target, sequences, tmp_path / "one" / "log.jsonl").state_dict()
    output = launched.communicate(timeout=180)[0]
    assert launched.returncode == 0, output[-3000:]
    together = torch.load(tmp_path / "ddp.pt")
    assert together.keys() == alone.keys()
    for key in alone:
        assert torch.allclose(together[key], alone[key], atol=1e-5, rtol=1e-4), key
    fresh = DFlashDraftModel.for_target(target, num_layers=1, num_target_features=2, block_size=4, seed=0).state_dict()
    moved = max(float((alone[k] - fresh[k]).abs().max()) for k in alone if k in fresh and not k.startswith("fc."))
    assert moved > 1e-3  # it trained: equal weights are not just the starting ones
    records = [json.loads(line) for line in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    one = [json.loads(line) for line in (tmp_path / "one" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and (tmp_path / "ddp" / "checkpoints" / "last.pt").exists()
    assert [r["positions"] for r in records] == [r["positions"] for r in one]  # the global batch, counted once
    assert np.allclose([r["loss"] for r in records], [r["loss"] for r in one], atol=1e-3)


def test_training_throughput_reports_supervised_positions_per_second(tmp_path, no_tokenizer):
    from blockpilot.runtime.training.train_drafter import synthetic_sequences, training_throughput

    recipe, target, _ = _tiny_run(tmp_path)
    recipe.data.max_new_tokens = 24
    sequences = synthetic_sequences(recipe, target, 6, prompt_len=8)
    assert [len(s.tokens) for s in sequences] == [32] * 6 and max(int(s.tokens.max()) for s in sequences) < 32
    result = training_throughput(recipe, target, steps=2, warmup=1)
    # 4 sequences x 6 anchors, each with 1 to 3 labels (fewer near a response's end)
    assert 4 * 6 < result["positions_per_step"] <= 4 * 6 * 3 and result["supervised_positions_per_s"] > 0
    assert result["hardware"].endswith("(no GPU)") or "validation on" in result["hardware"]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
@pytest.mark.parametrize("soft", [0.0, 0.5])
def test_chunked_head_loss_under_bf16_autocast(soft, device):
    """On a GPU, and on a CPU with `train.cpu_autocast`: the loss and its gradient near float32's."""
    torch.manual_seed(0)
    hidden = torch.randn(300, 64, requires_grad=True)
    head, teacher = torch.randn(500, 64) / 8, torch.randn(300, 64)
    targets, weights = torch.randint(0, 500, (300,)), torch.rand(300)
    expected = _plain_loss(hidden, head, targets, weights, teacher, soft)
    (expected_grad,) = torch.autograd.grad(expected, hidden)
    on_device = hidden.detach().to(device).requires_grad_(True)
    with torch.autocast(device, dtype=torch.bfloat16):
        loss, _ = head_loss(on_device, head.to(device), targets.to(device), weights.to(device), teacher.to(device),
                            soft, chunk_positions=64)
    loss.backward()
    assert abs(float(loss.detach()) - float(expected.detach())) < 0.02 * float(expected.detach())
    assert torch.allclose(on_device.grad.float().cpu(), expected_grad, atol=2e-3, rtol=0.05)
    assert not torch.equal(on_device.grad.float().cpu(), expected_grad)  # bf16 ran: not float32's bits


def test_cpu_autocast_trains_as_float32_does(tmp_path, no_tokenizer):
    """`train.cpu_autocast`: the same steps in bf16 autocast log losses within bf16 rounding of float32's."""
    import json
    from dataclasses import replace

    from blockpilot.runtime.training.train_drafter import train

    logs = {}
    for autocast in (False, True):
        recipe, target, sequences = _tiny_run(tmp_path / str(autocast), steps=4)
        recipe = replace(recipe, train=replace(recipe.train, cpu_autocast=autocast))
        train(recipe, target, sequences, tmp_path / str(autocast) / "log.jsonl")
        logs[autocast] = [json.loads(line)["loss"] for line in (tmp_path / str(autocast) / "log.jsonl").read_text().splitlines()]
    assert len(logs[True]) == len(logs[False]) == 4
    assert np.allclose(logs[True], logs[False], rtol=0.03) and logs[True] != logs[False]


@cuda
def test_training_throughput_on_cuda(tmp_path, no_tokenizer):
    from blockpilot.runtime.training.train_drafter import training_throughput

    recipe, target, _ = _tiny_run(tmp_path)
    result = training_throughput(recipe, target, steps=3, warmup=2)
    assert result["supervised_positions_per_s"] > 0 and "validation on" in result["hardware"]


if __name__ == "__main__":
    _ddp_worker(sys.argv[1])
