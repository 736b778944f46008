"""Build script for the compiled part of uce_fast (`uce_fast._C`).

Package metadata lives in pyproject.toml; this file only declares the
extension module. Build with

    pip install --no-build-isolation --no-deps -e .

(`--no-build-isolation` so the extension is compiled against the torch that
is already installed.)

Environment switches:

    UCE_FAST_SKIP_CUDA_BUILD=1   build the CPU kernels only, even when torch
                                 has CUDA and nvcc is available.
    UCE_FAST_CUDA_ARCHS="80;90"  compute capabilities to generate SASS for
                                 (semicolon/comma separated, default "80;90";
                                 a trailing "+PTX" on an entry also embeds
                                 PTX for it).
    MAX_JOBS=N                   parallel compile jobs (read by torch's ninja
                                 build).

    CUDA_HOME=/path/to/cuda     the CUDA toolkit (bin/nvcc, include/); found
                                 from the nvcc on PATH when unset, also when
                                 that nvcc is a wrapper script outside the
                                 toolkit.

The CUDA backend (csrc/cuda/*.cu, csrc/cuda/*.cpp) is built, with
UCE_FAST_WITH_CUDA defined, when torch.version.cuda is set and a CUDA toolkit
is found; otherwise a CPU-only extension is built. A toolkit that is named
(CUDA_HOME) or found but lacks the CUDA runtime headers stops the build with
a message saying what to set.
"""

import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

import torch
from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _has_cuda_headers(root):
    return any(os.path.isfile(os.path.join(root, sub, "cuda_runtime.h"))
               for sub in ("include", os.path.join("targets", "x86_64-linux", "include"),
                           os.path.join("targets", "sbsa-linux", "include")))


def _nvcc_toolkit_root(nvcc):
    """The toolkit root nvcc itself uses (its ``TOP``), which differs from the folder above
    ``nvcc`` when the ``nvcc`` on PATH is a wrapper script or a link farm."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cu")
        open(src, "w").close()
        try:
            out = subprocess.run([nvcc, "--dryrun", "-c", src, "-o", src + ".o"],
                                 capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return None
    match = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    return os.path.normpath(match.group(1).strip()) if match else None


def _find_cuda_home():
    """CUDA toolkit root: $CUDA_HOME / $CUDA_PATH as given, else the toolkit of the nvcc on
    PATH, else /usr/local/cuda; None when there is no toolkit."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        guess = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if _has_cuda_headers(guess):
            return guess
        top = _nvcc_toolkit_root(nvcc)
        if top is not None:
            return top
        return guess
    if _has_cuda_headers("/usr/local/cuda"):
        return "/usr/local/cuda"
    return None


_WANT_CUDA = (torch.version.cuda is not None
              and os.environ.get("UCE_FAST_SKIP_CUDA_BUILD", "0") != "1")
if _WANT_CUDA:
    _cuda_home = _find_cuda_home()
    if _cuda_home is not None:
        if not _has_cuda_headers(_cuda_home):
            sys.exit(
                f"uce_fast: the CUDA toolkit at {_cuda_home!r} has no include/cuda_runtime.h. "
                "Set CUDA_HOME to the toolkit's root (the folder with bin/nvcc and "
                "include/cuda_runtime.h), or UCE_FAST_SKIP_CUDA_BUILD=1 to build the CPU kernels "
                "only.")
        # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
        os.environ["CUDA_HOME"] = _cuda_home

from torch.utils.cpp_extension import (  # noqa: E402  (after CUDA_HOME is settled)
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
)


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _cuda_gencode_flags():
    archs = os.environ.get("UCE_FAST_CUDA_ARCHS", "80;90")
    flags = []
    for arch in filter(None, (a.strip() for a in re.split(r"[;,\s]+", archs))):
        ptx = arch.endswith("+PTX")
        num = arch[: -len("+PTX")] if ptx else arch
        num = num.replace(".", "")
        if not num.isdigit():
            raise ValueError(f"UCE_FAST_CUDA_ARCHS: bad architecture {arch!r}")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def _extension():
    sources = ["csrc/uce_fast.cpp", *_rel(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))]
    include_dirs = [os.path.join(ROOT, "csrc")]

    # Not -ffast-math (the kernels rely on NaN/inf semantics), only:
    #  -fno-math-errno: sqrt can be a vector instruction (no errno side effect);
    #  -fno-trapping-math: lets GCC if-convert the branch-free selects (clamps,
    #    max, masks) in the tile loops into vector blends, otherwise those
    #    loops stay scalar; FP exceptions are never unmasked by torch;
    #  -ffp-contract=fast: a*b+c -> FMA in the AVX2/AVX-512 clones.
    cxx_flags = [
        "-O3",
        "-std=c++17",
        "-fno-math-errno",
        "-fno-trapping-math",
        "-ffp-contract=fast",
    ]
    if torch.backends.openmp.is_available():
        cxx_flags.append("-fopenmp")

    cuda_sources = _rel(
        glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))
        + glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp"))
    )
    want_cuda = _WANT_CUDA and CUDA_HOME is not None and len(cuda_sources) > 0
    if _WANT_CUDA and CUDA_HOME is None:
        print("uce_fast: torch is a CUDA build but no CUDA toolkit was found (nvcc, CUDA_HOME); "
              "building the CPU kernels only", file=sys.stderr)

    if want_cuda:
        return CUDAExtension(
            name="uce_fast._C",
            sources=sources + cuda_sources,
            include_dirs=include_dirs,
            define_macros=[("UCE_FAST_WITH_CUDA", "1")],
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": ["-O3", "-std=c++17", *_cuda_gencode_flags()],
            },
        )
    return CppExtension(
        name="uce_fast._C",
        sources=sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags},
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
