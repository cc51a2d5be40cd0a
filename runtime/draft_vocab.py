"""The draft vocabulary: the tokens a drafter may propose, its logits computed over those alone.

A draft goes through the target's lm_head: on a CPU at small batch that GEMM over the whole
vocabulary streams 113 MB of float32 weights (SmolLM2's 49,152 x 576) and is the largest part of a
draft's cost. The target's answers use far fewer tokens: the 16,384 most frequent tokens of the
carried responses cover 97 % of MT-Bench's greedy answers (`make draft-vocab-sizes`), so the drafter's logits
are computed over those rows of the head only, the rest are -inf (a frequency-ranked draft
vocabulary, as FR-Spec does; SGLang's EAGLE takes the same list as `--speculative-token-map`).

Lossless as it stands: the target still verifies over its whole vocabulary, a draft outside the
list is simply never proposed, and a sampled draft's distribution is zero there, which speculative
sampling weighs exactly (`sampling.speculative_chain_tokens`). Only acceptance can move, by the
rare tokens the drafter would have guessed right (measured by `make draft-vocab-sizes`).

File format: SGLang's token map, a `torch.save`d 1-D integer tensor (or list) of token ids, loaded
with `weights_only=True`; the drafter's folder ships it as `draft_vocab.pt`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from torch.nn import functional as F

FILE_NAME = "draft_vocab.pt"


def most_frequent_tokens(token_arrays: Iterable[np.ndarray], size: int) -> torch.Tensor:
    """The `size` most frequent token ids over `token_arrays` (ties by id), sorted; only ids seen."""
    counts = np.zeros(0, dtype=np.int64)
    for tokens in token_arrays:
        tokens = np.asarray(tokens, dtype=np.int64)
        if len(tokens) == 0:
            continue
        if int(tokens.max()) >= len(counts):
            counts = np.pad(counts, (0, int(tokens.max()) + 1 - len(counts)))
        counts += np.bincount(tokens, minlength=len(counts))
    order = np.argsort(-counts, kind="stable")[:size]
    return torch.from_numpy(np.sort(order[counts[order] > 0]))


class DraftVocabulary:
    """Sorted unique token ids of one target's vocabulary (`vocab_size`) that drafts come from."""

    def __init__(self, token_ids: torch.Tensor, vocab_size: int, source: str = "draft vocabulary"):
        ids = torch.as_tensor(token_ids)
        if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool or len(ids) == 0:
            raise ValueError(f"{source}: a draft vocabulary is a non-empty 1-D list of integer token ids, "
                             f"got {ids.dtype} of shape {tuple(ids.shape)}")
        ids = ids.long()
        if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
            raise ValueError(f"{source}: token ids must be in 0..{vocab_size - 1} (the target's vocabulary), "
                             f"found {int(ids.min())}..{int(ids.max())}")
        ids = torch.unique(ids)  # sorted
        self.token_ids = ids
        self.vocab_size = vocab_size
        self._head_rows: dict = {}  # the ids per device, and the head's rows for them per weight, device and dtype

    def __len__(self) -> int:
        return len(self.token_ids)

    @classmethod
    def load(cls, path: str | Path, vocab_size: int) -> "DraftVocabulary":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"draft vocabulary {str(path)!r} does not exist")
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # a truncated or foreign file: say which and why, not unpickling internals
            raise ValueError(f"draft vocabulary {str(path)!r} is not a saved list of token ids "
                             f"({type(err).__name__}: {err})") from err
        if isinstance(data, (list, tuple)):
            if not all(isinstance(i, int) for i in data):
                raise ValueError(f"draft vocabulary {str(path)!r}: a list of token ids holds integers only")
            data = torch.tensor(data, dtype=torch.long)
        if not isinstance(data, torch.Tensor):
            raise ValueError(f"draft vocabulary {str(path)!r} holds a {type(data).__name__}, "
                             f"not a 1-D tensor of token ids")
        return cls(data, vocab_size, source=str(path))

    def save(self, path: str | Path) -> None:
        torch.save(self.token_ids.clone(), Path(path))

    def describe(self) -> dict:
        """What results made with this vocabulary depend on: its size and a checksum of its ids."""
        digest = hashlib.sha256(self.token_ids.numpy().astype("<i8").tobytes()).hexdigest()[:16]
        return {"size": len(self), "sha256": digest}

    def ids_on(self, device: torch.device) -> torch.Tensor:
        """The ids on `device` (copied once: no host-to-device copy per step)."""
        return self._cached(("ids", device), lambda: self.token_ids.to(device))

    def head_rows(self, weight: torch.Tensor) -> torch.Tensor:
        """The lm_head `weight`'s rows for these ids, contiguous (copied once per weight and device)."""
        key = ("rows", weight.untyped_storage().data_ptr(), weight.device, weight.dtype)
        return self._cached(key, lambda: weight.detach()[self.ids_on(weight.device)].contiguous())

    def _cached(self, key, make):
        if key not in self._head_rows:
            if key[0] == "rows":  # one head at a time: a moved or recast head replaces the copy
                for old in [k for k in self._head_rows if k[0] == "rows"]:
                    del self._head_rows[old]
            self._head_rows[key] = make()
        return self._head_rows[key]

    def expand(self, picked: torch.Tensor) -> torch.Tensor:
        """Logits `[..., len(self)]` over these ids -> `[..., vocab_size]`, -inf at every other token."""
        out = picked.new_full((*picked.shape[:-1], self.vocab_size), float("-inf"))
        out[..., self.ids_on(out.device)] = picked
        return out

    def logits(self, lm_head: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """The head's logits `[..., vocab_size]` over these ids, -inf elsewhere."""
        return self.logits_from(hidden, lm_head.weight, getattr(lm_head, "bias", None))

    def logits_from(self, hidden: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
        """`logits` for a bare head `weight` `[vocab_size, hidden]` (a server's head: no module)."""
        rows = self.head_rows(weight)
        return self.expand(F.linear(hidden.to(rows.dtype), rows,
                                    None if bias is None else bias[self.ids_on(bias.device)]))


FULL = ("full", "none", "off", "")


def drafts_from(vocabulary: "DraftVocabulary | None") -> dict | str:
    """What a drafter's drafts come from, as records made with it name it (a step-cost table's setup,
    the policy pipeline's made-with records): the vocabulary's size and checksum, or "full" (every
    token, the setting's own word)."""
    return vocabulary.describe() if vocabulary is not None else FULL[0]


def resolve_draft_vocab_path(setting: str | None, drafter_dir: str | Path | None) -> Path | None:
    """The one draft-vocabulary setting rule (the engine's and the SGLang plugin's): the token-id file
    drafts come from, or None for every token. Unset: the drafter folder's own `draft_vocab.pt` if it
    ships one; "full" (or "none"): every token; else a file, which must exist."""
    if setting is None:
        beside = Path(drafter_dir) / FILE_NAME if drafter_dir is not None else None
        return beside if beside is not None and beside.is_file() else None
    if str(setting).strip().lower() in FULL:
        return None
    path = Path(setting).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"draft vocabulary {str(path)!r} does not exist (a token-id file, or 'full')")
    return path
