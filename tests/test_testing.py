"""uce_fast.testing.uce_oracle: the float64 U-CE that accepts either class of a float32 near-tie,
and only there."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import SMALL, backend_params, device_of

import uce_fast
from uce_fast.testing import TIE_RTOL, uce_oracle

KERNELS = backend_params(["cpu", "cuda", "triton"])


def near_uniform(batch: int, size: int, seed: int, classes: int = 19, beta: int = 10):
    """Logits and samples 0.01·randn (as early in training): near-ties at ~1e-5 of the pixels."""
    g = torch.Generator().manual_seed(seed)
    logits = 0.01 * torch.randn(batch, classes, size, size, generator=g)
    samples = 0.01 * torch.randn(beta, batch, classes, size, size, generator=g)
    target = torch.randint(0, classes, (batch, size, size), generator=g)
    return logits, samples, target


def _loss_and_grad(backend, logits, target, samples, **options):
    device = device_of(backend)
    x = logits.to(device).requires_grad_(True)
    loss = uce_fast.uce_loss(x, target.to(device), samples.to(device), backend=backend,
                             **options)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach().cpu(), grad.cpu()


def _rel(a, b):
    return float((a.double() - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("backend", KERNELS)
def test_near_ties_pass_with_the_rule_and_fail_without(backend):
    """B=4, C=19, 256², β=10 near-uniform: float32 picks another class than float64 at a few
    pixels; the tie-aware oracle matches to rounding, the plain first-maximum one does not."""
    batch, size = (1, 48) if SMALL else (4, 256)
    logits, samples, target = near_uniform(batch, size, seed=0)
    loss, grad = _loss_and_grad(backend, logits, target, samples)
    ref = uce_oracle(logits, target, samples, got_grad=grad)
    assert _rel(grad, ref.grad) < 1e-5
    assert abs(float(loss) - float(ref.loss)) < 1e-6 * float(ref.loss)
    assert ref.ties >= ref.flips
    if not SMALL:  # at this size the data has flips: the rule is exercised
        assert ref.flips > 0
        plain = uce_oracle(logits, target, samples, tie_rtol=0.0)
        assert plain.ties == 0 and _rel(grad, plain.grad) > 1e-4


@pytest.mark.slow
@pytest.mark.skipif(SMALL, reason="UCE_FAST_TEST_SMALL=1: small shapes only")
@pytest.mark.parametrize("backend", backend_params(["cpu", "cuda"]))
def test_a_million_near_uniform_pixels(backend):
    logits, samples, target = near_uniform(16, 256, seed=1)
    _, grad = _loss_and_grad(backend, logits, target, samples)
    ref = uce_oracle(logits, target, samples, got_grad=grad)
    assert ref.flips > 0 and _rel(grad, ref.grad) < 1e-5


def _two_class_tie(gap: float):
    """Samples where class 4's mean probability is ``gap`` below class 2's, in relative terms;
    class 4 varies more across samples, so the two sigmas differ."""
    g = torch.Generator().manual_seed(3)
    beta, classes = 6, 7
    probs = torch.full((beta, 1, classes, 1), 0.05, dtype=torch.float64)
    noise = 0.02 * torch.randn(beta, generator=g, dtype=torch.float64)
    noise -= noise.mean()
    probs[:, 0, 2, 0] = 0.3
    probs[:, 0, 4, 0] = 0.3 * (1 - gap) + noise
    probs[:, 0, 0, 0] = 1 - probs[:, 0, 1:, 0].sum(1)  # rows sum to 1; class 0 stays small
    samples = probs.log()
    logits = torch.randn(1, classes, 1, generator=g, dtype=torch.float64)
    target = torch.tensor([[1]])
    return logits, samples, target


def _got_grad(logits, target, samples, k: int, alpha: float = 10.0):
    """The gradient a backend that picked class k would return."""
    sigma = torch.softmax(samples, dim=2).std(0)[:, k]
    x = logits.clone().requires_grad_(True)
    loss = ((1 + sigma) ** alpha * F.cross_entropy(x, target, reduction="none")).mean()
    (grad,) = torch.autograd.grad(loss, x)
    return grad


@pytest.mark.parametrize("gap", [TIE_RTOL / 4, 4 * TIE_RTOL])
def test_only_near_ties_may_pick_another_class(gap):
    logits, samples, target = _two_class_tie(gap)
    got = _got_grad(logits, target, samples, 4)
    ref = uce_oracle(logits, target, samples, got_grad=got)
    if gap < TIE_RTOL:
        assert ref.ties == 1 and ref.flips == 1 and torch.allclose(ref.grad, got, rtol=1e-12)
    else:
        assert ref.ties == 0 and not torch.allclose(ref.grad, got, rtol=1e-6)
    # The first maximum's result always passes.
    first = _got_grad(logits, target, samples, 2)
    ref = uce_oracle(logits, target, samples, got_grad=first)
    assert ref.flips == 0 and torch.allclose(ref.grad, first, rtol=1e-12)


def test_matches_cross_entropy_and_a_per_pixel_loss_map():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 4, 3, generator=g, dtype=torch.float64)
    samples = torch.randn(3, 2, 5, 4, 3, generator=g, dtype=torch.float64)
    target = torch.randint(0, 5, (2, 4, 3), generator=g)
    target[0, 0, 0] = -100
    weight = torch.rand(5, generator=g, dtype=torch.float64) + 0.5
    ref = uce_oracle(logits, target, samples, alpha=0.0, weight=weight, label_smoothing=0.1)
    want = F.cross_entropy(logits, target, weight=weight, label_smoothing=0.1)
    assert torch.allclose(ref.loss, want, rtol=1e-12)
    grad_out = torch.rand(2, 4, 3, generator=g, dtype=torch.float64)
    ref = uce_oracle(logits, target, samples, reduction="none", grad_output=grad_out)
    sigma = torch.softmax(samples, 2).std(0)
    sigma = sigma.gather(1, torch.softmax(samples, 2).mean(0).argmax(1, keepdim=True))[:, 0]
    x = logits.clone().requires_grad_(True)
    per_pixel = (1 + sigma) ** 10 * F.cross_entropy(x, target, reduction="none")
    (grad,) = torch.autograd.grad(per_pixel, x, grad_out)
    assert torch.allclose(ref.loss, per_pixel.detach(), rtol=1e-12)
    assert torch.allclose(ref.grad, grad, rtol=1e-12)


def test_low_resolution_samples_need_align_corners():
    logits = torch.randn(1, 3, 8, 8)
    target = torch.zeros(1, 8, 8, dtype=torch.int64)
    with pytest.raises(ValueError, match="align_corners"):
        uce_oracle(logits, target, torch.randn(2, 1, 3, 4, 4))
    ref = uce_oracle(logits, target, torch.randn(2, 1, 3, 4, 4), align_corners=True)
    assert ref.grad.shape == logits.shape
