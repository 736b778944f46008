"""CUDA forward and forward+backward of U-CE: the Triton kernels vs the compiled CUDA kernels vs
the reference (eager and torch.compile) vs the official-code style vs plain F.cross_entropy.

Shapes: B=4, C=19 at 768² (Cityscapes crops) and C=150 at 512² (ADE20K), β ∈ {2, 6, 10}, logits
and stack in bf16 and in fp32. Per (shape, implementation): median time of the forward (autograd
on, as in training) and of forward+backward over CUDA-event-timed repetitions; effective bandwidth
from counted bytes as a share of this GPU's device-to-device copy bandwidth measured in the same
run; peak extra memory (``max_memory_allocated`` over what was allocated before the step).
"""

from __future__ import annotations

import statistics

import pytest
import torch
from baselines import make_inputs
from implementations import CUDA_NAMES, IMPLEMENTATIONS, usable

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="the CUDA benchmarks need a CUDA device")

_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float32: "fp32"}
SHAPES = [
    dict(beta=beta, batch=4, classes=classes, size=(side, side), dtype=dtype)
    for classes, side in ((19, 768), (150, 512))
    for dtype in (torch.bfloat16, torch.float32)
    for beta in (2, 6, 10)
]
WARMUP, REPS = 3, 20


def _shape_id(shape: dict) -> str:
    side = shape["size"][0]
    return (f"β={shape['beta']} B={shape['batch']} C={shape['classes']} {side}² "
            f"{_DTYPE_NAMES[shape['dtype']]}")


def _median_seconds(fn, warmup: int = WARMUP, reps: int = REPS) -> float:
    """Median GPU time of ``fn()`` between two CUDA events, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


@pytest.fixture(scope="module")
def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth of this GPU in bytes/s (a 1 GiB ``dst.copy_(src)``, counted
    as 2 × its size: one read, one write)."""
    src = torch.empty(2**28, dtype=torch.float32, device="cuda").normal_()
    dst = torch.empty_like(src)
    seconds = _median_seconds(lambda: dst.copy_(src), warmup=5, reps=50)
    return 2 * src.numel() * src.element_size() / seconds


def _counted_bytes(shape: dict) -> tuple[int, int]:
    """(forward, forward+backward) bytes a fused implementation must move.
    Forward: stack + logits + target + per-pixel loss, lse and weight (fp32).
    Backward: logits read + gradient written + per-pixel target, lse, weight and grad_loss."""
    elt = shape["dtype"].itemsize
    pixels = shape["batch"] * shape["size"][0] * shape["size"][1]
    logits = pixels * shape["classes"] * elt
    forward = shape["beta"] * logits + logits + pixels * (8 + 3 * 4)
    backward = 2 * logits + pixels * (8 + 3 * 4)
    return forward, forward + backward


def _param(shape, name):
    return pytest.param(shape, name, id=f"{_shape_id(shape)}-{name}", marks=pytest.mark.skipif(
        not usable(name), reason=f"{name} needs a backend not available here"))


@pytest.mark.parametrize(("shape", "name"),
                         [_param(shape, name) for shape in SHAPES for name in CUDA_NAMES])
def test_cuda_forward_backward(record, copy_bandwidth, shape, name):
    torch._dynamo.reset()  # torch.compile(reference): one fresh compile per shape
    torch.cuda.empty_cache()
    fn = IMPLEMENTATIONS[name]
    logits, target, stack = make_inputs(shape["beta"], shape["batch"], shape["classes"],
                                        shape["size"], dtype=shape["dtype"], device="cuda")

    def forward():
        return fn(logits, target, stack)

    def forward_backward():
        logits.grad = None
        fn(logits, target, stack).backward()

    fwd_s = _median_seconds(forward)
    fwd_bwd_s = _median_seconds(forward_backward)

    logits.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss = fn(logits, target, stack)
    loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()

    fwd_bytes, fwd_bwd_bytes = _counted_bytes(shape)
    record("cuda", shape=_shape_id(shape), impl=name, fwd_s=fwd_s, median_s=fwd_bwd_s,
           fwd_bytes=fwd_bytes, fwd_bwd_bytes=fwd_bwd_bytes, copy_bytes_per_s=copy_bandwidth,
           extra_bytes=extra, stack_bytes=stack.numel() * stack.element_size())
