"""Training data: the target's OWN responses to the training prompts.

The drafter learns to predict what the target will say, so the responses come from the target
itself. `DeviceGenerator` writes them hundreds at a time and `append_responses` adds them to a
`ResponseStore` (compact shards that later runs add to); `generate_responses` writes the engine's
own output as JSONL shards (the evaluation's reference decoding). Either skips prompts already
done, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..engine import SpeculativeEngine
from ..kv_cache import SlotKVCache
from ..prompts import PromptRecord, encode_prompt
from ..requests import GenerationRequest, GenerationResult
from ..sampling import SamplingParams
from ..target import TargetModel


class DeviceGenerator:
    """The target's own responses, hundreds of rows at once: a static KV cache with one slot per row,
    one token per row a step, finished rows retired and their slots refilled with the next prompts.

    Built for a GPU (the target in bf16 there; few host syncs: finished rows are looked for every
    `check_every` steps, and the host tracks lengths itself) and run unchanged on the CPU, where the
    tests hold it to the engine's greedy decoding token for token. A sampled row draws with Gumbel
    noise hashed from its request's seed and its step, so its tokens do not depend on the batch it
    ran in (a rerun writes the same data)."""

    def __init__(self, target: TargetModel, batch_size: int = 256, check_every: int = 8,
                 prefill_tokens: int = 65536):
        self.target = target
        self.batch_size = batch_size
        self.check_every = check_every
        self.prefill_tokens = prefill_tokens  # padded tokens per refill forward (bounds its memory)

    @torch.inference_mode()
    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        if not requests:
            return []
        target, device = self.target, self.target.device
        capacity = max(len(r.prompt_ids) + r.sampling.max_new_tokens for r in requests)
        if capacity > target.max_context:
            raise ValueError(f"a request needs {capacity} positions; the target has {target.max_context}")
        slots = min(self.batch_size, len(requests))
        # Longest prompts first: rows running together have similar lengths, so little attention is masked.
        queue = sorted(range(len(requests)), key=lambda i: len(requests[i].prompt_ids))  # popped from the end
        state = _Rows(target, slots, capacity, max(r.sampling.max_new_tokens for r in requests))
        owner = [-1] * slots  # request index per slot; -1: free
        lengths = np.zeros(slots, dtype=np.int64)  # tokens in each slot's cache (the host's copy)
        results: list[GenerationResult | None] = [None] * len(requests)
        eos = torch.tensor(sorted(target.eos_token_ids), dtype=torch.long, device=device)

        def refill(free: list[int]) -> None:
            taken = [queue.pop() for _ in free[:len(queue)]]
            for group in _prefill_groups([len(requests[i].prompt_ids) for i in taken], self.prefill_tokens):
                rows = [free[g] for g in group]
                picked = [requests[taken[g]] for g in group]
                logits = _prefill(target, state.cache, rows, [r.prompt_ids for r in picked])
                state.start(rows, picked, logits, eos)
                for slot, g in zip(rows, group):
                    owner[slot], lengths[slot] = taken[g], len(requests[taken[g]].prompt_ids)

        refill(list(range(slots)))
        while any(o >= 0 for o in owner):
            live = np.array([o >= 0 for o in owner])  # free slots run too, unseen: their length does not count
            for _ in range(self.check_every):
                state.step(target, int(lengths[live].max()) + 1, eos)
                lengths = np.minimum(lengths + 1, capacity - 1)
            done = state.done.cpu().numpy()  # the one host sync of `check_every` steps
            finished = [s for s in range(len(owner)) if owner[s] >= 0 and done[s]]
            if finished:
                index = torch.tensor(finished, device=device)
                tokens, counts = state.out[index].cpu().tolist(), state.count[index].cpu().tolist()
                for slot, row, count in zip(finished, tokens, counts):
                    request = requests[owner[slot]]
                    row = row[:count]
                    ended = bool(row) and row[-1] in target.eos_token_ids
                    results[owner[slot]] = GenerationResult(request.request_id, row, "", "eos" if ended else "length", None)
                    owner[slot] = -1
            free = [s for s in range(len(owner)) if owner[s] < 0]
            if queue and free:
                refill(free)
            elif not queue and 0 < len(free) and len(free) * 2 >= len(owner):
                running = [s for s in range(len(owner)) if owner[s] >= 0]  # the tail: keep only these rows
                state.keep(torch.tensor(running, dtype=torch.long, device=device))
                owner, lengths = [owner[s] for s in running], lengths[running]
        return results


class _Rows:
    """The running rows' device state: cache, next token, positions, outputs, limits."""

    def __init__(self, target: TargetModel, slots: int, capacity: int, max_new_tokens: int):
        device = target.device
        self.cache = target.new_cache(slots, capacity)
        self.capacity = capacity
        self.next = torch.zeros(slots, dtype=torch.long, device=device)  # the token each row feeds next
        self.position = torch.zeros(slots, dtype=torch.long, device=device)  # where its K/V goes
        self.out = torch.zeros(slots, max_new_tokens + 1, dtype=torch.long, device=device)  # +1: a spare column finished rows write into
        self.count = torch.zeros(slots, dtype=torch.long, device=device)
        self.limit = torch.ones(slots, dtype=torch.long, device=device)
        self.temperature = torch.zeros(slots, device=device)
        self.seed = torch.zeros(slots, dtype=torch.long, device=device)
        self.done = torch.ones(slots, dtype=torch.bool, device=device)
        self.sampled = False  # whether any row samples (else the noise is never drawn)

    def start(self, rows: list[int], requests: list[GenerationRequest], logits: torch.Tensor, eos: torch.Tensor) -> None:
        """Rows just prefilled: their first token from the prefill's last logits."""
        device = self.next.device
        index = torch.tensor(rows, device=device)
        self.position[index] = torch.tensor([len(r.prompt_ids) for r in requests], device=device)
        self.limit[index] = torch.tensor([r.sampling.max_new_tokens for r in requests], device=device)
        self.temperature[index] = torch.tensor([r.sampling.temperature for r in requests], device=device,
                                               dtype=self.temperature.dtype)
        self.seed[index] = torch.tensor([(r.sampling.seed or 0) & 0xFFFFFFFF for r in requests], device=device)
        self.sampled = self.sampled or any(r.sampling.temperature > 0 for r in requests)
        self.count[index] = 0
        self.done[index] = self.limit[index] <= 0
        self._commit(index, logits, eos)

    def step(self, target: TargetModel, kv_len: int, eos: torch.Tensor) -> None:
        logits = _decode(target, self.cache, self.next, self.position, min(kv_len, self.capacity))
        self.position = (self.position + 1).clamp_(max=self.capacity - 1)  # finished rows idle at the end
        self._commit(None, logits, eos)

    def _commit(self, index: torch.Tensor | None, logits: torch.Tensor, eos: torch.Tensor) -> None:
        pick = (lambda t: t) if index is None else (lambda t: t[index])
        count, done = pick(self.count), pick(self.done)
        token = logits.argmax(-1)
        if self.sampled:
            temperature = pick(self.temperature)
            noise = gumbel_noise(pick(self.seed), count, logits.shape[-1])
            drawn = (logits.float() / temperature.clamp(min=1e-6)[:, None] + noise).argmax(-1)
            token = torch.where(temperature > 0, drawn, token)
        rows = torch.arange(len(token), device=token.device) if index is None else index
        self.out[rows, count] = token  # a finished row writes past its end: ignored
        count = count + (~done).long()
        done = done | torch.isin(token, eos) | (count >= pick(self.limit))
        if index is None:
            self.count, self.done, self.next = count, done, token
        else:
            self.count[index], self.done[index], self.next[index] = count, done, token

    def keep(self, index: torch.Tensor) -> None:
        """Only the rows in `index`, in that order (the cache too)."""
        for name in ("next", "position", "out", "count", "limit", "temperature", "seed", "done"):
            setattr(self, name, getattr(self, name)[index])
        self.cache.keys = [k[index] for k in self.cache.keys]
        self.cache.values = [v[index] for v in self.cache.values]
        self.cache.num_slots = len(index)


def gumbel_noise(seed: torch.Tensor, step: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[rows, vocab] Gumbel noise, a pure function of (seed, step, token) per row (a 32-bit hash in
    int64 arithmetic): sampling by argmax(logits / T + noise) is then the same in any batch and on any device."""
    mask = 0xFFFFFFFF
    x = (seed[:, None] * 0x9E3779B1 + step[:, None] * 0x85EBCA77
         + torch.arange(vocab_size, device=seed.device)[None, :] * 0xC2B2AE3D) & mask
    for shift, multiplier in ((16, 0x85EBCA6B), (13, 0xC2B2AE35)):  # murmur3's finaliser
        x = ((x ^ (x >> shift)) * multiplier) & mask
    x = x ^ (x >> 16)
    uniform = (x.double() + 0.5) / 2.0 ** 32
    return -torch.log(-torch.log(uniform)).float()


def _prefill(target: TargetModel, cache: SlotKVCache, rows: list[int], prompts: list[list[int]]) -> torch.Tensor:
    """Prompts (right-padded into one batch) into cache slots `rows`; logits [n, vocab] at each one's last token."""
    device = target.device
    width = max(len(p) for p in prompts)
    tokens = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = torch.tensor(p)
    slots = torch.tensor(rows, device=device)
    n = len(prompts)

    def attend(layer, q, k, v):
        q, k, v = (t.unflatten(0, (n, width)).transpose(1, 2) for t in (q, k, v))  # [n, heads, width, dim]
        cache.keys[layer][slots, :, :width] = k
        cache.values[layer][slots, :, :width] = v
        # causal over each row's own positions: the padding sits after every real token, seen by none
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return out.transpose(1, 2).flatten(2).flatten(0, 1)

    positions = torch.arange(width, device=device).repeat(n)
    hidden, _ = target.decoder_layers(target.embed_tokens(tokens.to(device).flatten()), positions, attend)
    last = torch.tensor([i * width + len(p) - 1 for i, p in enumerate(prompts)], device=device)
    return target.lm_head(hidden[last])


def grouped_decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                             visible: torch.Tensor) -> torch.Tensor:
    """One query per row, `q` [n, Hq, D], against `keys`/`values` [n, Hkv, T, D] where `visible` [n, T]:
    [n, Hq * D]. Each key head serves its group of query heads as one matrix (no copy of the keys per
    query head), scores and softmax in float32. On a GPU, SDPA given a mask and grouped heads finds no
    flash kernel (it takes no mask) nor memory-efficient one (no grouped heads), and unless cuDNN takes
    it falls back to its math path, which copies the keys and values for every query head (and, in
    bf16, to float32) in every layer of every step."""
    n, heads, dim = q.shape
    kv_heads = keys.shape[1]
    grouped = q.reshape(n, kv_heads, heads // kv_heads, dim)  # query head h reads key head h // group
    scores = torch.matmul(grouped, keys.transpose(-1, -2)).float() * dim ** -0.5  # [n, Hkv, group, T]
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    return torch.matmul(scores.softmax(dim=-1).to(values.dtype), values).reshape(n, heads * dim)


def _decode(target: TargetModel, cache: SlotKVCache, tokens: torch.Tensor, positions: torch.Tensor,
            kv_len: int, grouped: bool | None = None) -> torch.Tensor:
    """One token per cache slot at `positions`: logits [slots, vocab]. `grouped`: attention by
    `grouped_decode_attention` (default on a GPU) rather than SDPA (default on a CPU)."""
    rows = torch.arange(len(tokens), device=tokens.device)
    visible = torch.arange(kv_len, device=tokens.device)[None, :] <= positions[:, None]  # [slots, kv_len]
    mask = visible[:, None, None, :]
    grouped = tokens.device.type == "cuda" if grouped is None else grouped

    def attend(layer, q, k, v):
        cache.keys[layer][rows, :, positions] = k
        cache.values[layer][rows, :, positions] = v
        keys, values = cache.keys[layer][:, :, :kv_len], cache.values[layer][:, :, :kv_len]
        if grouped:
            return grouped_decode_attention(q, keys, values, visible)
        # SDPA reads the cache's strided slice in place (a matmul there copies it: 2.5x slower in bf16 on a CPU)
        out = F.scaled_dot_product_attention(q[:, :, None, :], keys, values, attn_mask=mask, enable_gqa=True)
        return out.flatten(1)

    hidden, _ = target.decoder_layers(target.embed_tokens(tokens), positions, attend)
    return target.lm_head(hidden)


def _prefill_groups(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices in order, grouped so each group's padded size (longest x count) stays within `budget`."""
    groups, current, longest = [], [], 0
    for i, n in enumerate(lengths):
        if current and max(longest, n) * (len(current) + 1) > budget:
            groups.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, n)
    return groups + ([current] if current else [])


def completed_ids(data_dir: Path) -> set[str]:
    done = set()
    for shard in sorted(data_dir.glob("responses-*.jsonl")):
        for line in shard.read_text().splitlines():
            done.add(json.loads(line)["id"])
    return done


def read_responses(data_dir: str | Path) -> list[dict]:
    rows = []
    for shard in sorted(Path(data_dir).glob("responses-*.jsonl")):
        rows.extend(json.loads(line) for line in shard.read_text().splitlines())
    return rows


def generate_responses(engine: SpeculativeEngine | DeviceGenerator, records: list[PromptRecord], data_dir: str | Path, *,
                       max_new_tokens: int = 256, shard_size: int = 64, max_prompt_tokens: int = 768,
                       temperature: float = 0.0) -> int:
    """Generate responses (greedy unless `temperature` > 0, then seeded by the record's id, so a rerun
    writes the same data) for every record not yet in `data_dir`; returns how many were added."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    done = completed_ids(data_dir)
    todo = [r for r in records if r.id not in done]
    next_shard = len(list(data_dir.glob("responses-*.jsonl")))
    tokenizer = engine.target.tokenizer
    bar = tqdm(total=len(records), initial=len(records) - len(todo), desc="target responses", unit="prompt")
    added = 0
    for start in range(0, len(todo), shard_size):
        chunk = todo[start:start + shard_size]
        encoded = [(r, encode_prompt(tokenizer, r)) for r in chunk]
        encoded = [(r, ids) for r, ids in encoded if len(ids) <= max_prompt_tokens]
        requests = [GenerationRequest(ids, SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                                                          seed=zlib.crc32(r.id.encode())),
                                      r.id, block_size=1)
                    for r, ids in encoded]
        results = engine.generate(requests) if requests else []
        lines = [json.dumps({"id": r.id, "prompt_ids": ids, "response_ids": res.token_ids,
                             "finish_reason": res.finish_reason})
                 for (r, ids), res in zip(encoded, results)]
        # A shard appears whole or not at all, so a killed run never leaves half a shard behind.
        partial = data_dir / f"responses-{next_shard:05d}.jsonl.part"
        partial.write_text("\n".join(lines) + ("\n" if lines else ""))
        partial.rename(partial.with_suffix(""))
        next_shard += 1
        added += len(lines)
        bar.update(len(chunk))
    bar.close()
    return added


def append_responses(generator: DeviceGenerator, records: list[PromptRecord], store, encode, *,
                     max_new_tokens: int = 256, temperature: float = 0.0, chunk: int = 1024,
                     max_prompt_tokens: int = 768, deadline: float | None = None) -> int:
    """The target's responses to every record not yet in `store` (a `ResponseStore`), `chunk` prompts
    a call, each chunk appended as soon as it is done (so a run cut short keeps what it made); stops
    at `deadline` (time.monotonic()). Greedy unless `temperature` > 0, then seeded by the record's id.
    `encode(record)` gives its prompt's token ids. Returns how many were added."""
    import time

    done = store.ids()
    todo = [r for r in records if r.id not in done]
    added = 0
    bar = tqdm(total=len(todo), desc=f"target responses -> {store.path.name}", unit="prompt")
    for start in range(0, len(todo), chunk):
        if deadline is not None and time.monotonic() > deadline:
            break
        encoded = [(r, encode(r)) for r in todo[start:start + chunk]]
        encoded = [(r, ids) for r, ids in encoded if len(ids) <= max_prompt_tokens]
        requests = [GenerationRequest(ids, SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                                                          seed=zlib.crc32(r.id.encode())), r.id, block_size=1)
                    for r, ids in encoded]
        results = generator.generate(requests)
        added += store.append([{"id": r.id, "prompt_ids": ids, "response_ids": res.token_ids,
                                "finish_reason": res.finish_reason} for (r, ids), res in zip(encoded, results)])
        bar.update(len(todo[start:start + chunk]))
    bar.close()
    return added


def measure_throughput(generator: DeviceGenerator, prompts: list[list[int]], max_new_tokens: int,
                       temperature: float = 0.0) -> dict:
    """Generated tokens per second over `prompts` (after one short warm-up call)."""
    import time

    def run(batch):
        requests = [GenerationRequest(ids, SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                                                          seed=i), f"b{i}", block_size=1) for i, ids in enumerate(batch)]
        results = generator.generate(requests)
        if generator.target.device.type == "cuda":
            torch.cuda.synchronize()
        return results

    run(prompts[:2])
    start = time.perf_counter()
    results = run(prompts)
    seconds = time.perf_counter() - start
    tokens = sum(len(r.token_ids) for r in results)
    return {"prompts": len(prompts), "generated_tokens": tokens, "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / seconds, 1)}
