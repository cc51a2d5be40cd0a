"""BlockPilot's SGLang integration (SGLang 0.5.23): ``--speculative-algorithm blockpilot``, cut the
way SGLang cuts a speculative algorithm (``srt/speculative/dflash_*.py``).

* ``plugin.py``: the ``sglang.srt.plugins`` entry point; registers the algorithm and the hooks,
  each behind the one check ``serving_blockpilot()``;
* ``server_args.py``: the server arguments (what ``_handle_dflash`` does for DFLASH) and the
  start-up refusals;
* ``worker.py``: ``BlockPilotWorker``, SGLang's ``DFlashWorkerV2`` with a block size per request
  (orchestration only);
* ``info.py``: the spec-info classes: the running batch's per-row block choices, and the draft
  pass's spec info with the draft mask on each attention backend;
* ``settings.py``: the server's settings, a request's ``blockpilot_*`` parameters, the start-up
  fit checks of drafter and policy;
* ``metrics.py``: ``meta_info`` fields, server metrics, fallbacks;
* ``cpu/``: what SGLang lacks on the CPU engine (``sgl_kernel`` stand-ins, the CPU patches);
* ``local_server.py`` and ``serve_bench.py``: a local SGLang server as a child process, and the
  serving benchmark (a BlockPilot server against SGLang without speculation, ``make serve-bench``);
* ``boot.py``: import-time fixes (torchvision beside CPU torch, the ``sgl_kernel`` stand-in) that
  must run before ``import sglang``; kept apart: ``.ci/install_sglang_cpu.sh`` copies it into a
  venv as a ``.pth`` hook.

The pure block logic (caps, masks, counts) lives in ``blockpilot.runtime.blocks``, the policy's
features and inference in ``blockpilot.runtime.policy``; the plugin calls them.

Importing this package is cheap on purpose (``boot`` imports it at interpreter start): it imports
neither torch nor sglang.
"""
