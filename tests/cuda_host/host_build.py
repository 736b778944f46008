"""Builds the CUDA kernels of csrc/cuda as host C++ (include/cuda_host.h emulates the CUDA runtime
and intrinsics) together with host_ops.cpp into a torch extension registering
``torch.ops.uce_cuda_host.*``, with AddressSanitizer and UndefinedBehaviorSanitizer.

Each ``csrc/cuda/*.cu`` is compiled as its own translation unit through a generated one-line
wrapper, so new kernel files are picked up. The kernel units define ``__CUDA_ARCH__``, so that
common/uce_math.h takes its device branches (``__fmul_rn`` etc., emulated) as on a GPU.

The sanitized library can only be loaded into a process that has the ASan runtime preloaded
(``LD_PRELOAD=$(c++ -print-file-name=libasan.so)``); see asan_env().
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
NAME = "uce_cuda_host"

SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
            "-fno-omit-frame-pointer"]
CFLAGS = ["-std=c++20", "-O1", "-g", "-ffp-contract=off", "-Wno-unknown-pragmas", *SANITIZE]
# ASan in a Python process that was not built with it: leaks are Python's own; torch's
# allocations pair new/delete across libraries that ASan cannot see both sides of.
ASAN_OPTIONS = ("detect_leaks=0:alloc_dealloc_mismatch=0:detect_odr_violation=0:"
                "handle_abort=1:halt_on_error=1")
UBSAN_OPTIONS = "print_stacktrace=1:halt_on_error=1"


def compiler() -> str | None:
    """The C++ compiler torch's extension builder uses, or None if there is none."""
    cxx = os.environ.get("CXX", "c++")
    return shutil.which(cxx)


def _library(name: str) -> str | None:
    cxx = compiler()
    if cxx is None:
        return None
    out = subprocess.run([cxx, f"-print-file-name={name}"], capture_output=True, text=True)
    path = out.stdout.strip()
    return path if out.returncode == 0 and os.path.isabs(path) and os.path.exists(path) else None


def asan_runtime() -> str | None:
    """Path of the compiler's ASan runtime library, or None."""
    return _library("libasan.so")


def asan_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` with the ASan runtime preloaded and the sanitizer options set. libstdc++ is
    preloaded after it: ASan resolves the real ``__cxa_throw`` when it starts, and the Python
    executable does not link libstdc++ (without it the first C++ exception aborts)."""
    runtime, cxxlib = asan_runtime(), _library("libstdc++.so")
    if runtime is None or cxxlib is None:
        raise RuntimeError("the C++ compiler has no libasan.so / libstdc++.so")
    return {**env, "LD_PRELOAD": f"{runtime} {cxxlib}", "ASAN_OPTIONS": ASAN_OPTIONS,
            "UBSAN_OPTIONS": UBSAN_OPTIONS}


def _sources(build_dir: Path) -> list[str]:
    sources = [str(HERE / "host_ops.cpp")]
    for cu in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
        wrapper = build_dir / f"{cu.stem}_cu.cpp"
        text = (f"// Generated: {cu.relative_to(ROOT)} as host C++.\n"
                f"#define __CUDA_ARCH__ 900\n#include \"cuda/{cu.name}\"\n")
        if not wrapper.exists() or wrapper.read_text() != text:
            wrapper.write_text(text)
        sources.append(str(wrapper))
    return sources


def build(build_dir: str | os.PathLike, *, verbose: bool = False) -> tuple[str, float]:
    """Builds (or brings up to date) the extension in ``build_dir`` and loads it into this
    process; returns the library's path and the seconds the build took."""
    from torch.utils import cpp_extension

    build_dir = Path(build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    # The compilers must not inherit a preloaded ASan runtime.
    saved = os.environ.pop("LD_PRELOAD", None)
    os.environ.setdefault("MAX_JOBS", "2")
    start = time.perf_counter()
    try:
        cpp_extension.load(
            name=NAME,
            sources=_sources(build_dir),
            extra_include_paths=[str(HERE / "include"), str(ROOT / "csrc")],
            extra_cflags=CFLAGS,
            extra_ldflags=SANITIZE,
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=verbose,
        )
    finally:
        if saved is not None:
            os.environ["LD_PRELOAD"] = saved
    return str(build_dir / f"{NAME}.so"), time.perf_counter() - start
