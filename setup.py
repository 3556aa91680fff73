"""Build h3fusion_ext._C: CPU sources always, CUDA sources when a toolkit and a CUDA torch are present.

Switches (environment):
  H3FUSION_CUDA=1|0|auto   force the CUDA kernels on (fail if impossible) or off; default auto.
  TORCH_CUDA_ARCH_LIST     the one mechanism for architectures; default "8.0+PTX;9.0a" (sm_80 and sm_90a machine code,
                           plus compute_80 PTX that newer GPUs JIT-compile, so they run the kernels too).
  H3FUSION_SKIP_EXT=1      install the Python packages only (scripts/setup.sh then builds the extension in place with
                           `setup.py build_ext --inplace`, incrementally: unchanged sources are not recompiled).
  MAX_JOBS                 parallel compile jobs (torch's own knob); default from free memory.
  H3FUSION_DEBUG=1         -O0 -g host code, -G device code.
  H3FUSION_NVCC_CCBIN=PATH nvcc's host compiler; default: $CXX when it is one word (the compiler of the .cpp files),
                           else torch's choice ($CC); set it empty for torch's choice always.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _find_cuda_home() -> str | None:
    """The toolkit root (has bin/nvcc and lib64/libcudart.so).

    torch guesses CUDA_HOME from the `nvcc` on PATH, which may be a wrapper script outside the toolkit;
    we look for the real root first so that linking finds libcudart.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = Path(nvcc).resolve()
        candidates.append(str(real.parent.parent))
        try:  # a wrapper like `exec /usr/local/cuda-13.0/bin/nvcc "$@"`
            for token in real.read_text(errors="ignore").split():
                if token.endswith("/bin/nvcc"):
                    candidates.append(str(Path(token).parent.parent))
        except OSError:
            pass
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for cand in candidates:
        if cand and (Path(cand) / "bin" / "nvcc").exists() and glob.glob(f"{cand}/lib*/libcudart.so*"):
            return cand
    return None


if os.environ.get("H3FUSION_SKIP_EXT") == "1":  # packages and entry points only; no torch needed here
    setup()
    sys.exit(0)

_mode = os.environ.get("H3FUSION_CUDA", "auto").strip().lower()
if _mode not in {"1", "0", "auto", "on", "off", "true", "false"}:
    sys.exit(f"H3FUSION_CUDA must be 1, 0 or auto, got {_mode!r}")
_want_cuda = {"1": True, "on": True, "true": True, "0": False, "off": False, "false": False}.get(_mode)

_cuda_home = _find_cuda_home()
if _cuda_home and _want_cuda is not False:
    os.environ["CUDA_HOME"] = _cuda_home  # must be set before cpp_extension is imported
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0+PTX;9.0a")

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

_torch_has_cuda = torch.version.cuda is not None
_use_cuda = bool(_cuda_home) and _torch_has_cuda and _want_cuda is not False
if _want_cuda is True and not _use_cuda:
    sys.exit(
        "H3FUSION_CUDA=1 but the CUDA kernels cannot be built: "
        f"toolkit root={_cuda_home!r}, torch.version.cuda={torch.version.cuda!r}"
    )

debug = os.environ.get("H3FUSION_DEBUG", "0") == "1"
# csrc/*.cpp: the op schemas (ops.cpp) and the argument checks shared by the CPU and CUDA code
sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
# Headers too: setuptools skips an extension whose listed files are all older than the built library, so a changed
# header must be listed to trigger a (ninja-incremental) rebuild.
depends = sorted(glob.glob("csrc/**/*.h", recursive=True) + glob.glob("csrc/**/*.cuh", recursive=True))
cxx_flags = ["-O0", "-g"] if debug else ["-O3"]
cxx_flags += ["-fopenmp"] if sys.platform != "darwin" else []  # the C++ standard is torch's choice
include_dirs = [str(ROOT / "csrc" / "include")]
define_macros: list[tuple[str, str]] = []
extra_link_args = ["-fopenmp"] if sys.platform != "darwin" else []

if _use_cuda:
    sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    define_macros.append(("H3FUSION_WITH_CUDA", "1"))
    # cuBLAS/cuSPARSE headers used by ATen/cuda/CUDAContext.h ship in the nvidia wheels torch depends on.
    for site in sys.path:
        for sub in ("nvidia/cu13/include", "nvidia/cublas/include", "nvidia/cusparse/include"):
            inc = Path(site) / sub
            if inc.is_dir():
                include_dirs.append(str(inc))
    nvcc_flags = ["-O0", "-G"] if debug else ["-O3", "-lineinfo"]
    nvcc_flags += [
        "--expt-relaxed-constexpr",
        "-U__CUDA_NO_HALF_OPERATORS__",
        "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    ]
    # nvcc's host compiler is the C++ compiler that builds the .cpp files: torch would pass the C compiler $CC
    # (-ccbin) instead, and where an image sets CC and CXX to different compilers, the .cu and .cpp objects'
    # inline copies would come from two compilers. A CXX of one word (a compiler, not "ccache g++") only.
    _ccbin = os.environ.get("H3FUSION_NVCC_CCBIN")
    if _ccbin is None:
        _cxx = os.environ.get("CXX", "").split()
        _ccbin = shutil.which(_cxx[0]) if len(_cxx) == 1 else None
    if _ccbin:
        nvcc_flags += ["-ccbin", _ccbin]
    ext = CUDAExtension(
        "h3fusion_ext._C",
        sources,
        depends=depends,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=extra_link_args,
    )
else:
    ext = CppExtension(
        "h3fusion_ext._C",
        sources,
        depends=depends,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=extra_link_args,
    )

print(
    f"[h3fusion setup] CUDA kernels: {'ON' if _use_cuda else 'OFF'} "
    f"(CUDA_HOME={_cuda_home}, torch CUDA={torch.version.cuda}, "
    f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']})",
    file=sys.stderr,
)

setup(
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension},
)
