"""BlockPilot's SGLang integration (SGLang 0.5.23).

* ``plugin.py``: the ``sglang.srt.plugins`` entry point; registers the
  ``blockpilot`` speculative algorithm and applies the CPU fixes.
* ``boot.py``: import-time fixes (torchvision beside CPU torch, the
  ``sgl_kernel`` stand-in) that must run before ``import sglang``; installed
  into a venv as a ``.pth`` hook by ``.ci/install_sglang_cpu.sh``.
* ``cpu_kernels.py``: plain-torch versions of the sgl-kernel CPU ops.
* ``worker.py``: ``BlockPilotWorker``, SGLang's ``DFlashWorkerV2`` with a block
  size per request (the policy after prefill, or the request's own).
* ``per_request.py``: its settings, request validation, start-up checks of the
  drafter and policy, and the ``meta_info`` / metrics hooks.

Importing this package is cheap on purpose (it runs from a ``.pth`` line at
interpreter start): it imports neither torch nor sglang.
"""
