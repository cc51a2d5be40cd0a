"""The CPU gaps of SGLang's DFlash decode path, closed for a BLOCKPILOT server on the CPU engine.

Found by running DFLASH-style decoding on CPU (docs/sglang-cpu-notes.md section 7):

* ``Tensor.record_stream`` raises for CPU tensors; DFlashWorkerV2 calls it every decode step;
* ``ModelRunner._extend_forward_kwargs`` casts ``input_embeds`` to bf16 whatever the model dtype,
  and DFlashWorkerV2 feeds its draft block through ``input_embeds`` (CPU runs are float32);
* SGLang's draft attention backends are GPU-only; the CPU engine needs ``torch_native``.

Nothing here runs at plugin load: ``plugin.activate_in_this_process`` applies the two process-wide
patches when a BLOCKPILOT worker is built, and ``plugin.py`` registers the hook behind its one
check, so a server without ``--speculative-algorithm blockpilot`` keeps SGLang's behaviour.
"""

from __future__ import annotations

# What the CPU engine adds to SGLang's draft attention backends (DRAFT_ATTENTION_BACKEND_CHOICES).
CPU_DRAFT_ATTENTION_BACKENDS = ("torch_native",)


def hook_extend_forward_kwargs(result, self, forward_batch, *args, **kwargs):
    """AFTER ``ModelRunner._extend_forward_kwargs``: give the model its own dtype back (exactly:
    from the original embeddings, unless replace_embeds were scattered into the cast copy). The
    bf16 cast is a dtype bug on any device, but only CPU runs are changed."""
    import torch

    embeds = forward_batch.input_embeds
    dtype = getattr(self, "dtype", None)
    if result is None or embeds is None or "input_embeds" not in result or dtype is None or dtype == torch.bfloat16:
        return result
    if result["input_embeds"].dtype == dtype:
        return result
    if forward_batch.replace_embeds is not None and forward_batch.replace_positions is not None:
        result["input_embeds"] = result["input_embeds"].to(dtype)
    else:
        result["input_embeds"] = embeds.to(dtype)
    return result


def _make_record_stream_a_noop_on_cpu() -> None:
    """DFlashWorkerV2 records ``batch.seq_lens`` on the current stream every decode step: a CUDA
    caching-allocator hint with no meaning on CPU, where it raises. A no-op for CPU tensors only."""
    import torch

    if getattr(torch.Tensor.record_stream, "_blockpilot_cpu_noop", False):
        return
    original = torch.Tensor.record_stream

    def record_stream(self, stream):
        if self.device.type == "cpu":
            return None
        return original(self, stream)

    record_stream._blockpilot_cpu_noop = True
    record_stream.__wrapped__ = original
    torch.Tensor.record_stream = record_stream


def _allow_cpu_draft_attention_backends() -> None:
    """``draft_worker_common.resolve_draft_worker_attention_backend`` replaces any draft backend
    outside ``DRAFT_ATTENTION_BACKEND_CHOICES`` by ``flashinfer`` (CUDA-only). SGLang exports
    ``add_draft_attention_backend_choices`` for exactly this."""
    from sglang.srt.arg_groups.choices import DRAFT_ATTENTION_BACKEND_CHOICES, add_draft_attention_backend_choices

    missing = [b for b in CPU_DRAFT_ATTENTION_BACKENDS if b not in DRAFT_ATTENTION_BACKEND_CHOICES]
    if missing:
        add_draft_attention_backend_choices(missing)


def apply_process_patches() -> dict[str, str]:
    """The process-wide CPU patches (idempotent); returns name -> reason of what was applied."""
    _make_record_stream_a_noop_on_cpu()
    _allow_cpu_draft_attention_backends()
    return {
        "torch.Tensor.record_stream": "no-op for CPU tensors (DFlashWorkerV2 records seq_lens on the current stream)",
        "choices.DRAFT_ATTENTION_BACKEND_CHOICES": "+torch_native (via add_draft_attention_backend_choices)",
    }
