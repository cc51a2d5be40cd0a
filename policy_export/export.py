"""Export a trained policy to the ONNX file the runtime loads, and check the file before trusting it.

The file is the graph (raw features -> logits, normalisation inside) plus the metadata
`blockpilot.runtime.policy.BlockSizePolicy.load` reads: candidate sizes, feature spec, target and
drafter fingerprints, training summary. After writing, ONNX Runtime is run against PyTorch on
random inputs (same argmax, logits within `ATOL`) and its latency per request at batch 1 measured.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import torch

from blockpilot.runtime.blocks import MAX_BLOCK_SIZE
from blockpilot.runtime.policy import (FORMAT_VERSION, INPUT_NAME, METADATA_KEYS, OUTPUT_NAME, SCALAR_FEATURES,
                                       PolicyFeatureSpec, make_session, session_providers)

from .model import PolicyMLP

ATOL = 1e-4
OPSET = 18


def export_policy(model: PolicyMLP, spec: PolicyFeatureSpec, candidate_sizes: list[int], target_fp: dict,
                  drafter_fp: dict, training_summary: dict, path: str | Path, *, num_checks: int = 64,
                  latency_calls: int = 200, seed: int = 0) -> dict:
    """Write `model` as an ONNX policy at `path`; returns the agreement and latency figures.

    Raises ValueError if the pieces do not fit together, RuntimeError if ONNX Runtime disagrees
    with PyTorch (the file is removed then).
    """
    path = Path(path)
    candidate_sizes = [int(s) for s in candidate_sizes]
    if sorted(set(candidate_sizes)) != candidate_sizes or not 1 <= candidate_sizes[0] <= candidate_sizes[-1] <= MAX_BLOCK_SIZE:
        raise ValueError(f"candidate sizes must be increasing distinct integers in 1..{MAX_BLOCK_SIZE}, got {candidate_sizes}")
    config = model.config
    if config.num_classes != len(candidate_sizes):
        raise ValueError(f"the model has {config.num_classes} classes for {len(candidate_sizes)} candidate sizes")
    if config.input_dim != spec.dim:
        raise ValueError(f"the model takes {config.input_dim} features, the feature spec describes {spec.dim}")
    if list(spec.scalars) != list(SCALAR_FEATURES):
        raise ValueError(f"feature spec scalars {spec.scalars} differ from the runtime's {list(SCALAR_FEATURES)}")
    model = copy.deepcopy(model).cpu().float().eval()
    mean, std = model.feature_mean.double(), model.feature_std.double()
    if spec.mean is not None and not (torch.allclose(torch.tensor(spec.mean, dtype=torch.float64), mean, atol=1e-5)
                                      and torch.allclose(torch.tensor(spec.std, dtype=torch.float64), std, atol=1e-5)):
        raise ValueError("the feature spec's normalisation differs from the model's buffers")
    spec = replace(spec, mean=mean.tolist(), std=std.tolist())  # what the graph really applies

    example = (model.feature_mean + model.feature_std * torch.randn(2, spec.dim)).float()
    program = torch.onnx.export(model, (example,), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                                opset_version=OPSET, verbose=False)
    proto = program.model_proto
    metadata = {
        METADATA_KEYS["format"]: str(FORMAT_VERSION),
        METADATA_KEYS["candidates"]: json.dumps(candidate_sizes),
        METADATA_KEYS["spec"]: spec.to_json(),
        METADATA_KEYS["target"]: json.dumps(target_fp, sort_keys=True),
        METADATA_KEYS["drafter"]: json.dumps(drafter_fp, sort_keys=True),
        METADATA_KEYS["summary"]: json.dumps(training_summary, sort_keys=True),
        METADATA_KEYS["model"]: json.dumps(config.to_dict(), sort_keys=True),
    }
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    data = proto.SerializeToString()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")
    partial.write_bytes(data)
    partial.replace(path)

    try:
        check = check_against_pytorch(model, data, spec, num_checks, seed)
    except RuntimeError:
        path.unlink()
        raise
    providers = session_providers()
    latency = ort_latency_ms(make_session(data, providers), spec.dim, latency_calls)
    return {"path": str(path), **check, "ort_latency_ms_batch1": latency, "providers": providers, "opset": OPSET,
            "bytes": len(data)}


def check_against_pytorch(model: PolicyMLP, data: bytes, spec: PolicyFeatureSpec, num_checks: int, seed: int) -> dict:
    """ORT (CPU) vs PyTorch on random raw features around the training distribution, as one batch and
    one row at a time (the batch axis must really be dynamic). A differing argmax is excused only
    where PyTorch's own top-2 logits are within ATOL (a tie either answer is right about)."""
    session = make_session(data, ["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(seed)
    raw = (model.feature_mean + model.feature_std * torch.randn(num_checks, spec.dim, generator=generator)).float()
    with torch.no_grad():
        expected = model(raw).numpy()
    batched = session.run([OUTPUT_NAME], {INPUT_NAME: raw.numpy()})[0]
    single = np.concatenate([session.run([OUTPUT_NAME], {INPUT_NAME: raw[i:i + 1].numpy()})[0] for i in range(4)])
    max_diff = float(max(np.abs(batched - expected).max(), np.abs(single - expected[:4]).max()))
    top2 = np.sort(expected, axis=1)[:, -2:]
    tie = (top2[:, 1] - top2[:, 0]) <= ATOL
    differs = batched.argmax(axis=1) != expected.argmax(axis=1)
    if max_diff > ATOL or (differs & ~tie).any():
        raise RuntimeError(f"ONNX Runtime disagrees with PyTorch: max |logit diff| {max_diff:.2e} (limit {ATOL}), "
                           f"{int((differs & ~tie).sum())} of {num_checks} argmax differ")
    return {"max_abs_diff": max_diff, "argmax_agreement": float(1 - differs.mean()), "checked_inputs": num_checks}


def ort_latency_ms(session, dim: int, calls: int = 200) -> float:
    """Median wall time of one session call at batch 1, in ms (after a short warm-up)."""
    features = np.random.default_rng(0).standard_normal((1, dim)).astype(np.float32)
    for _ in range(10):
        session.run([OUTPUT_NAME], {INPUT_NAME: features})
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        session.run([OUTPUT_NAME], {INPUT_NAME: features})
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3
