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

The CUDA backend (csrc/cuda/*.cu, csrc/cuda/*.cpp) is built, with
UCE_FAST_WITH_CUDA defined, when torch.version.cuda is set, nvcc is found
(torch.utils.cpp_extension.CUDA_HOME) and the sources exist; otherwise a
CPU-only extension is built.
"""

import glob
import os
import re

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


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
    want_cuda = (
        torch.version.cuda is not None
        and CUDA_HOME is not None
        and os.environ.get("UCE_FAST_SKIP_CUDA_BUILD", "0") != "1"
        and len(cuda_sources) > 0
    )

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
