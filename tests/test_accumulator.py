"""MCAccumulator, mc_stats and low-resolution samples: every backend against the reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import DTYPES, SMALL, assert_close, backend_params, device_of, loss_and_grad

import uce_fast
from uce_fast import reference

BACKENDS = backend_params()
STORES = ("auto", "state", "samples")

# (B, C, spatial, β) for samples at the statistics' resolution: class counts 2..1000, 0-3 dims.
FULL_SHAPES = [
    (2, 2, (7, 5), 2),
    (2, 3, (33,), 3),
    (2, 19, (9, 11), 10),
    (3, 19, (), 4),
    (2, 150, (5, 7), 3),
    (1, 1000, (13,), 2),
    (2, 5, (3, 4, 5), 3),
]
# (B, C, (h, w), (H, W), β): ×4 upsampling, odd ratios, downsampling, one dim kept, H = 1.
LOW_SHAPES = [
    (2, 19, (8, 8), (32, 32), 4),
    (2, 5, (5, 7), (17, 23), 3),
    (1, 3, (9, 9), (4, 3), 2),
    (2, 7, (6, 5), (6, 11), 3),
    (1, 4, (3, 4), (1, 9), 2),
    (1, 150, (4, 3), (9, 7), 2),
]
if not SMALL:
    LOW_SHAPES.append((2, 19, (24, 20), (96, 80), 10))


def _ids(shape):
    return "-".join(str(part).replace(" ", "") for part in shape)


def _samples(shape, beta, dtype, device, seed=0, spread=3.0):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen) * spread
    stack = base + torch.randn((beta, *shape), generator=gen)
    return stack.to(device=device, dtype=dtype)


def _reference_stats(stack, size=None, align_corners=False, correction=1):
    """The reference on the same values: upsampled as F.interpolate does, two-pass moments."""
    full = reference.resample(stack, size, align_corners)
    mean, m2, mean_entropy = reference.mc_moments(full)
    sigma, pred, entropy, mutual_info = reference.mc_finalize(mean, m2, mean_entropy,
                                                              stack.shape[0], correction)
    return uce_fast.MCStats(mean, pred, sigma, entropy, mutual_info)


def _assert_stats(stats, ref, dtype, *, resized):
    """Every field within the suite's tolerance; pred and sigma where the prediction is stable.

    Upsampling float16/bfloat16 samples rounds each interpolated logit to that dtype; a last-bit
    difference in the float32 interpolation may round it the other way, so those values get the
    dtype's tolerance, and predictions are compared where the two best mean probabilities are
    further apart than such a rounding can move them."""
    tol = dtype if (resized and dtype != torch.float32) else torch.float32
    top2 = ref.mean_probs.float().topk(min(2, ref.mean_probs.shape[1]), dim=1).values
    gap = top2[:, 0] - top2[:, -1] if top2.shape[1] > 1 else torch.ones_like(top2[:, 0])
    stable = gap > (3e-2 if tol != torch.float32 else 1e-5)
    assert stable.float().mean() > 0.5, "test data has too many near-ties"
    assert stats.pred.dtype == torch.int64 and stats.sigma.dtype == ref.sigma.dtype
    assert torch.equal(stats.pred.cpu()[stable.cpu()], ref.pred.cpu()[stable.cpu()])
    assert_close(stats.sigma[stable], ref.sigma[stable], dtype=tol, scale=5, msg="sigma")
    assert_close(stats.mean_probs, ref.mean_probs, dtype=tol, scale=5, msg="mean_probs")
    assert_close(stats.entropy, ref.entropy, dtype=tol, scale=5, msg="entropy")
    assert_close(stats.mutual_info, ref.mutual_info, dtype=tol, scale=5, msg="mutual_info")


# ------------------------------------------------------------------------------------ accumulator

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", FULL_SHAPES, ids=_ids)
@pytest.mark.parametrize("store", STORES)
def test_accumulator_matches_stack(backend, dtype, shape, store):
    batch, classes, spatial, beta = shape
    stack = _samples((batch, classes, *spatial), beta, dtype, device_of(backend), seed=beta)
    acc = uce_fast.MCAccumulator(backend=backend, store=store)
    for sample in stack:
        acc.update(sample)
    assert acc.count == beta and acc.shape == (batch, classes, *spatial)
    assert acc.backend == backend
    _assert_stats(acc.stats(), _reference_stats(stack), dtype, resized=False)
    sigma, pred = uce_fast.predictive_uncertainty(stack, backend="torch", return_prediction=True)
    acc_sigma, acc_pred = acc.sigma(return_prediction=True)
    assert torch.equal(acc_pred, pred)
    assert_close(acc_sigma, sigma, dtype=torch.float32, scale=5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", LOW_SHAPES, ids=_ids)
@pytest.mark.parametrize("align_corners", [False, True], ids=["ac0", "ac1"])
@pytest.mark.parametrize("store", STORES)
def test_low_resolution_accumulator_matches_upsampled_stack(backend, dtype, shape, align_corners,
                                                            store):
    batch, classes, low, size, beta = shape
    stack = _samples((batch, classes, *low), beta, dtype, device_of(backend), seed=classes)
    acc = uce_fast.MCAccumulator(size, align_corners=align_corners, backend=backend, store=store)
    for sample in stack:
        acc.update(sample)
    assert acc.shape == (batch, classes, *size)
    ref = _reference_stats(stack, size, align_corners)
    _assert_stats(acc.stats(), ref, dtype, resized=True)
    # The reference itself is F.interpolate's upsampling (float32 samples: exactly).
    if dtype == torch.float32:
        direct = F.interpolate(stack.flatten(0, 1), size, mode="bilinear",
                               align_corners=align_corners)
        assert torch.equal(reference.resample(stack, size, align_corners).flatten(0, 1), direct)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("resized", [False, True], ids=["full", "low"])
@pytest.mark.parametrize("store", STORES)
def test_update_stack_in_chunks_equals_one_by_one(backend, resized, store):
    device = device_of(backend)
    stack = _samples((2, 19, 6, 10), 7, torch.float32, device, seed=3)
    size = (23, 37) if resized else None
    one = uce_fast.MCAccumulator(size, align_corners=False, backend=backend, store=store)
    for sample in stack:
        one.update(sample)
    chunked = uce_fast.MCAccumulator(size, align_corners=False, backend=backend, store=store)
    for chunk in (stack[:1], stack[1:4], stack[4:]):
        chunked.update_stack(chunk)
    assert chunked.count == one.count == 7
    for a, b in zip(chunked.stats(), one.stats(), strict=True):
        assert_close(a, b, dtype=torch.float32, scale=5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_low_variance_samples_keep_their_spread(backend):
    """Confident samples that barely disagree: Welford keeps sigma where a float32 sum of
    squares would cancel to noise."""
    device = device_of(backend)
    gen = torch.Generator().manual_seed(0)
    base = torch.zeros(1, 4, 64)
    base[:, 0] = 12.0
    stack = base + 1e-3 * torch.randn(10, 1, 4, 64, generator=gen)
    acc = uce_fast.MCAccumulator(backend=backend, store="state")
    for sample in stack.to(device):
        acc.update(sample)
    exact = _reference_stats(stack.double())
    assert_close(acc.sigma().double(), exact.sigma, dtype=torch.float32, scale=50)
    assert float(exact.sigma.min()) > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("correction", [0, 1, 3])
def test_correction(backend, correction):
    stack = _samples((2, 5, 9), 5, torch.float32, device_of(backend))
    acc = uce_fast.MCAccumulator(backend=backend)
    acc.update_stack(stack)
    ref = _reference_stats(stack, correction=correction)
    assert_close(acc.sigma(correction), ref.sigma, dtype=torch.float32, scale=5)


def test_float64_on_the_torch_backend():
    stack = _samples((2, 6, 5, 4), 4, torch.float64, "cpu")
    acc = uce_fast.MCAccumulator((9, 7), align_corners=False, backend="torch")
    acc.update_stack(stack)
    stats = acc.stats()
    assert stats.sigma.dtype == torch.float64
    ref = _reference_stats(stack, (9, 7))
    assert_close(stats.sigma, ref.sigma)
    assert_close(stats.mutual_info, ref.mutual_info)


def test_auto_store_keeps_low_resolution_samples_then_folds_them():
    """Low-resolution samples are kept while smaller than the full-resolution state (2·C + 1
    float32 planes), then folded into it; the result does not change."""
    stack = _samples((1, 3, 4, 4), 16, torch.float32, "cpu")
    size = (8, 8)  # one sample: 3·16 floats; the state: 7·64 floats, i.e. 9 samples
    acc = uce_fast.MCAccumulator(size, align_corners=False, backend="torch")
    state_bytes = (2 * 3 + 1) * 64 * 4
    sizes = []
    for sample in stack:
        acc.update(sample)
        sizes.append(acc.nbytes)
    assert sizes[:9] == [3 * 16 * 4 * (i + 1) for i in range(9)]
    assert sizes[9:] == [state_bytes] * 7
    _assert_stats(acc.stats(), _reference_stats(stack, size), torch.float32, resized=True)
    state = uce_fast.MCAccumulator(size, align_corners=False, backend="torch", store="state")
    state.update(stack[0])
    assert state.nbytes == state_bytes


def test_state_memory_does_not_grow_with_beta():
    acc = uce_fast.MCAccumulator(backend="torch")
    held = []
    for sample in _samples((2, 19, 8, 8), 32, torch.float32, "cpu"):
        acc.update(sample)
        held.append(acc.nbytes)
    assert len(set(held)) == 1 and held[0] == (2 * 19 + 1) * 2 * 64 * 4


def test_capacity_preallocates_and_is_enforced():
    stack = _samples((1, 3, 4, 4), 3, torch.float32, "cpu")
    acc = uce_fast.MCAccumulator((8, 8), align_corners=False, backend="torch", capacity=3)
    acc.update(stack[0])
    assert acc.nbytes == 3 * 3 * 16 * 4
    acc.update_stack(stack[1:])
    _assert_stats(acc.stats(), _reference_stats(stack, (8, 8)), torch.float32, resized=True)
    with pytest.raises(ValueError, match="capacity=3"):
        acc.update(stack[0])


def test_reset_and_reuse():
    acc = uce_fast.MCAccumulator(backend="torch")
    acc.update_stack(_samples((1, 3, 5), 3, torch.float32, "cpu"))
    acc.reset()
    assert acc.count == 0 and acc.shape is None and acc.nbytes == 0
    stack = _samples((2, 4, 6), 3, torch.float32, "cpu", seed=1)
    acc.update_stack(stack)
    assert_close(acc.sigma(), _reference_stats(stack).sigma)


def test_update_does_not_alias_the_caller_tensor():
    stack = _samples((1, 3, 4, 4), 3, torch.float32, "cpu")
    acc = uce_fast.MCAccumulator((8, 8), align_corners=False, backend="torch", store="samples")
    for sample in stack.clone():
        acc.update(sample)
        sample.fill_(100.0)  # the caller reuses its buffer
    assert_close(acc.sigma(), _reference_stats(stack, (8, 8)).sigma)


# ----------------------------------------------------------------------------------- mc_stats

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [s for s in FULL_SHAPES if s[1] <= 150], ids=_ids)
def test_mc_stats_of_a_stack(backend, dtype, shape):
    batch, classes, spatial, beta = shape
    stack = _samples((batch, classes, *spatial), beta, dtype, device_of(backend), seed=1)
    stats = uce_fast.mc_stats(stack, backend=backend)
    assert stats.mean_probs.shape == (batch, classes, *spatial)
    assert all(t.shape == (batch, *spatial) for t in stats[1:])
    _assert_stats(stats, _reference_stats(stack), dtype, resized=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("align_corners", [False, True], ids=["ac0", "ac1"])
def test_mc_stats_of_a_low_resolution_stack_and_of_an_accumulator(backend, align_corners):
    stack = _samples((2, 19, 6, 5), 6, torch.float32, device_of(backend), seed=2)
    size = (21, 19)
    ref = _reference_stats(stack, size, align_corners)
    stats = uce_fast.mc_stats(stack, size=size, align_corners=align_corners, backend=backend)
    _assert_stats(stats, ref, torch.float32, resized=True)
    acc = uce_fast.MCAccumulator(size, align_corners=align_corners, backend=backend,
                                 store="state")
    acc.update_stack(stack)
    _assert_stats(uce_fast.mc_stats(acc), ref, torch.float32, resized=True)
    sigma = uce_fast.predictive_uncertainty(stack, size=size, align_corners=align_corners,
                                            backend=backend)
    assert_close(sigma, ref.sigma, dtype=torch.float32, scale=5)


def test_mc_stats_definitions_in_float64():
    """BALD and the predictive entropy from their definitions, independently of the reference's
    formulation."""
    stack = _samples((1, 4, 3, 3), 5, torch.float64, "cpu")
    probs = torch.softmax(stack, dim=2)
    mean = probs.mean(0)
    entropy = -(mean * mean.log()).sum(1)
    expected_mean_entropy = (-(probs * probs.log()).sum(2)).mean(0)
    stats = uce_fast.mc_stats(stack, backend="torch")
    assert_close(stats.entropy, entropy)
    assert_close(stats.mutual_info, entropy - expected_mean_entropy)
    assert_close(stats.sigma, probs.std(0).gather(1, mean.argmax(1, keepdim=True)).squeeze(1))


# --------------------------------------------------------------------------------- in the loss

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("resized", [False, True], ids=["full", "low"])
def test_loss_with_an_accumulator_equals_the_stack(backend, dtype, resized):
    device = device_of(backend)
    batch, classes, size = 2, 19, (16, 12)
    low = (4, 3) if resized else size
    stack = _samples((batch, classes, *low), 5, dtype, device, seed=4)
    gen = torch.Generator().manual_seed(5)
    input = (torch.randn(batch, classes, *size, generator=gen) * 2).to(device, dtype)
    target = torch.randint(0, classes, (batch, *size), generator=gen).to(device)
    target[:, :2] = 255
    acc = uce_fast.MCAccumulator(size if resized else None, align_corners=True, backend=backend)
    for sample in stack:
        acc.update(sample)
    options = dict(ignore_index=255, alpha=4.0, backend=backend)
    loss, grad = loss_and_grad(lambda x: uce_fast.uce_loss(x, target, acc, **options), input)
    full = reference.resample(stack, size, True)
    ref_loss, ref_grad = loss_and_grad(
        lambda x: uce_fast.uce_loss(x.float(), target, full.float(), ignore_index=255, alpha=4.0,
                                    backend="torch"), input)
    tol = dtype if resized else torch.float32
    assert_close(loss, ref_loss, dtype=tol, scale=5, msg="loss")
    assert_close(grad.float(), ref_grad.float(), dtype=dtype, scale=5, msg="grad")
    module = uce_fast.UCELoss(alpha=4.0, ignore_index=255, backend=backend, align_corners=True)
    assert_close(module(input, target, acc), loss, dtype=torch.float32)
    # A low-resolution stack passed directly is upsampled inside the kernels.
    if resized:
        assert_close(module(input, target, stack), loss, dtype=torch.float32)


# ------------------------------------------------------------------------------------- errors

def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="size must be None or"):
        uce_fast.MCAccumulator((4,))
    with pytest.raises(ValueError, match="store must be one of"):
        uce_fast.MCAccumulator(store="stack")
    with pytest.raises(TypeError, match="align_corners must be a bool"):
        uce_fast.MCAccumulator(align_corners=1)
    with pytest.raises(ValueError, match="capacity must be"):
        uce_fast.MCAccumulator(capacity=0)
    acc = uce_fast.MCAccumulator(backend="torch")
    with pytest.raises(TypeError, match=r"logits must be a torch\.Tensor"):
        acc.update([1.0])
    with pytest.raises(TypeError, match="logits must be a floating"):
        acc.update(torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="samples must have shape \\(S, B, C"):
        acc.update_stack(torch.zeros(0, 2, 3))
    acc.update(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="needs β >= 2 samples"):
        acc.sigma()
    with pytest.raises(ValueError, match=r"shape \(B, C, \*spatial\) = \(2, 3, 4\)"):
        acc.update(torch.zeros(2, 3, 5))
    with pytest.raises(TypeError, match=r"dtype torch\.float32"):
        acc.update(torch.zeros(2, 3, 4, dtype=torch.float64))
    acc.update(torch.ones(2, 3, 4))
    with pytest.raises(ValueError, match="correction must be in"):
        acc.sigma(2)
    with pytest.raises(ValueError, match="two spatial dims"):
        uce_fast.MCAccumulator((4, 4)).update(torch.zeros(1, 3, 2, 2, 2))
    with pytest.raises(ValueError, match="size must be None for an MCAccumulator"):
        uce_fast.mc_stats(acc, size=(4, 4))
    with pytest.raises(ValueError, match="MCAccumulator\\) must have shape"):
        uce_fast.uce_loss(torch.zeros(2, 3, 5), torch.zeros(2, 5, dtype=torch.int64), acc)
    with pytest.raises(ValueError, match="or \\(β, B, C, h, w\\)"):
        uce_fast.uce_loss(torch.zeros(2, 3, 5), torch.zeros(2, 5, dtype=torch.int64),
                          torch.zeros(2, 2, 3, 4))
    with pytest.raises(RuntimeError, match="backend='nope' cannot run"):
        uce_fast.MCAccumulator(backend="nope").update(torch.zeros(1, 2, 3))
