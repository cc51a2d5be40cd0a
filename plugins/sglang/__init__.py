"""BlockPilot's SGLang integration (SGLang 0.5.23).

* ``plugin.py``: the ``sglang.srt.plugins`` entry point; registers the
  ``blockpilot`` speculative algorithm and applies the CPU fixes.
* ``boot.py``: import-time fixes (torchvision beside CPU torch, the
  ``sgl_kernel`` stand-in) that must run before ``import sglang``; installed
  into a venv as a ``.pth`` hook by ``.ci/install_sglang_cpu.sh``.
* ``cpu_kernels.py``: plain-torch versions of the sgl-kernel CPU ops.

Importing this package is cheap on purpose (it runs from a ``.pth`` line at
interpreter start): it imports neither torch nor sglang.
"""
