"""Shared test helpers: backends under test, input factories and the one tolerance helper."""

from __future__ import annotations

import os

import pytest
import torch

import uce_fast
from uce_fast import MCSampler, mc_dropout
from uce_fast.testing import uce_oracle

#: Backends the suite knows; each test parametrised over them skips those not usable here.
ALL_BACKENDS = ("torch", "cpu", "cuda", "triton")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: Small shapes only (UCE_FAST_TEST_SMALL=1): for the Triton interpreter, which runs each kernel
#: program in Python.
SMALL = os.environ.get("UCE_FAST_TEST_SMALL") == "1"
#: Triton runs in its interpreter on CPU tensors (TRITON_INTERPRET=1, set before it is imported).
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Tolerances by the dtype of the compared tensor. Backends are compared with the reference run on
# the *same* (possibly low-precision) values upcast to float32, so float32 results differ only by
# float32 rounding; low-precision gradients additionally by one rounding to their own dtype.
_TOL = {
    torch.float64: (1e-9, 1e-10),
    torch.float32: (2e-5, 2e-6),
    torch.float16: (4e-3, 1e-5),
    torch.bfloat16: (2e-2, 1e-4),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, dtype: torch.dtype | None = None,
                 scale: float = 1.0, msg: str = "") -> None:
    """``torch.testing.assert_close`` with the suite's tolerance for ``dtype`` (default: actual's),
    loosened by ``scale``. NaNs must match; shapes must match exactly."""
    rtol, atol = _TOL[dtype or actual.dtype]
    assert actual.shape == expected.shape, f"{msg}: shape {actual.shape} != {expected.shape}"
    torch.testing.assert_close(
        actual.double(), expected.double(), rtol=rtol * scale, atol=atol * scale, equal_nan=True,
        msg=lambda m: f"{msg}\n{m}" if msg else m,
    )


def device_of(backend: str) -> torch.device:
    """The device a backend's tests run on: CUDA for "cuda", and for "triton" where CUDA is
    available (otherwise the Triton interpreter's CPU tensors)."""
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def backend_params(names=ALL_BACKENDS):
    """pytest params for backends, skipped with a reason where they cannot run."""
    usable = uce_fast.available_backends()
    params = []
    for name in names:
        reason = f"backend {name!r} is not available here (available: {usable})"
        params.append(pytest.param(name, id=name,
                                   marks=pytest.mark.skipif(name not in usable, reason=reason)))
    return params


def make_case(batch: int, classes: int, spatial: tuple[int, ...], beta: int, *,
              dtype: torch.dtype = torch.float32, sample_dtype: torch.dtype | None = None,
              ignore_frac: float = 0.2, ignore_index: int = -100, device="cpu", seed: int = 0,
              spread: float = 2.0):
    """Random logits, targets (a fraction ignored) and MC samples scattered around the logits."""
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, classes, *spatial)
    logits = torch.randn(shape, generator=gen) * spread
    samples = logits + torch.randn((beta, *shape), generator=gen)
    target = torch.randint(0, classes, (batch, *spatial), generator=gen)
    ignored = torch.rand(target.shape, generator=gen) < ignore_frac
    target = torch.where(ignored, torch.full_like(target, ignore_index), target)
    return (logits.to(device=device, dtype=dtype).requires_grad_(True), target.to(device),
            samples.to(device=device, dtype=sample_dtype or dtype))


def loss_and_grad(fn, input, grad_out=None):
    """Evaluate ``fn(x)`` on a fresh leaf copy of ``input``; return (loss, d loss / d x)."""
    x = input.detach().clone().requires_grad_(True)
    loss = fn(x)
    if grad_out is None:
        grad_out = torch.ones_like(loss)
    grad = torch.autograd.grad(loss, x, grad_out.to(loss), allow_unused=False)[0]
    return loss.detach(), grad



def assert_matches_oracle(loss, grad, input, target, samples, grad_out=None, *, scale=5.0,
                          **options):
    """A backend's ``(loss, grad)`` against the float64 oracle (``uce_fast.testing``), which
    accepts either class where the top two mean probabilities are within float32 rounding: the
    loss with the float32 tolerance, the gradient with that of its own dtype, loosened by
    ``scale``. ``options`` are ``uce_loss``'s. Returns the oracle's result."""
    options.pop("backend", None)
    ref = uce_oracle(input.detach().cpu(), target.cpu(), samples.detach().cpu(),
                     got_grad=grad.cpu(),
                     grad_output=1.0 if grad_out is None else grad_out.cpu(), **{
                         k: (v.cpu() if isinstance(v, torch.Tensor) else v)
                         for k, v in options.items()})
    assert_close(loss.cpu(), ref.loss.float(), dtype=torch.float32, scale=scale,
                 msg="loss vs float64 oracle")
    assert_close(grad.cpu(), ref.grad.to(grad.dtype), dtype=grad.dtype, scale=scale,
                 msg="grad vs float64 oracle")
    return ref


def plain_passes(model, x, beta, first=None):
    """``beta`` plain passes under mc_dropout (``first`` as the first when given)."""
    with torch.no_grad(), mc_dropout(model):
        outs = [] if first is None else [first.detach()]
        while len(outs) < beta:
            outs.append(uce_fast.logits_of(model(x)))
    return torch.stack(outs)


def assert_sampler_exact(model, x, beta=5, steps=2, size=None, align_corners=None, **options):
    """``steps`` training steps (forward, then ``MCSampler.sample``) against the same forwards
    and plain passes under the same seed: sigma equal to float32 rounding (the samples are the
    same; only the resampling of low-resolution ones differs from the model's own by rounding).
    Returns the sampler."""
    sampler = MCSampler(model, **options)
    for step in range(steps):
        torch.manual_seed(10 + step)
        logits = uce_fast.logits_of(model(x))
        acc = sampler.sample(x, beta, size=size, align_corners=align_corners)
        torch.manual_seed(10 + step)
        ref_first = uce_fast.logits_of(model(x))
        stack = plain_passes(model, x, beta, ref_first if sampler.last["train_pass"] else None)
        if size is not None:
            stack = uce_fast.reference.resample(stack, size, align_corners)
        assert acc.count == beta and acc.shape == ((*logits.shape[:2], *size) if size
                                                   else tuple(logits.shape))
        want = uce_fast.predictive_uncertainty(stack, backend="torch")
        torch.testing.assert_close(acc.sigma(), want, rtol=1e-4, atol=2e-6)
    return sampler
