#!/usr/bin/env python
"""Ahead-of-time compile check of the Triton kernels: the variants their launchers choose,
compiled to cubin for sm_80 and sm_90 with the installed Triton and its bundled ptxas (no GPU).

Usage::

    python scripts/triton_compile_check.py [--archs 80,90] [--jobs N] [--out DIR]
        [--full] [--kernels K1,K2] [--cache-dir DIR] [--list]

Exit status 1 on a compile error, on a spill where a kernel's design says it must not spill
(defined below), or when the sweep no longer reaches every kernel launch and every line of the
launchers; 2 on bad usage. Tables (CSV, JSON, Markdown) of every variant per arch (kernel,
constexprs, pointer dtypes and alignment, integer specialisations, registers, spill stores/loads
and where their code is, stack frame, shared memory) go to ``--out``; the summary gives, per
kernel, path and arch, the registers (min/median/max) and the spilling variants.

Finding the launches
--------------------
Nothing here lists kernels or tile sizes. The launchers of ``uce_fast/triton/ops.py`` (the
implementations of its ``torch.library`` custom ops) run on ``meta`` tensors (shapes, dtypes,
strides and storage offsets, no memory: any size costs nothing) with every ``@triton.jit`` kernel
of the kernel modules replaced by a recorder that keeps the launch (arguments, constexpr
keywords, ``num_warps``, compile options such as ``enable_fp_fusion``) instead of launching. The
launchers' device check (CUDA, or CPU under the interpreter) is patched to accept meta tensors
and reading the one-word bad-label flag (``Tensor.item`` of a meta tensor) gives 0, as it does
for valid labels. The backward launcher is called through the forward op's registered autograd
formula, on the outputs of the forward op's fake kernel. No kernel runs.

Each launch is then specialised by the installed Triton's own JIT: ``JITFunction.run`` with a
stand-in driver that reports the target GPU and ``_do_compile`` intercepted. The signature, the
integer specialisations (value 1, divisibility by 16, i32 or i64), pointer dtypes and 16-byte
alignment (a meta tensor's ``data_ptr`` is its storage offset in bytes: an allocation is aligned,
a view at an offset such as ``norm[1]`` may not be), constexprs and parsed options are exactly
what the JIT on a GPU compiles for those arguments; the JIT's cache key (per target) identifies a
variant, and launches with the same key are compiled once. Each variant is compiled the way the
JIT compiles it (``triton.compile`` of an ``ASTSource``), in a process pool, with the ptxas log
captured for registers and spills.

The sweep, and why it cannot miss a launcher path
-------------------------------------------------
* Class counts and sample counts are not a hand list of thresholds: a scan runs each launcher
  for every C in [1, ``C_SCAN``] (every β, S and count in [0, ``BETA_SCAN``] = [0, 256] /
  [0, ``COUNT_SCAN``] per group of C) and groups the values by the launches they produce. Values
  giving the same tile configuration (constexprs) form a tile group; values that differ only in
  the integer specialisation (C = 1, C or β divisible by 16, S = 1, count = 1, ...) form further
  groups. One value per group is kept: a practical one (19, 150, β = 10, ...) where the group has
  one, else its smallest. A new threshold in the config functions gives a new group.
* Every other input of the launchers is an axis of the sweep: input and sample dtypes, class
  weight, label smoothing, entropy maximisation (OoD pixels or none), checked or unchecked
  labels, sigma given or samples, resampling, a state (count > 0) or none, want_probs /
  want_entropy, ``wide=`` (forced int64 in-tile offsets) and ``chunk_c=`` (a forced class
  chunk); and the shapes: N a multiple of 16 (B = 2), N odd (B = 3, so B·N, B·C·N and the views
  at those offsets are odd too), N = 1 (no spatial dims), stacks beyond 2^31 elements (int64
  strides, natural WIDE for large C), resampling along one dim only, nothing to do.
* Two checks make a sweep that no longer covers the launchers fail: every kernel launch site in
  ops.py must be reached, and every statement of ops.py that the launchers execute must have
  run (error paths excepted: a ``raise``, or a call of a function that always raises). A new
  branch in a launcher fails the check until the sweep reaches it.

What is compiled
----------------
``--full`` crosses every tile configuration with every dtype and both N classes (every pair of
input and sample dtype at a small and a large C), every flag combination, every further
specialisation and the int64/one-pixel shapes. The default (CI) sweep, ~290 variants per arch,
keeps every tile group and every further specialisation group, and restricts the crossing; what
it leaves out is never a tile configuration, only combinations of them with settings other tile
configurations of the same kernel are compiled with:

* each tile configuration in two settings: float32 with N a multiple of 16 and bfloat16 with N
  odd (the widest loads, vectorised; 16-bit loads, scalar); float16 and the mixed dtype pairs at
  a practical small and large C. Class-chunked tiles other than the practical β / S get the
  first setting only; N = 1 with every class-count group;
* for the streaming-statistics kernels, the state / no state, samples / no samples and
  resampling / none rows vary one axis at a time from the practical row (state, samples,
  resampling), each row in both settings;
* flags (weight, smoothing, want_probs, want_entropy) in every combination at the practical
  small C, all off at the practical large C; OoD pixels (which select the smoothing variants:
  no compile of their own unless those change) without smoothing at the practical small and
  large C, and with a forced class chunk; unchecked labels, forced int64 offsets and int64
  strides at the practical small and large C; forced class chunks at the practical small C;
* integer specialisation groups of β, S and count at the practical small C only;
* runtime values (alpha, ignore_index, ood_index, ood_scale, correction, align_corners) once:
  floats are never specialised by the JIT and the others do not change which variant is
  chosen.

Provably redundant compiles are dropped by construction: launches with the same JIT key are one
compile. No tile is sized by β or S (the class-chunked kernels keep per-sample normalisers in
memory), so the scans find one tile group of them per C and only their integer specialisations
(S = 1, divisible by 16) add variants.

Register-path variants and spills
---------------------------------
A variant is a register-path variant when its tile configuration (its constexprs but the offset
width ``WIDE``) is one the launchers choose for some C <= ``_SMALL_C_MAX`` (128) without a forced
class chunk: all classes of the pixel tile are in registers (the small-C forward,
``mc_accumulate`` and ``mc_reduce`` with all classes, the backward with its chunk of at most 64
classes and no state across chunks). The others are class-chunked variants (reached only with
C > 128 or a forced chunk: the chunked CE forward, ``mc_accumulate_chunked``,
``mc_reduce_chunked``); their registers hold one class chunk and per-pixel vectors, whatever β.

What the designs forbid, and so what fails: a spill of more than ``SPILL_ALLOWANCE`` bytes per
thread anywhere; on the register path, spill code inside any loop (local-memory traffic per
sample or per class chunk: the tile does not fit in registers); on the class-chunked path, spill
code inside an innermost loop (the loops that stream a sample's class chunk). What they allow,
reported as a note: a few words that ptxas keeps in local memory across the loops (a saved
predicate word, an address of the final stores), one store and one load per thread, or per class
chunk around the sample loop of a chunked kernel. ptxas chooses those to stay at an occupancy step
(64, 72, 80, 96, 128 or 168 registers): with ``.maxnreg 255`` they go away, at 30 to 80 more
registers per thread (72 -> 156 for one ``mc_reduce`` variant), so they are the cheaper side of
its trade, not a tile that does not fit. ``--strict-spills`` fails those too. The loop test
reads the disassembly (the nvdisasm bundled with Triton): a loop is the code from a label to a
branch back to it. A tile that does not fit is caught: 32 classes x 128 pixels with resampling
spills 3.3 KB per thread, 871 of its 1113 local-memory instructions inside the sample loop.

``TRITON_CACHE_DIR`` defaults to a fresh temporary directory and every variant is compiled even
if a cache holds it (a cache hit would skip ptxas and its report); ``--cache-dir`` keeps the
compiled kernels.
"""

from __future__ import annotations

import argparse
import ast
import collections
import concurrent.futures as cf
import contextlib
import csv
import importlib
import io
import itertools
import json
import multiprocessing as mp
import os
import re
import shutil
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Triton's interpreter replaces @triton.jit by Python functions: this check needs the compiler.
os.environ.pop("TRITON_INTERPRET", None)

# ------------------------------------------------------------------------------------ options

#: Class counts scanned for config groups: well past every power of two up to the register-path
#: bound, and up to 1000-class problems.
C_SCAN = 1100
#: Sample counts scanned: β = 256 and everything below, so that a sample count that changed a tile
#: configuration (a register tile sized by β) would show up as a tile group of its own.
BETA_SCAN = 256
#: State counts scanned (count of samples already folded in).
COUNT_SCAN = 40
#: Preferred representatives of a group of class counts (Cityscapes, VOC, ADE20K, ImageNet-1k,
#: binary), then of sample counts (the paper's β = 10 and 6).
PRACTICAL_C = (19, 21, 150, 1000, 2)
PRACTICAL_BETA = (10, 6, 2, 1)
#: (ood_index, ood_scale) of the U-CE ops with OoD pixels (a label outside [0, C) for every
#: scanned C) and without them (ood_index = ignore_index = -100).
OOD_ON = (-1, 9.0)
OOD_OFF = (-100, 0.0)

_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_SASS_LABEL = re.compile(r"^\s*([.\w]+):\s*$")
_SASS_BRANCH = re.compile(r"\bBRA(?:\.\w+)*\s+`?\(?([.\w]+)")
_SASS_LOCAL = re.compile(r"\b(?:STL|LDL)(?:\.\w+)*\s")
_PTXAS_SPILL = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", default="80,90",
                   help="comma-separated compute capabilities (default: 80,90)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                   help="parallel compiles (default: number of CPUs)")
    p.add_argument("--out", default="build/triton-compile-check",
                   help="directory for the CSV/JSON/Markdown tables")
    p.add_argument("--cache-dir", default=None,
                   help="TRITON_CACHE_DIR for the compiles (default: a fresh temporary directory)")
    p.add_argument("--full", action="store_true",
                   help="cross every tile configuration with every dtype, shape and flag "
                        "(far beyond the CI budget)")
    p.add_argument("--kernels", default=None,
                   help="comma-separated kernel names: compile only these (default: all)")
    p.add_argument("--strict-spills", action="store_true",
                   help="fail on any spill of a register-path variant, even outside the loops")
    p.add_argument("--list", action="store_true",
                   help="enumerate and print the variants, compile nothing")
    args = p.parse_args(argv)
    try:
        args.archs = [int(a) for a in args.archs.split(",") if a.strip()]
    except ValueError:
        p.error(f"--archs must be comma-separated integers, got {args.archs!r}")
    if not args.archs or args.jobs < 1:
        p.error("need at least one arch and --jobs >= 1")
    return args


# ------------------------------------------------------------------------ recording launches


class Launch:
    """One recorded kernel launch: the kernel, its arguments and the sweep point it came from."""

    __slots__ = ("args", "fn", "kwargs", "point")

    def __init__(self, fn, args, kwargs, point):
        self.fn, self.args, self.kwargs, self.point = fn, args, kwargs, point


class _Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` records."""

    def __init__(self, fn, sink):
        self.fn, self.sink = fn, sink

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.sink.record(self.fn, args, kwargs)
        return launch


class Session:
    """The launchers of ``uce_fast.triton.ops`` with their kernels replaced by recorders."""

    def __init__(self):
        import torch
        from triton.runtime.jit import JITFunction

        self.torch = torch
        self.ops = importlib.import_module("uce_fast.triton.ops")
        self.opglue = importlib.import_module("uce_fast._opglue")
        # Kernel modules: the uce_fast.triton modules ops.py uses; kernels: their JITFunctions.
        self.modules = {name: m for name, m in vars(self.ops).items()
                        if isinstance(m, types.ModuleType)
                        and m.__name__.startswith("uce_fast.triton.")}
        self.kernels = {}  # (module attr name, kernel name) -> JITFunction
        for mname, m in self.modules.items():
            for kname, v in vars(m).items():
                if isinstance(v, JITFunction):
                    self.kernels[(mname, kname)] = v
        self.launch_sites = self._launch_sites()
        # The custom ops and the functions implementing them (the launchers).
        self.launchers = {}
        for v in vars(self.ops).values():
            fn = getattr(v, "_init_fn", None)
            if type(v).__name__ == "CustomOpDef" and callable(fn):
                self.launchers[fn.__name__] = fn
        self.launches: list[Launch] = []
        self.point: dict = {}

    def _launch_sites(self) -> dict[str, set[str]]:
        """Kernel launches ``module.kernel[grid](...)`` in ops.py, by launching function."""
        tree = ast.parse(Path(self.ops.__file__).read_text())
        sites = collections.defaultdict(set)
        for func in ast.walk(tree):
            if not isinstance(func, ast.FunctionDef):
                continue
            for node in ast.walk(func):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript)
                        and isinstance(node.func.value, ast.Attribute)
                        and isinstance(node.func.value.value, ast.Name)
                        and (node.func.value.value.id, node.func.value.attr) in self.kernels):
                    sites[node.func.value.attr].add(func.name)
        return sites

    def record(self, fn, args, kwargs):
        self.launches.append(Launch(fn, args, kwargs, dict(self.point)))

    @contextlib.contextmanager
    def recording(self):
        """Kernels replaced by recorders, the device check relaxed to accept meta tensors, and
        ``Tensor.item`` of a meta tensor (the bad-label flag) reading 0."""
        torch, ops = self.torch, self.ops
        saved_kernels = {key: getattr(self.modules[key[0]], key[1]) for key in self.kernels}
        check_device = ops._check_device
        item = torch.Tensor.item

        def meta_ok(t, name, *a, **k):
            if t.device.type != "meta":
                check_device(t, name, *a, **k)

        def meta_item(t):
            return 0 if t.device.type == "meta" else item(t)

        try:
            for (mname, kname), fn in self.kernels.items():
                setattr(self.modules[mname], kname, _Recorder(fn, self))
            ops._check_device = meta_ok
            torch.Tensor.item = meta_item
            yield
        finally:
            for (mname, kname), fn in saved_kernels.items():
                setattr(self.modules[mname], kname, fn)
            ops._check_device = check_device
            torch.Tensor.item = item

    def call(self, launcher: str, point: dict, *args, **kwargs):
        """Runs a launcher under ``recording()``; its launches are tagged with ``point``."""
        self.point = dict(point, launcher=launcher)
        try:
            return self.launchers[launcher](*args, **kwargs)
        finally:
            self.point = {}


# ------------------------------------------------------------------------ line coverage


class LineCoverage:
    """Lines of one source file executed while active (``sys.settrace``)."""

    def __init__(self, path: str):
        self.path = path
        self.lines: set[int] = set()
        self.functions: set[str] = set()

    def _trace(self, frame, event, arg):
        if frame.f_code.co_filename != self.path:
            return None
        if event == "call":
            self.functions.add(frame.f_code.co_name)
        self.lines.add(frame.f_lineno)
        return self._trace

    @contextlib.contextmanager
    def active(self):
        previous = sys.gettrace()
        sys.settrace(self._trace)
        try:
            yield
        finally:
            sys.settrace(previous)


def _always_raises(func: ast.FunctionDef) -> bool:
    return bool(func.body) and isinstance(func.body[-1], ast.Raise)


def _required_lines(path: str, functions: set[str]) -> dict[int, tuple[str, range]]:
    """Statements of the given functions (and methods of those names) that a sweep must execute,
    as {first line: (function, lines whose execution counts)}: all but error paths. An error
    statement is a ``raise`` or a call of a function of the file that always raises; a block of
    only error statements is an error path. A simple statement counts as executed when any of
    its lines ran (a multi-line expression may start below its first line); a compound one when
    its header (up to its body) ran."""
    tree = ast.parse(Path(path).read_text())
    raising = {f.name for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
               and _always_raises(f)}

    def is_error(stmt):
        if isinstance(stmt, ast.Raise):
            return True
        return (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call)
                and isinstance(stmt.value.func, ast.Name) and stmt.value.func.id in raising)

    required = {}

    def visit_block(stmts, owner):
        if stmts and all(is_error(s) for s in stmts):
            return
        for s in stmts:
            if is_error(s) or isinstance(s, (ast.FunctionDef, ast.ClassDef)):
                continue
            if isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant):
                continue  # docstring
            body = getattr(s, "body", None)
            compound = isinstance(body, list) and body and isinstance(body[0], ast.stmt)
            end = body[0].lineno - 1 if compound else s.end_lineno
            required[s.lineno] = (owner, range(s.lineno, max(end, s.lineno) + 1))
            for field in ("body", "orelse", "finalbody"):
                block = getattr(s, field, None)
                if isinstance(block, list) and block and isinstance(block[0], ast.stmt):
                    visit_block(block, owner)
            for handler in getattr(s, "handlers", []):
                visit_block(handler.body, owner)

    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name in functions:
            visit_block(node.body, node.name)
    return required


# ------------------------------------------------------------------------ JIT specialisation


class _TargetDriver:
    """What the JIT asks the active driver, answered for a target GPU that is not present."""

    def __init__(self, target, device):
        self.target, self.device = target, device

    def get_current_device(self):
        return self.device

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


class Specialiser:
    """The installed Triton's JIT specialisation of recorded launches, per target: its own
    ``JITFunction.run`` up to the point where it would compile (``_do_compile`` intercepted)."""

    def __init__(self, kernels):
        self.kernels = list(kernels)

    @contextlib.contextmanager
    def target(self, arch: int):
        from triton.backends.compiler import GPUTarget
        from triton.runtime.driver import driver

        previous = driver._active
        driver.set_active(_TargetDriver(GPUTarget("cuda", arch, 32), f"compile-check:sm_{arch}"))
        self.captured = None

        def capture(key, signature, device, constexprs, options, attrs, warmup):
            self.captured = (key, signature, constexprs, options, attrs)

        try:
            for fn in self.kernels:
                fn._do_compile = capture
            yield
        finally:
            for fn in self.kernels:
                fn.__dict__.pop("_do_compile", None)
            driver._active = previous

    def __call__(self, launch: Launch):
        """(JIT cache key, signature, constexprs, options, attrs) of ``launch`` for the current
        target (inside ``target()``)."""
        self.captured = None
        launch.fn.run(*launch.args, grid=(1,), warmup=True, **launch.kwargs)
        if self.captured is None:
            raise RuntimeError(f"the JIT did not reach compilation for {launch.fn.__name__}")
        return self.captured


# ------------------------------------------------------------------------ the sweep

#: Per-pixel problems (B, spatial): N a multiple of 16; N odd with B odd (so B·N, B·C·N and the
#: views at those offsets are odd too); no spatial dims (N = 1); nothing to do (no launch).
PIXEL_SHAPES = {"n16": (2, (64, 64)), "odd": (3, (37, 41)), "n1": (2, ()), "empty": (0, (64, 64))}
#: Monte-Carlo problems (B, samples' (h, w), output (h, w)); without resampling the samples are
#: read at the output size.
MC_SHAPES = {"n16": (2, (32, 32), (64, 64)), "odd": (3, (19, 21), (37, 41)),
             "rows": (2, (32, 64), (64, 64)), "empty": (0, (32, 32), (64, 64))}
#: The output size of the "beyond 2^31 elements" problems (B chosen per C).
BIG_HW = (1024, 2048)


def _big_batch(C: int, plane: int) -> int:
    """A batch with B·C·plane >= 2^31: int64 strides between samples."""
    return -(-(2**31) // (C * plane)) + 1


class Sweep:
    """Runs the launchers over the sweep (``plan``); the session collects the launches."""

    def __init__(self, session: Session, spec: Specialiser, scan_arch: int):
        self.found: dict = {}
        self.smallest: dict = {}
        self.full = False
        self.s = session
        self.spec = spec
        self.scan_arch = scan_arch
        self.torch = session.torch
        self.dtypes = tuple(session.ops._FLOAT)
        self.small_c_max = session.ops._SMALL_C_MAX

    # -------------------------------------------------------------- tensors and calls

    def meta(self, *shape, dtype=None):
        return self.torch.empty(shape, device="meta", dtype=dtype or self.torch.float32)

    def forward(self, p: dict):
        t = self.torch
        C, beta, B, N = p["C"], p["beta"], p["B"], p["N"]
        return self.s.call(
            "_forward", p, input=self.meta(B, C, N, dtype=p["input"]),
            target=self.meta(B, N, dtype=t.int64),
            samples=None if beta is None else self.meta(beta, B, C, N, dtype=p["samples"]),
            sigma=self.meta(B, N) if beta is None else None,
            weight=self.meta(C) if p["weight"] else None, alpha=p.get("alpha", 3.0),
            ignore_index=-100, label_smoothing=0.1 if p["smooth"] else 0.0, correction=1,
            check_labels=p.get("check", True), **self._ood(p), chunk_c=p["chunk_c"],
            wide=p["wide"])

    @staticmethod
    def _ood(p: dict) -> dict:
        """The U-CE ops' ood_index and ood_scale at point ``p``."""
        ood_index, ood_scale = OOD_ON if p.get("ood") else OOD_OFF
        return dict(ood_index=ood_index, ood_scale=ood_scale)

    def backward(self, p: dict):
        """The backward launcher called as the forward op's autograd formula calls it, on the
        forward's outputs (from the op's fake kernel: no forward launch)."""
        ops, t = self.s.ops, self.torch
        C, B, N = p["C"], p["B"], p["N"]
        fwd_op = next(v for v in vars(ops).values()
                      if getattr(v, "_init_fn", None) is self.s.launchers["_forward"])
        inputs = (self.meta(B, C, N, dtype=p["input"]), self.meta(B, N, dtype=t.int64), None,
                  self.meta(B, N), self.meta(C) if p["weight"] else None, 3.0, -100,
                  0.1 if p["smooth"] else 0.0, 1, False, *self._ood(p).values())
        outputs = fwd_op._abstract_fn(*inputs)
        ctx = types.SimpleNamespace(needs_input_grad=(True,) + (False,) * (len(inputs) - 1))
        ctx.save_for_backward = lambda *ts: setattr(ctx, "saved_tensors", ts)
        fwd_op._setup_context_fn(ctx, inputs, outputs)
        formula = self.s.opglue.uce_backward_formula(
            lambda *a: self.s.call("_backward", p, *a, wide=p["wide"]))
        return formula(ctx, self.meta(B, N), None, None)

    def _mc_sizes(self, p):
        B, (ih, iw), (oh, ow) = p["B"], p["in_hw"], p["out_hw"]
        if not p["resample"]:
            ih, iw = oh, ow
        return B, ih, iw, oh, ow

    def accumulate(self, p: dict):
        C, S, count = p["C"], p["S"], p["count"]
        B, ih, iw, oh, ow = self._mc_sizes(p)
        N = oh * ow
        return self.s.call(
            "_mc_accumulate", p, mean=self.meta(B, C, N), m2=self.meta(B, C, N),
            entropy=self.meta(B, N), samples=self.meta(S, B, C, ih * iw, dtype=p["samples"]),
            count=count, in_h=ih, in_w=iw, out_h=oh, out_w=ow,
            align_corners=p.get("align_corners", False), chunk_c=p["chunk_c"], wide=p["wide"])

    def reduce(self, p: dict):
        C, S, count = p["C"], p["S"], p["count"]
        B, ih, iw, oh, ow = self._mc_sizes(p)
        N = oh * ow
        state = ((self.meta(B, C, N), self.meta(B, C, N), self.meta(B, N)) if count > 0
                 else (None, None, None))
        return self.s.call(
            "_mc_reduce", p,
            samples=self.meta(S, B, C, ih * iw, dtype=p["samples"]) if S else None,
            mean=state[0], m2=state[1], entropy=state[2], count=count, in_h=ih, in_w=iw,
            out_h=oh, out_w=ow, align_corners=p.get("align_corners", False), correction=1,
            want_probs=p["probs"], want_entropy=p["entropy"], chunk_c=p["chunk_c"],
            wide=p["wide"])

    # -------------------------------------------------------------- config groups

    def _recorded_keys(self) -> tuple[tuple, tuple]:
        """(constexpr key, JIT key) of the launches recorded since the last call, at the scan
        arch: the tile configuration the launchers chose, and the full specialisation."""
        tiles, full = [], []
        for launch in self.s.launches:
            key, _, constexprs, _, _ = self.spec(launch)
            fn = launch.fn
            declared = sorted((fn.arg_names[path[0]], v) for path, v in constexprs.items()
                              if fn.params[path[0]].is_constexpr)
            tiles.append((fn.__name__, tuple(declared)))
            full.append((fn.__name__, key))
        self.s.launches.clear()
        return tuple(tiles), tuple(full)

    def scan(self, name: str, values, run, practical=()) -> tuple[list, list]:
        """Runs ``run(value)`` for every value and groups the values by what the launchers
        made of them: (one value per tile configuration, one value per further integer
        specialisation). Representatives are practical values where a group has one, else its
        smallest value."""
        by_tile: dict[tuple, list] = {}
        by_key: dict[tuple, list] = {}
        for v in values:
            run(v)
            tile, full = self._recorded_keys()
            by_tile.setdefault(tile, []).append(v)
            by_key.setdefault(full, []).append(v)
        tile_reps = sorted(self.pick(g, practical) for g in by_tile.values())
        spec_reps = sorted(self.pick(g, practical) for g in by_key.values()
                           if not set(g) & set(tile_reps))
        for g in by_tile.values():
            self.smallest[(name, self.pick(g, practical))] = min(g)
        self.found[name] = (tile_reps, spec_reps)
        return tile_reps, spec_reps

    def register_group(self, name: str, c: int) -> bool:
        """Whether the tile group of class count ``c`` (found by the scan ``name``) holds a
        C <= ``_SMALL_C_MAX``: a register-path tile, compiled in both settings."""
        return self.smallest[(name, c)] <= self.small_c_max

    @staticmethod
    def pick(group: list, practical=()) -> object:
        for v in practical:
            if v in group:
                return v
        return min(group)

    # -------------------------------------------------------------- points

    def pixel_point(self, shape: str, **p) -> dict:
        if shape == "big":
            N = BIG_HW[0] * BIG_HW[1]
            B = _big_batch(p["C"], N)
        else:
            B, spatial = PIXEL_SHAPES[shape]
            N = 1
            for d in spatial:
                N *= d
        return dict(p, shape=shape, B=B, N=N)

    def mc_point(self, shape: str, **p) -> dict:
        if shape == "big":
            in_hw = (BIG_HW[0] // 4, BIG_HW[1] // 4) if p["resample"] else BIG_HW
            B = _big_batch(p["C"], in_hw[0] * in_hw[1])
            return dict(p, shape=shape, B=B, in_hw=in_hw, out_hw=BIG_HW)
        B, in_hw, out_hw = MC_SHAPES[shape]
        return dict(p, shape=shape, B=B, in_hw=in_hw, out_hw=out_hw)

    # -------------------------------------------------------------- the plan

    def settings(self, both: bool = True) -> list[tuple]:
        """(dtype, shape) pairs a tile configuration is compiled with: every pair with
        ``full``; else float32 with N a multiple of 16 and, if ``both``, bfloat16 with N odd."""
        f32, bf16 = self.torch.float32, self.torch.bfloat16
        if self.full:
            return list(itertools.product(self.dtypes, ("n16", "odd")))
        return [(f32, "n16"), (bf16, "odd")] if both else [(f32, "n16")]

    def plan(self, full: bool = False) -> list[tuple[str, dict]]:
        """Scans the launchers for their config groups (inside ``Specialiser.target``), then
        returns the sweep as (method, point) pairs."""
        self.full = full
        self.found = {}
        out: list[tuple[str, dict]] = []
        self._plan_forward(out)
        self._plan_backward(out)
        self._plan_accumulate(out)
        self._plan_reduce(out)
        return out

    def _rows(self, *axes) -> list[tuple]:
        """Rows over the axes: their product with ``full``; else the first row (every axis at
        its first value) and one row per further value of each axis, the others at their first
        value."""
        if self.full:
            return list(itertools.product(*axes))
        first = tuple(a[0] for a in axes)
        rows = [first]
        for i, a in enumerate(axes):
            rows += [(*first[:i], v, *first[i + 1:]) for v in a[1:]]
        return rows

    def _ordered(self, values: list, practical) -> list:
        """``values`` with the first practical one first."""
        head = [v for v in practical if v in values][:1]
        return head + [v for v in values if v not in head]

    def _practical_pair(self, c_tiles) -> tuple[int, int]:
        """A practical register-path C and a practical class-chunked C from the groups."""
        lim = self.small_c_max
        small = next((c for c in PRACTICAL_C if c <= lim and c in c_tiles), c_tiles[0])
        large = next((c for c in PRACTICAL_C if c > lim and c in c_tiles), c_tiles[-1])
        return small, large

    def _forced_chunks(self) -> list[int]:
        """A class chunk forced through ``chunk_c``, below the default one (as the tests do)."""
        return [max(1, self.s.ops._CHUNK_C // 4)]

    def _plan_forward(self, out):
        f32, f16, bf16 = self.torch.float32, self.torch.float16, self.torch.bfloat16

        def fwd(**p):
            base = dict(C=19, beta=None, input=f32, samples=f32, weight=True, smooth=True,
                        ood=False, check=True, chunk_c=None, wide=False)
            base.update(p)
            return ("forward", self.pixel_point(base.pop("shape", "n16"), **base))

        c_tiles, c_specs = self.scan(
            "forward C", range(1, C_SCAN + 1),
            lambda c: (self.forward(fwd(C=c)[1]), self.forward(fwd(C=c, beta=2)[1])),
            PRACTICAL_C)
        small, large = self._practical_pair(c_tiles)
        for c in c_tiles:
            b_tiles, b_specs = self.scan(
                f"forward beta (C={c})", range(2, BETA_SCAN + 1),
                lambda b, c=c: self.forward(fwd(C=c, beta=b)[1]), PRACTICAL_BETA)
            b_tiles = self._ordered(b_tiles, PRACTICAL_BETA)
            # Every tile configuration: sigma given, or each group of β. Register paths and the
            # practical β in both settings.
            register = self.register_group("forward C", c)
            for i, beta in enumerate([None, *b_tiles]):
                for dt, shape in self.settings(both=register or i <= 1):
                    out.append(fwd(C=c, beta=beta, input=dt, samples=dt, shape=shape))
            # Further specialisations of β (divisible by 16, ...).
            if self.full or c == small:
                out += [fwd(C=c, beta=b) for b in b_specs]
        # Further specialisations of C (C = 1, divisible by 16, ...).
        out += [fwd(C=c, beta=b) for c in c_specs for b in (10, None)[:2 if self.full else 1]]
        # Flags and dtype pairs.
        for c, beta in itertools.product((small, large), (10, None)):
            for w, sm in itertools.product((True, False), repeat=2):
                if self.full or c == small or not (w or sm):
                    out.append(fwd(C=c, beta=beta, weight=w, smooth=sm))
            # OoD pixels: the smoothing variants, chosen for them without label smoothing.
            out += [fwd(C=c, beta=beta, weight=w, smooth=False, ood=True)
                    for w in ((True, False) if self.full or c == small else (False,))]
        pairs = list(itertools.product(self.dtypes, self.dtypes))
        out += [fwd(C=small, beta=10, input=a, samples=b) for a, b in pairs]
        out += [fwd(C=large, beta=10, input=a, samples=b)
                for a, b in (pairs if self.full else [(f16, f16), (bf16, f32)])]
        out += [fwd(C=c, input=f16) for c in (small, large)]
        # Unchecked labels (no flag).
        out += [fwd(C=c, beta=beta, check=False)
                for c, beta in itertools.product(c_tiles if self.full else (small, large),
                                                 (10, None))]
        # int64 offsets (forced, and natural beyond 2^31 elements), one pixel, forced chunks.
        for c, beta in itertools.product(c_tiles if self.full else (small, large), (10, None)):
            out += [fwd(C=c, beta=beta, wide=True), fwd(C=c, beta=beta, shape="big")]
        out += [fwd(C=c, beta=beta, shape="n1")
                for c, beta in itertools.product(c_tiles, (10, None))]
        for chunk, beta in itertools.product(self._forced_chunks(), (None, 2, 10)):
            out.append(fwd(C=small, beta=beta, chunk_c=chunk))
            out.append(fwd(C=small, beta=beta, chunk_c=chunk, smooth=False, ood=True))
        out.append(fwd(shape="empty"))
        out.append(fwd(alpha=2.5))  # a non-integer exponent (a runtime value only)

    def _plan_backward(self, out):
        f32 = self.torch.float32

        def bwd(**p):
            base = dict(C=19, input=f32, weight=True, smooth=True, ood=False, wide=False,
                        chunk_c=None)
            base.update(p)
            return ("backward", self.pixel_point(base.pop("shape", "n16"), **base))

        c_tiles, c_specs = self.scan("backward C", range(1, C_SCAN + 1),
                                     lambda c: self.backward(bwd(C=c)[1]), PRACTICAL_C)
        small, large = self._practical_pair(c_tiles)
        for c in c_tiles:
            out += [bwd(C=c, input=dt, shape=shape)
                    for dt, shape in self.settings(both=self.register_group("backward C", c))]
            out.append(bwd(C=c, shape="n1"))
        out += [bwd(C=c) for c in c_specs]
        for c in (small, large):
            out += [bwd(C=c, weight=w, smooth=sm)
                    for w, sm in itertools.product((True, False), repeat=2)
                    if self.full or c == small or not (w or sm)]
            out += [bwd(C=c, weight=w, smooth=False, ood=True)
                    for w in ((True, False) if self.full or c == small else (False,))]
            out += [bwd(C=c, input=dt) for dt in self.dtypes]
            out.append(bwd(C=c, wide=True))
        out.append(bwd(C=small, shape="big"))
        out.append(bwd(shape="empty"))

    def _mc_rows(self, name, c, s_tiles, k_tiles, valid=lambda S, k: True):
        """(S, count, resampling, settings) rows of one class-count group, each row in both
        settings, but the further sample-group rows of a class-chunked C in one."""
        rows = [r for r in self._rows(s_tiles, k_tiles, (True, False)) if valid(r[0], r[1])]
        chunked = not self.register_group(name, c)
        return [(s, k, resample, self.settings(both=not chunked or s == s_tiles[0]))
                for s, k, resample in rows]

    def _plan_accumulate(self, out):
        f32 = self.torch.float32

        def acc(**p):
            base = dict(C=19, S=10, count=10, samples=f32, resample=True, chunk_c=None,
                        wide=False)
            base.update(p)
            return ("accumulate", self.mc_point(base.pop("shape", "n16"), **base))

        def both(**p):
            for resample in (False, True):
                self.accumulate(acc(resample=resample, **p)[1])

        c_tiles, c_specs = self.scan("accumulate C", range(1, C_SCAN + 1),
                                     lambda c: both(C=c, S=2, count=0), PRACTICAL_C)
        small, large = self._practical_pair(c_tiles)
        for c in c_tiles:
            s_tiles, s_specs = self.scan(f"accumulate S (C={c})", range(1, BETA_SCAN + 1),
                                         lambda S, c=c: both(C=c, S=S), PRACTICAL_BETA)
            k_tiles, k_specs = self.scan(f"accumulate count (C={c})", range(0, COUNT_SCAN + 1),
                                         lambda k, c=c: both(C=c, count=k), PRACTICAL_BETA)
            for S, k, resample, settings in self._mc_rows(
                    "accumulate C", c, self._ordered(s_tiles, PRACTICAL_BETA),
                    self._ordered(k_tiles, (10,))):
                out += [acc(C=c, S=S, count=k, resample=resample, samples=dt, shape=shape)
                        for dt, shape in settings]
            if self.full or c == small:
                out += [acc(C=c, S=S) for S in s_specs] + [acc(C=c, count=k) for k in k_specs]
        out += [acc(C=c) for c in c_specs]
        for c in (small, large):
            out += [acc(C=c, samples=dt) for dt in self.dtypes]
            out += [acc(C=c, wide=True), acc(C=c, shape="big")]
        out += [acc(C=small, resample=r, chunk_c=chunk) for r in (True, False)
                for chunk in self._forced_chunks()]
        out.append(acc(shape="empty"))
        out += [acc(align_corners=True), acc(shape="rows")]

    def _plan_reduce(self, out):
        f32 = self.torch.float32

        def red(**p):
            base = dict(C=19, S=10, count=10, samples=f32, resample=True, chunk_c=None,
                        wide=False, probs=True, entropy=True)
            base.update(p)
            return ("reduce", self.mc_point(base.pop("shape", "n16"), **base))

        def both(**p):
            for resample in (False, True):
                self.reduce(red(resample=resample, **p)[1])

        c_tiles, c_specs = self.scan(
            "reduce C", range(1, C_SCAN + 1),
            lambda c: (both(C=c, S=2, count=0), both(C=c, S=0, count=2)), PRACTICAL_C)
        small, large = self._practical_pair(c_tiles)
        for c in c_tiles:
            s_tiles, s_specs = self.scan(f"reduce S (C={c})", range(0, BETA_SCAN + 1),
                                         lambda S, c=c: both(C=c, S=S), PRACTICAL_BETA)
            k_tiles, k_specs = self.scan(f"reduce count (C={c})", range(0, COUNT_SCAN + 1),
                                         lambda k, c=c: both(C=c, S=2, count=k),
                                         PRACTICAL_BETA)
            for S, k, resample, settings in self._mc_rows(
                    "reduce C", c, self._ordered(s_tiles, PRACTICAL_BETA),
                    self._ordered(k_tiles, (10,)), valid=lambda S, k: S + k >= 2):
                out += [red(C=c, S=S, count=k, resample=resample, samples=dt, shape=shape)
                        for dt, shape in settings]
            if self.full or c == small:
                out += [red(C=c, S=S, count=2) for S in s_specs]
                out += [red(C=c, S=2, count=k) for k in k_specs]
        out += [red(C=c) for c in c_specs]
        for c in (small, large):
            out += [red(C=c, probs=p, entropy=e)
                    for p, e in itertools.product((True, False), repeat=2)
                    if self.full or c == small or not (p or e)]
            out += [red(C=c, samples=dt) for dt in self.dtypes]
            out += [red(C=c, wide=True), red(C=c, shape="big")]
        out += [red(C=small, resample=r, chunk_c=chunk) for r in (True, False)
                for chunk in self._forced_chunks()]
        out.append(red(shape="empty"))
        out += [red(align_corners=True), red(shape="rows")]


# ------------------------------------------------------------------------ enumeration


class Variant:
    """One compile: a kernel specialised for one target, and the launches that select it."""

    def __init__(self, fn, arch, key, signature, constexprs, options, attrs):
        self.fn, self.arch, self.key = fn, arch, key
        self.signature, self.options, self.attrs = signature, options, attrs
        names = fn.arg_names
        self.constexprs = constexprs
        self.constexpr_names = {names[path[0]]: v for path, v in constexprs.items()}
        self.points: list[dict] = []
        self.result: dict = {}
        self.register_path = False

    @property
    def kernel(self) -> str:
        return self.fn.__name__

    def tile(self) -> tuple:
        """The kernel and its tile configuration: the declared constexprs but the offset width
        (see ``register_tiles``)."""
        return _tile_key(self.fn, self.constexpr_names)


#: Constexprs that select the offset arithmetic (int32 or int64), not the tiles.
OFFSET_CONSTEXPRS = ("WIDE",)


def _tile_key(fn, constexprs: dict) -> tuple:
    declared = {p.name for p in fn.params if p.is_constexpr}
    return (fn.__name__, tuple(sorted((n, v) for n, v in constexprs.items()
                                      if n in declared and n not in OFFSET_CONSTEXPRS)))


def register_tiles(launches: list[Launch], small_c_max: int) -> set[tuple]:
    """Tile configurations that hold all classes of a problem with C <= ``small_c_max`` in
    registers: those the launchers choose for such a C without a forced class chunk. A variant
    with one of these tiles (whatever C it was reached with, e.g. the backward's 64-class tile
    also serves C = 150) is a register-path variant."""
    return {_tile_key(launch.fn, launch.kwargs) for launch in launches
            if launch.point["C"] <= small_c_max and launch.point.get("chunk_c") is None}


def enumerate_variants(archs: list[int], full: bool = False):
    """(variants, report lines, problems): the sweep, its coverage checks, and every launch
    specialised for every arch, deduplicated by the JIT's cache key."""
    session = Session()
    spec = Specialiser(session.kernels.values())
    sweep = Sweep(session, spec, archs[-1])
    coverage = LineCoverage(session.ops.__file__)
    problems, notes = [], []
    missing = sorted(set(session.launchers) - {"_forward", "_backward", "_mc_accumulate",
                                                "_mc_reduce"})
    if missing:
        problems.append(f"custom ops whose launchers this sweep does not drive: {missing}")
    t0 = time.perf_counter()
    with session.recording():
        with spec.target(sweep.scan_arch):
            plan = sweep.plan(full)
        session.launches.clear()
        # What the launchers cache (the bilinear tables) is built anew under the line coverage.
        for value in vars(session.ops).values():
            if callable(getattr(value, "cache_clear", None)):
                value.cache_clear()
        with coverage.active():
            for method, point in plan:
                getattr(sweep, method)(point)
    launches = session.launches
    notes.append(f"sweep: {len(plan)} launcher calls, {len(launches)} kernel launches "
                 f"({time.perf_counter() - t0:.1f} s with the config scans)")
    for name, found in sweep.found.items():
        notes.append(f"  groups of {name}: {found}")

    # Every launch site reached, every non-error line of the launchers executed.
    reached = {launch.fn.__name__ for launch in launches}
    for kernel, funcs in sorted(session.launch_sites.items()):
        if kernel not in reached:
            problems.append(f"kernel {kernel} (launched in {sorted(funcs)}) never reached")
    required = _required_lines(session.ops.__file__, coverage.functions)
    for line, (func, span) in sorted(required.items()):
        if not any(n in coverage.lines for n in span):
            problems.append(f"ops.py:{line} (in {func}) never executed by the sweep")

    variants: dict[tuple, Variant] = {}
    registers = register_tiles(launches, session.ops._SMALL_C_MAX)
    t0 = time.perf_counter()
    for arch in archs:
        with spec.target(arch):
            for launch in launches:
                key, signature, constexprs, options, attrs = spec(launch)
                vkey = (launch.fn.__module__, launch.fn.__name__, arch, key)
                v = variants.get(vkey)
                if v is None:
                    v = variants[vkey] = Variant(launch.fn, arch, key, signature, constexprs,
                                                 options, attrs)
                    v.register_path = v.tile() in registers
                v.points.append(launch.point)
    notes.append(f"specialised for sm_{', sm_'.join(map(str, archs))}: {len(variants)} "
                 f"variants ({time.perf_counter() - t0:.1f} s)")
    return list(variants.values()), notes, problems, session


# ------------------------------------------------------------------------ compiling


def _worker_init(repo: str, cache_dir: str) -> None:
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    os.environ.pop("TRITON_INTERPRET", None)
    sys.path.insert(0, repo)
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
    from triton import knobs

    # The ptxas log (registers, spills) is printed, and every variant is compiled even if the
    # cache already holds it (a cache hit would skip ptxas and its log).
    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True


def _compile(job: dict) -> dict:
    """Compiles one variant as the JIT would (``triton.compile`` of an ``ASTSource`` with the
    JIT's signature, constexprs, attributes and options); registers and spills from ptxas."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(job["module"]), job["kernel"])
    src = ASTSource(fn, job["signature"], job["constexprs"], job["attrs"])
    log = io.StringIO()
    t0 = time.perf_counter()
    res = {"id": job["id"]}
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=GPUTarget("cuda", job["arch"], 32),
                                      options=job["options"])
    except Exception as e:  # every failure is reported, none is fatal here
        res.update(error=f"{type(e).__name__}: {e}"[-3000:], seconds=time.perf_counter() - t0)
        return res
    text = log.getvalue()
    regs = _PTXAS_REGS.search(text)
    spill = _PTXAS_SPILL.search(text)
    res.update(seconds=time.perf_counter() - t0, shared=int(compiled.metadata.shared),
               registers=int(regs.group(1)) if regs else None,
               stack=int(spill.group(1)) if spill else None,
               spill_stores=int(spill.group(2)) if spill else None,
               spill_loads=int(spill.group(3)) if spill else None)
    if regs is None or spill is None:
        res["error"] = "no ptxas resource report in the compile log"
    elif res["spill_stores"] or res["spill_loads"]:
        try:
            res["spill_ops"], res["loop_spill_ops"], res["inner_spill_ops"] = _local_memory_ops(
                _disassemble(compiled.asm["cubin"]))
        except Exception as e:  # no disassembly: the spill counts as in a loop
            res["sass_error"] = f"{type(e).__name__}: {e}"[-300:]
    return res


def _disassemble(cubin: bytes) -> str:
    """SASS of a cubin with its branch labels, from the nvdisasm bundled with Triton."""
    import subprocess

    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([knobs.nvidia.nvdisasm.path, "-c", f.name], check=True,
                              capture_output=True, text=True).stdout


def _local_memory_ops(sass: str) -> tuple[int, int, int]:
    """(local-memory loads and stores, those inside a loop, those inside an innermost loop) of a
    disassembled kernel. A loop is the code from a label to a branch back to it; an innermost
    loop contains no other loop (the loops over samples, and over class chunks where no sample
    loop is nested in them: the loops that stream the data)."""
    lines = sass.splitlines()
    labels = {}
    loops = []
    for i, line in enumerate(lines):
        m = _SASS_LABEL.match(line)
        if m:
            labels[m.group(1)] = i
            continue
        b = _SASS_BRANCH.search(line)
        if b and b.group(1) in labels and labels[b.group(1)] < i:
            loops.append((labels[b.group(1)], i))
    inner = [(a, b) for a, b in loops
             if not any((c, d) != (a, b) and a <= c and d <= b for c, d in loops)]
    ops = [i for i, line in enumerate(lines) if _SASS_LOCAL.search(line)]
    in_loop = [i for i in ops if any(a <= i <= b for a, b in loops)]
    in_inner = [i for i in ops if any(a <= i <= b for a, b in inner)]
    return len(ops), len(in_loop), len(in_inner)


def _dtype_name(t) -> str:
    return str(t).removeprefix("torch.")


def _describe(v: Variant) -> dict:
    """Table columns of a variant."""
    fn = v.fn
    declared = {n: x for n, x in v.constexpr_names.items() if fn.params[fn.arg_names.index(n)]
                .is_constexpr}
    specialised = {n: x for n, x in v.constexpr_names.items() if n not in declared}
    pointers, ints = [], []
    for i, (name, ty) in enumerate(v.signature.items()):
        if ty == "constexpr" or ty.startswith("fp"):
            continue
        attrs = v.attrs.get((i,), [])
        divisible = any(a[0] == "tt.divisibility" for a in attrs)
        if ty.startswith("*"):
            pointers.append(f"{name.removesuffix('_ptr')}:{ty[1:]}" + ("" if divisible else "!"))
        else:
            ints.append(f"{name}:{ty}" + ("/16" if divisible else ""))
    ints += [f"{n}={x}" for n, x in specialised.items()]
    options = {k: getattr(v.options, k, None) for k in ("num_warps", "enable_fp_fusion")}
    p = v.points[0]
    example = {k: (_dtype_name(x) if "dtype" in type(x).__name__ else x) for k, x in p.items()
               if k in ("launcher", "C", "beta", "S", "count", "input", "samples", "shape",
                        "resample", "check", "weight", "smooth", "ood", "probs", "entropy",
                        "wide", "chunk_c")}
    return dict(kernel=v.kernel, arch=f"sm_{v.arch}",
                constexprs=" ".join(f"{n}={int(x) if isinstance(x, bool) else x}"
                                    for n, x in declared.items()),
                pointers=" ".join(pointers), ints=" ".join(ints),
                options=" ".join(f"{k}={x}" for k, x in options.items()),
                launches=len(v.points), example=json.dumps(example, default=str))


def compile_variants(variants: list[Variant], jobs: int, cache_dir: str) -> float:
    """Compiles every variant in a process pool; results in ``variant.result``. Returns the
    wall time."""
    work = []
    for i, v in enumerate(variants):
        work.append(dict(id=i, module=v.fn.__module__, kernel=v.kernel, arch=v.arch,
                         signature=v.signature, constexprs=v.constexprs, attrs=v.attrs,
                         options=dict(v.options.__dict__)))
    t0 = time.perf_counter()
    done = 0
    ctx = mp.get_context("spawn")
    with cf.ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_worker_init,
                                initargs=(str(REPO), cache_dir)) as pool:
        futures = [pool.submit(_compile, w) for w in work]
        for fut in cf.as_completed(futures):
            res = fut.result()
            variants[res["id"]].result = res
            done += 1
            if done % 50 == 0 or done == len(work):
                print(f"  compiled {done}/{len(work)} ({time.perf_counter() - t0:.0f} s)",
                      flush=True)
    return time.perf_counter() - t0


def _rows(variants: list[Variant]) -> list[dict]:
    rows = []
    for v in variants:
        r = v.result
        row = _describe(v)
        row.update(path="register" if v.register_path else "chunked",
                   registers=r.get("registers"), spill_stores=r.get("spill_stores"),
                   spill_loads=r.get("spill_loads"), stack=r.get("stack"),
                   shared=r.get("shared"), seconds=round(r.get("seconds", 0.0), 2),
                   error=r.get("error", ""))
        spilled = (row["spill_stores"] or 0) + (row["spill_loads"] or 0) > 0
        if not spilled:
            row["spill_code"] = ""
        elif "loop_spill_ops" not in r:
            row["spill_code"] = "unknown (no disassembly)"
        else:
            row["spill_code"] = (f"{r['loop_spill_ops']} of {r['spill_ops']} local-memory "
                                 f"instructions in loops, {r['inner_spill_ops']} in innermost "
                                 f"loops")
        row["loop_spill_ops"] = r.get("loop_spill_ops")
        row["inner_spill_ops"] = r.get("inner_spill_ops")
        rows.append(row)
    rows.sort(key=lambda r: (r["kernel"], r["arch"], r["path"], r["constexprs"], r["pointers"],
                             r["ints"]))
    return rows


COLUMNS = ("kernel", "arch", "path", "constexprs", "pointers", "ints", "options", "registers",
           "spill_stores", "spill_loads", "spill_code", "loop_spill_ops", "inner_spill_ops",
           "stack", "shared", "seconds", "launches", "example", "error")

#: Spill stores (bytes per thread) a variant may have where its design allows spill code at all
#: (see the module docstring): one to three words that ptxas keeps in local memory across the
#: loops, one store and one load each per thread whatever β or C. Above this a spill fails.
SPILL_ALLOWANCE = 16


def spill_fails(row: dict, strict: bool) -> bool:
    """Whether a variant's spill fails the check: with ``strict`` any spill; else more than
    ``SPILL_ALLOWANCE`` bytes, spill code of unknown place (no disassembly), or spill code inside
    the loops the variant's design keeps in registers: any loop on the register path, the
    innermost loops (per sample, per class chunk of a sample) on the class-chunked path."""
    if not row["spill_code"]:
        return False
    if strict or row["loop_spill_ops"] is None or row["spill_stores"] > SPILL_ALLOWANCE:
        return True
    in_loops = row["loop_spill_ops"] if row["path"] == "register" else row["inner_spill_ops"]
    return in_loops > 0


def register_summary(rows: list[dict]) -> list[str]:
    """Per kernel, path and arch: variants, registers (min / median / max), spilling variants
    and the largest spill."""
    groups = collections.defaultdict(list)
    for r in rows:
        if r["registers"] is not None:
            groups[(r["kernel"], r["path"], r["arch"])].append(r)
    lines = []
    for (kernel, path, arch), group in sorted(groups.items()):
        regs = sorted(r["registers"] for r in group)
        spills = [r["spill_stores"] for r in group if r["spill_code"]]
        lines.append(f"  {kernel} {path} {arch}: {len(group)} variants, registers "
                     f"{regs[0]}/{regs[len(regs) // 2]}/{regs[-1]} (min/median/max), "
                     f"{len(spills)} spilling" + (f" (up to {max(spills)} bytes)" if spills
                                                  else ""))
    return lines


def write_tables(rows: list[dict], out: Path, summary: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "variants.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    (out / "variants.json").write_text(json.dumps({"summary": summary, "variants": rows},
                                                  indent=1))
    md = ["# Triton compile check", "", *[f"    {line}" for line in summary], "",
          "Columns: `pointers` lists each pointer argument's dtype (`!`: not 16-byte aligned); "
          "`ints` each integer argument's type (`/16`: divisible by 16) and the arguments "
          "specialised to a constant; `path`: register path or class-chunked (see the check's "
          "docstring for which spills fail); `loop ops`: local-memory instructions inside a "
          "loop / inside an innermost loop / in all. Registers per thread, spills and stack in "
          "bytes per thread, shared memory in bytes per program.", "",
          "| kernel | arch | path | constexprs | pointers | ints | regs | spill st/ld | "
          "loop ops | stack | smem | s | error |",
          "|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        md.append(f"| {r['kernel']} | {r['arch']} | {r['path']} | {r['constexprs']} | "
                  f"{r['pointers']} | {r['ints']} | {r['registers']} | "
                  f"{r['spill_stores']}/{r['spill_loads']} | "
                  f"{_loop_ops(r)} | {r['stack']} | {r['shared']} | "
                  f"{r['seconds']} | {r['error'][:80].replace('|', '/')} |")
    (out / "variants.md").write_text("\n".join(md) + "\n")


def _loop_ops(row: dict) -> str:
    """``in loops / innermost / all`` local-memory instructions, or why unknown."""
    if not row["spill_code"] or row["loop_spill_ops"] is None:
        return row["spill_code"]
    return f"{row['loop_spill_ops']}/{row['inner_spill_ops']}/{row['spill_code'].split()[2]}"


def main(argv=None) -> int:
    args = _parse_args(argv)
    sys.path.insert(0, str(REPO))
    t_start = time.perf_counter()
    import triton

    print(f"triton {triton.__version__}, python {sys.version.split()[0]}, "
          f"archs {args.archs}, jobs {args.jobs}")
    variants, notes, problems, _ = enumerate_variants(args.archs, args.full)
    for n in notes:
        print(n)
    if args.kernels:
        wanted = set(args.kernels.split(","))
        unknown = wanted - {v.kernel for v in variants}
        if unknown:
            print(f"FAIL: no such kernel among the variants: {sorted(unknown)}")
            return 2
        variants = [v for v in variants if v.kernel in wanted]
    if args.list:
        for row in _rows(variants):
            print(f"  {row['kernel']} {row['arch']} {row['path']} [{row['constexprs']}] "
                  f"[{row['pointers']}] [{row['ints']}]")
        for p in problems:
            print(f"FAIL: {p}")
        return 1 if problems else 0

    tmp = None
    cache_dir = args.cache_dir
    if cache_dir is None:
        tmp = cache_dir = tempfile.mkdtemp(prefix="triton-compile-check-")
    try:
        wall = compile_variants(variants, args.jobs, cache_dir)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    rows = _rows(variants)
    errors = [r for r in rows if r["error"]]
    spilling = [r for r in rows if r["spill_code"]]
    bad_spills = [r for r in spilling if spill_fails(r, args.strict_spills)]
    register_spills = [r for r in spilling if r["path"] == "register"]
    ok = [r for r in rows if r["registers"] is not None]
    top = max(ok, key=lambda r: r["registers"]) if ok else None
    kernels = sorted({r["kernel"] for r in rows})
    summary = [
        f"triton {triton.__version__}: {len(rows)} variants of {len(kernels)} kernels "
        f"({', '.join(f'sm_{a}' for a in args.archs)}), compiled in {wall:.0f} s with "
        f"{args.jobs} jobs ({time.perf_counter() - t_start:.0f} s in all)",
        f"max registers {top['registers']} ({top['kernel']} {top['arch']} "
        f"[{top['constexprs']}])" if top else "no variant compiled",
        f"spilling: {len(register_spills)} register-path and "
        f"{len(spilling) - len(register_spills)} class-chunked variants, {len(bad_spills)} "
        "failing (" + ("any spill fails" if args.strict_spills else
                       f"over {SPILL_ALLOWANCE} bytes, or spill code in a loop of the register "
                       "path or an innermost loop of the class-chunked path") + ")",
        f"compile errors: {len(errors)}; sweep coverage problems: {len(problems)}",
        "registers per kernel, path and arch:",
        *register_summary(rows),
    ]
    write_tables(rows, Path(args.out), summary)
    for r in spilling:
        tag = "FAIL" if spill_fails(r, args.strict_spills) else "note"
        print(f"{tag}: {r['path']} path spills {r['spill_stores']}/{r['spill_loads']} bytes "
              f"st/ld ({r['spill_code']}), {r['registers']} regs: {r['kernel']} {r['arch']} "
              f"[{r['constexprs']}] [{r['pointers']}] [{r['ints']}]")
    for r in errors:
        print(f"FAIL: compile error: {r['kernel']} {r['arch']} [{r['constexprs']}] "
              f"[{r['pointers']}] [{r['ints']}]: {r['error']}")
    for p in problems:
        print(f"FAIL: {p}")
    print(f"tables: {args.out}/variants.{{md,csv,json}}")
    for line in summary:
        print(line)
    return 1 if errors or bad_spills or problems else 0


if __name__ == "__main__":
    sys.exit(main())
