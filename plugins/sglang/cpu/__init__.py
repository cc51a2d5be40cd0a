"""What SGLang 0.5.23 lacks on the CPU engine (``SGLANG_USE_CPU_ENGINE=1``), for BlockPilot.

* ``kernels.py``: plain-torch stand-ins for the ``sgl_kernel`` CPU ops (served as ``sgl_kernel``
  by ``../boot.py``; they are needed by any CPU server, with or without speculation).
* ``attention.py``: ``torch_native``'s extend attention for the extend queries only, which
  BlockPilot's draft and verify passes run (SGLang's own computes every position of the sequence);
* ``linear_kernels.py``: the GEMM kernel measured fastest per row count (the runtime's
  ``cpu_linear`` rule) for the drafter, the draft head and the target;
* ``patches.py``: the CPU gaps of the DFlash decode path (``record_stream`` on CPU tensors, the
  bf16 cast of ``input_embeds``, ``torch_native`` as a draft attention backend). They are applied
  only in a process that serves ``--speculative-algorithm blockpilot`` (see ``plugin.py``).

The ``torch_native`` attention metadata for the draft and verify blocks is not here: it lives
with the draft mask in ``../info.py``, the torch_native counterpart of the FlashInfer metadata.

Importing this package is cheap: it imports neither torch nor sglang.
"""
