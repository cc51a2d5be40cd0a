"""Import-time fixes that must be in place before ``import sglang`` runs.

SGLang's processes (the launcher, the scheduler, the detokenizer, each started
by ``multiprocessing`` spawn) import a lot at module level before any plugin
entry point runs:

* ``import sglang`` itself reaches ``transformers.image_utils`` which imports
  ``torchvision`` whenever it is installed, and ``sglang.srt.configs`` imports
  ``torchvision.transforms`` unconditionally. PyPI's torchvision wheels are CUDA
  builds whose ``_C`` extension cannot load beside the CPU torch, and
  ``torchvision/_meta_registrations.py`` then dies registering a fake kernel for
  ``torchvision::nms`` (``operator torchvision::nms does not exist``).
* With ``SGLANG_USE_CPU_ENGINE=1`` several modules do
  ``from sgl_kernel import ..._cpu`` at import time, and no CPU build of
  sgl-kernel exists on PyPI.

Neither can be fixed from a ``sglang.srt.plugins`` entry point (it runs too
late in every process), so this module installs two small ``sys.meta_path``
finders, cheaply, at interpreter start. ``install_sglang_cpu.sh`` copies this
file into the venv as ``_blockpilot_sglang_cpu_boot.py`` and adds a ``.pth``
line that calls :func:`install`. The plugin entry point calls it as well
(idempotent), which covers in-process use when the ``.pth`` is absent.

Nothing here imports torch until ``torchvision`` or ``sgl_kernel`` is actually
imported. Set ``BLOCKPILOT_SGLANG_BOOT=0`` to switch it all off.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import re
import sys

__all__ = ["install", "prepare_torchvision_ops", "cpu_engine_requested"]

_MARK = "_blockpilot_boot_kind"
# Keeps the torch.library fragment alive: its definitions die with it.
_TORCHVISION_LIB = None
# Signatures of the ops that torchvision registers fake kernels for without
# checking that its C extension loaded (torchvision 0.2x).
_KNOWN_TV_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_STAND_IN_MODULE = "blockpilot.plugins.sglang.cpu.kernels"


def cpu_engine_requested() -> bool:
    return os.environ.get("SGLANG_USE_CPU_ENGINE", "0") == "1"


def _have(kind: str) -> bool:
    return any(getattr(f, _MARK, None) == kind for f in sys.meta_path)


# --------------------------------------------------------------------------
# torchvision
# --------------------------------------------------------------------------
def _torchvision_dir():
    spec = importlib.machinery.PathFinder.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def _fake_registered_ops(tv_dir: str):
    """Names of ``torchvision::`` ops that torchvision registers fakes for
    unconditionally (read from its source, so a new release is covered)."""
    names = set(_KNOWN_TV_SCHEMAS)
    try:
        with open(os.path.join(tv_dir, "_meta_registrations.py")) as f:
            text = f.read()
        names |= set(re.findall(r"register_fake\(\s*[\"']torchvision::(\w+)", text))
    except OSError:
        pass
    return sorted(names)


def prepare_torchvision_ops() -> bool:
    """If torchvision is installed but its C extension cannot load, define the
    schemas of the ops it registers fake kernels for, so that ``import
    torchvision`` succeeds (pure-Python transforms work; its C ops such as
    ``nms`` and ``decode_jpeg`` stay unavailable, as without the extension).

    Returns True if it defined anything. Does nothing when the extension loads.
    """
    global _TORCHVISION_LIB
    tv_dir = _torchvision_dir()
    if tv_dir is None:
        return False
    import glob

    import torch

    libs = sorted(glob.glob(os.path.join(tv_dir, "_C.*so")) + glob.glob(os.path.join(tv_dir, "_C.so")))
    if not libs:
        return False
    try:
        torch.ops.load_library(libs[0])
        return False  # a matching build: nothing to do
    except (OSError, ImportError, RuntimeError):
        pass
    defined = False
    for name in _fake_registered_ops(tv_dir):
        try:
            getattr(torch.ops.torchvision, name)
            continue  # already defined (by us earlier or by someone else)
        except (AttributeError, RuntimeError):
            pass
        if _TORCHVISION_LIB is None:
            _TORCHVISION_LIB = torch.library.Library("torchvision", "FRAGMENT")
        schema = _KNOWN_TV_SCHEMAS.get(name, f"{name}(Tensor self) -> Tensor")
        _TORCHVISION_LIB.define(schema)
        defined = True
    return defined


class _TorchvisionFinder(importlib.abc.MetaPathFinder):
    """One-shot: runs :func:`prepare_torchvision_ops` right before the first
    ``import torchvision``, then steps aside for the normal finders."""

    _blockpilot_boot_kind = "torchvision"

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "torchvision":
            return None
        try:
            sys.meta_path.remove(self)
        except ValueError:
            pass
        try:
            prepare_torchvision_ops()
        except Exception as exc:  # never break an import we were not asked to own
            print(f"[blockpilot boot] torchvision preparation failed: {exc!r}", file=sys.stderr)
        return None


# --------------------------------------------------------------------------
# sgl_kernel
# --------------------------------------------------------------------------
class _StandInLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return None  # default module creation

    def exec_module(self, module):
        impl = importlib.import_module(_STAND_IN_MODULE)
        for name in impl.__all__:
            setattr(module, name, getattr(impl, name))
        module.__blockpilot_stand_in__ = True
        module.__version__ = "0.0.0+blockpilot.cpu"
        module.__doc__ = impl.__doc__


class _SglKernelFinder(importlib.abc.MetaPathFinder):
    """Serves ``sgl_kernel`` from :mod:`blockpilot.plugins.sglang.cpu.kernels`
    when ``SGLANG_USE_CPU_ENGINE=1`` and no real ``sgl_kernel`` is installed.
    Submodules (``sgl_kernel.mamba``, ...) are not provided: importing them
    fails as it would without the stand-in."""

    _blockpilot_boot_kind = "sgl_kernel"

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "sgl_kernel":
            return None
        if not cpu_engine_requested():
            return None
        if importlib.machinery.PathFinder.find_spec("sgl_kernel") is not None:
            return None  # a real sgl_kernel is installed: use it
        try:
            if importlib.util.find_spec(_STAND_IN_MODULE) is None:
                return None
        except ImportError:
            return None
        return importlib.machinery.ModuleSpec("sgl_kernel", _StandInLoader(), origin=_STAND_IN_MODULE)


def install() -> None:
    """Register both finders (idempotent, also across copies of this file)."""
    if os.environ.get("BLOCKPILOT_SGLANG_BOOT", "1") == "0":
        return
    if "torchvision" not in sys.modules and not _have("torchvision"):
        sys.meta_path.insert(0, _TorchvisionFinder())
    if not _have("sgl_kernel"):
        # Appended: only consulted after the normal finders fail to find a real one.
        sys.meta_path.append(_SglKernelFinder())
