#!/usr/bin/env bash
# Install SGLang 0.5.23 for the CPU into an existing venv, without its CUDA
# stack and without letting pip replace the CPU torch.
#
#   .ci/install_sglang_cpu.sh /path/to/venv/bin/python
#
# What it installs (the "lighter CPU set", see docs/sglang-cpu-notes.md):
#   * torch==2.13.0 (the local CPU wheel; kept, never replaced: every pip call
#     runs with a constraints file pinning torch==2.13.0, transformers==5.23.0
#     and torchvision==0.28.0),
#   * sglang==0.5.23 with --no-deps,
#   * sglang's requirements read from its wheel METADATA minus the CUDA-only
#     ones, plus triton and IPython; transformers 5.23.0 instead of sglang's
#     pin 5.19.0 (what BlockPilot's runtime needs; sglang's CPU path works with it),
#   * torchvision==0.28.0 (the release paired with torch 2.13; its CUDA-built C
#     extension cannot load here) plus a start-up hook, a `.pth` file and the
#     module `_blockpilot_sglang_cpu_boot.py` copied from
#     plugins/sglang/boot.py, that lets `import torchvision` succeed without
#     its C ops and serves the `sgl_kernel` CPU stand-ins when
#     SGLANG_USE_CPU_ENGINE=1 (the stand-ins themselves come from the
#     blockpilot package, `blockpilot.plugins.sglang.cpu.kernels`, which must
#     be installed in the venv too; re-run this script after boot.py changes).
#
# Idempotent: if sglang 0.5.23 already imports with torch 2.13.0 and
# transformers 5.23.0, only the (cheap) start-up hook is refreshed.
# Prints the time the install took.
set -euo pipefail

PY="${1:?usage: $0 VENV_PYTHON}"
if [[ ! -x "$PY" ]]; then
  echo "install_sglang_cpu: no python at $PY" >&2
  exit 2
fi
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
BOOT_SRC="$REPO/plugins/sglang/boot.py"

SGLANG_VERSION=0.5.23
TORCH_VERSION=2.13.0
TRANSFORMERS_VERSION=5.23.0
TORCHVISION_VERSION=0.28.0
# sglang requirements that are CUDA-only (or replaced above) and so not installed.
EXCLUDE="cuda-python flash-attn-4 flashinfer-python humming-kernels nvidia-cutlass-dsl \
nvidia-mathdx nvshmem4py-cu13 quack-kernels sgl-deep-ep sgl-deep-gemm sgl-flash-mla \
sglang-kernel tilelang torch-memory-saver torchaudio torchcodec torch torchvision transformers"

start=$(date +%s)
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
PIP=("$PY" -m pip --disable-pip-version-check)

cat >"$WORK/constraints.txt" <<EOF
torch==$TORCH_VERSION
transformers==$TRANSFORMERS_VERSION
torchvision==$TORCHVISION_VERSION
EOF

install_boot_hook() {
  local site
  site="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  cp "$BOOT_SRC" "$site/_blockpilot_sglang_cpu_boot.py"
  echo "import _blockpilot_sglang_cpu_boot as _bp_boot; _bp_boot.install()" >"$site/_blockpilot_sglang_cpu_boot.pth"
  echo "install_sglang_cpu: start-up hook in $site/_blockpilot_sglang_cpu_boot.{py,pth}"
}

already_installed() {
  "$PY" - "$SGLANG_VERSION" "$TORCH_VERSION" "$TRANSFORMERS_VERSION" <<'EOF' >/dev/null 2>&1
import sys
from importlib.metadata import version
want_sgl, want_torch, want_tf = sys.argv[1:4]
assert version("sglang") == want_sgl
assert version("torch").split("+")[0] == want_torch
assert version("transformers") == want_tf
import triton, IPython  # noqa: F401
import sglang  # noqa: F401  (reaches torchvision through transformers)
import sglang.srt.configs  # noqa: F401  (imports torchvision.transforms)
import sglang.srt.server_args  # noqa: F401
EOF
}

install_boot_hook  # first: the check below imports sglang, which needs it
if already_installed; then
  echo "install_sglang_cpu: sglang $SGLANG_VERSION already importable in $PY; nothing to install"
  echo "install_sglang_cpu: took $(( $(date +%s) - start )) s"
  exit 0
fi

echo "install_sglang_cpu: installing sglang $SGLANG_VERSION (CPU set) into $PY"
"${PIP[@]}" install -q "torch==$TORCH_VERSION" -c "$WORK/constraints.txt"

"${PIP[@]}" download -q --no-deps "sglang==$SGLANG_VERSION" -d "$WORK/wheel"
WHEEL="$(ls "$WORK"/wheel/sglang-"$SGLANG_VERSION"-*.whl | head -n1)"

# sglang's requirements from its METADATA, without extras and CUDA-only ones.
"$PY" - "$WHEEL" "$EXCLUDE" >"$WORK/requirements.txt" <<'EOF'
import sys, zipfile
from email.parser import Parser
try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ImportError:  # pip's vendored copy is always there
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name
wheel, exclude = sys.argv[1], {canonicalize_name(x) for x in sys.argv[2].split()}
with zipfile.ZipFile(wheel) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    msg = Parser().parsestr(z.read(meta).decode())
for line in msg.get_all("Requires-Dist") or []:
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    if canonicalize_name(req.name) in exclude:
        continue
    req.marker = None
    print(req)
EOF
echo "install_sglang_cpu: $(wc -l <"$WORK/requirements.txt") requirements from sglang's METADATA"

"${PIP[@]}" install -q --no-deps "$WHEEL"
echo "install_sglang_cpu: pip will report sglang's unmet CUDA pins (torch==2.14.1, transformers==5.19.0, ...): expected"
"${PIP[@]}" install -q -r "$WORK/requirements.txt" triton IPython \
  "transformers==$TRANSFORMERS_VERSION" "torchvision==$TORCHVISION_VERSION" \
  -c "$WORK/constraints.txt"

install_boot_hook
if ! already_installed; then
  echo "install_sglang_cpu: sglang does not import after the install:" >&2
  "$PY" -c "import sglang, sglang.srt.configs" >&2 || true
  exit 1
fi
"$PY" - <<'EOF'
from importlib.metadata import version
print("install_sglang_cpu: " + ", ".join(f"{p} {version(p)}" for p in ("sglang", "torch", "transformers", "torchvision", "triton")))
EOF
echo "install_sglang_cpu: took $(( $(date +%s) - start )) s"
