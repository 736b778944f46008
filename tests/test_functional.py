"""uce_loss and predictive_uncertainty: every backend against the reference and float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    ALL_BACKENDS,
    DTYPES,
    SMALL,
    assert_close,
    assert_matches_oracle,
    backend_params,
    device_of,
    loss_and_grad,
    make_case,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import uce_fast
from uce_fast import reference
from uce_fast.testing import uce_oracle

BACKENDS = backend_params()

# (B, C, spatial, β): every class count of the brief, odd sizes, 0-3 spatial dims.
SHAPES = [
    (2, 2, (7, 5), 2),
    (2, 3, (33,), 3),
    (2, 19, (9, 11), 10),
    (1, 19, (), 3),
    (5, 19, (), 2),
    (2, 150, (5, 7), 3),
    (1, 1000, (13,), 2),
    (2, 5, (3, 4, 5), 3),
    (1, 19, (67, 65), 10),
]
if SMALL:  # every class count, β and rank above, without the one large image
    SHAPES = [shape for shape in SHAPES if shape != (1, 19, (67, 65), 10)]


def _ids(shape):
    batch, classes, spatial, beta = shape
    return f"B{batch}-C{classes}-S{'x'.join(map(str, spatial)) or 'none'}-beta{beta}"


def _run(backend, input, target, samples=None, grad_out=None, **options):
    return loss_and_grad(
        lambda x: uce_fast.uce_loss(x, target, samples, backend=backend, **options), input,
        grad_out)


def _reference(input, target, samples=None, grad_out=None, dtype=torch.float32, **options):
    """The "torch" backend on the same values upcast to ``dtype``; grad in input's dtype."""
    return loss_and_grad(
        lambda x: uce_fast.uce_loss(x.to(dtype), target,
                                    None if samples is None else samples.to(dtype),
                                    backend="torch", **options),
        input, grad_out)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_float64_oracle(backend, dtype, shape, reduction):
    """Every backend, the "torch" reference included, against U-CE written from its definition
    in float64 (uce_fast.testing): no code in common with any backend."""
    batch, classes, spatial, beta = shape
    input, target, samples = make_case(batch, classes, spatial, beta, dtype=dtype,
                                       device=device_of(backend), seed=classes + beta)
    grad_out = None
    if reduction == "none":  # an upstream gradient that is not 1
        grad_out = torch.rand(target.shape, generator=torch.Generator().manual_seed(1)) + 0.5
        grad_out = grad_out.to(target.device)
    loss, grad = _run(backend, input, target, samples, grad_out, reduction=reduction)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert_matches_oracle(loss, grad, input, target, samples, grad_out, reduction=reduction)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weighted", [False, True], ids=["no-weight", "weight"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("avg_non_ignore", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_options(backend, weighted, label_smoothing, avg_non_ignore, reduction):
    device = device_of(backend)
    input, target, samples = make_case(2, 19, (17, 9), 4, ignore_index=255, device=device,
                                       ignore_frac=0.5)
    weight = torch.rand(19, generator=torch.Generator().manual_seed(3)).to(device) + 0.1
    options = dict(weight=weight if weighted else None, label_smoothing=label_smoothing,
                   avg_non_ignore=avg_non_ignore, reduction=reduction, ignore_index=255,
                   alpha=3.0)
    loss, grad = _run(backend, input, target, samples, **options)
    ref_loss, ref_grad = _reference(input, target, samples, dtype=torch.float64, **options)
    assert_close(loss, ref_loss.float(), dtype=torch.float32, scale=5)
    assert_close(grad, ref_grad.float(), dtype=torch.float32, scale=5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("spatial", [(), (31,), (9, 7), (3, 4, 5)], ids=str)
@pytest.mark.parametrize("options", [
    dict(),
    dict(reduction="sum"),
    dict(reduction="none"),
    dict(ignore_index=3, label_smoothing=0.2),
    dict(weight="random", reduction="mean"),
    dict(weight="random", label_smoothing=0.05, reduction="none"),
], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_alpha_zero_is_cross_entropy(backend, dtype, spatial, options):
    device = device_of(backend)
    options = dict(options)
    if options.get("weight") == "random":
        options["weight"] = torch.rand(7, generator=torch.Generator().manual_seed(0)).to(device)
    ignore_index = options.get("ignore_index", -100)
    input, target, samples = make_case(3, 7, spatial, 3, dtype=dtype, device=device,
                                       ignore_index=ignore_index)
    loss, grad = _run(backend, input, target, samples, alpha=0.0, **options)
    ce_loss, ce_grad = loss_and_grad(lambda x: F.cross_entropy(x.float(), target, **options),
                                     input)
    assert_close(loss, ce_loss, msg="loss vs F.cross_entropy")
    assert_close(grad, ce_grad, msg="grad vs F.cross_entropy")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weighted", [False, True], ids=["no-weight", "weight"])
def test_all_ignored_matches_cross_entropy(backend, weighted):
    device = device_of(backend)
    input, target, samples = make_case(2, 5, (6, 3), 3, device=device, ignore_frac=1.1)
    weight = torch.rand(5).to(device) if weighted else None
    for reduction in ("mean", "sum", "none"):
        loss, grad = _run(backend, input, target, samples, reduction=reduction, weight=weight)
        _, ce_grad = loss_and_grad(
            lambda x, r=reduction: F.cross_entropy(x, target, reduction=r, weight=weight), input)
        if reduction == "mean":
            assert torch.isnan(loss), "mean over no pixel is 0/0, as in F.cross_entropy"
        else:
            assert torch.count_nonzero(loss) == 0
        assert torch.equal(grad, torch.zeros_like(grad)), "ignored pixels get exactly 0 grad"
        assert torch.equal(grad, ce_grad)


def _max_rel_error(actual: torch.Tensor, exact: torch.Tensor) -> float:
    """Largest absolute error relative to the largest exact magnitude."""
    return ((actual.double() - exact).abs().max() / exact.abs().max()).item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shift", [0.0, 30.0, 1e3, 1e4])
@pytest.mark.parametrize("source", ["sigma", "samples"])
def test_shifted_logits_keep_their_precision(backend, shift, source):
    """Adding a constant to every logit leaves the softmax unchanged: the loss and the gradient
    (float32, against float64 on the same values) stay as precise as F.cross_entropy's own
    float32 gradient at that shift, within a factor 2."""
    device = device_of(backend)
    input, target, samples = make_case(2, 19, (64,), 3, device=device)
    x = (input.detach() + shift).float()
    samples = samples + shift
    sigma = torch.rand(target.shape, generator=torch.Generator().manual_seed(1)).to(device) * 0.3
    extra = {"sigma": sigma} if source == "sigma" else {"samples": samples}
    grad_out = torch.rand(target.shape, generator=torch.Generator().manual_seed(2)).to(device)
    grad_out = grad_out + 0.5
    loss, grad = loss_and_grad(
        lambda t: uce_fast.uce_loss(t, target, alpha=2.0, reduction="none", backend=backend,
                                    **extra), x, grad_out)
    exact_extra = {k: v.double() for k, v in extra.items()}
    exact_loss, exact_grad = loss_and_grad(
        lambda t: uce_fast.uce_loss(t, target, alpha=2.0, reduction="none", backend="torch",
                                    **exact_extra), x.double(), grad_out)
    assert_close(loss, exact_loss.float(), dtype=torch.float32, msg="loss")
    _, ce_grad = loss_and_grad(lambda t: F.cross_entropy(t, target, reduction="none"), x,
                               grad_out)
    _, ce_exact = loss_and_grad(lambda t: F.cross_entropy(t, target, reduction="none"),
                                x.double(), grad_out)
    error, ce_error = _max_rel_error(grad, exact_grad), _max_rel_error(ce_grad, ce_exact)
    assert error <= 2 * ce_error, f"gradient error {error:.2e} vs F.cross_entropy {ce_error:.2e}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("source", ["sigma", "samples"])
def test_ignored_pixels_with_non_finite_weight_give_exact_zeros(backend, source):
    """An ignored pixel whose sigma (so its weight) or logits are NaN/inf adds 0 to the loss and
    gets exactly 0 gradient on every backend; the other pixels are untouched by it."""
    device = device_of(backend)
    input, target, samples = make_case(2, 5, (8,), 3, device=device, ignore_frac=0.0)
    ignored = [(0, 1), (0, 4), (1, 0), (1, 7)]
    for b, n in ignored:
        target[b, n] = -100
    sigma = torch.rand(target.shape, device=device)
    bad = (float("nan"), float("inf"), -3.0, float("-inf"))  # -3: (1 - 3)^2.5 is NaN
    for (b, n), value in zip(ignored, bad, strict=True):
        sigma[b, n] = value
        samples[:, b, :, n] = value
    x = input.detach().clone()
    x[0, :, 1] = float("nan")  # non-finite logits on an ignored pixel too
    x[1, 2, 7] = float("inf")
    extra = {"sigma": sigma} if source == "sigma" else {"samples": samples}
    valid = target != -100
    for reduction in ("none", "sum"):
        loss, grad = loss_and_grad(
            lambda t, r=reduction: uce_fast.uce_loss(t, target, alpha=2.5, reduction=r,
                                                     label_smoothing=0.1, backend=backend,
                                                     **extra), x)
        assert torch.isfinite(loss).all(), reduction
        assert torch.equal(grad.transpose(0, 1)[:, ~valid],
                           torch.zeros_like(grad.transpose(0, 1)[:, ~valid]))
        assert torch.isfinite(grad).all()
        if reduction == "none":
            assert torch.equal(loss[~valid], torch.zeros_like(loss[~valid]))
    # The valid pixels equal a run where the ignored pixels hold ordinary values.
    clean = {"sigma": torch.where(valid, sigma, 0.5)} if source == "sigma" else {
        "samples": torch.where(valid.unsqueeze(1), samples, 0.5)}
    want = uce_fast.uce_loss(input.detach(), target, alpha=2.5, reduction="none",
                             label_smoothing=0.1, backend=backend, **clean)
    got = uce_fast.uce_loss(x, target, alpha=2.5, reduction="none", label_smoothing=0.1,
                            backend=backend, **extra)
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_heavy_ignore_sum_of_nothing_but_ignored_rows(backend):
    input, target, samples = make_case(2, 19, (41, 3), 3, device=device_of(backend),
                                       ignore_frac=0.95, ignore_index=255)
    per_pixel = uce_fast.uce_loss(input, target, samples, ignore_index=255, reduction="none",
                                  backend=backend)
    assert torch.all(per_pixel[target == 255] == 0)
    assert torch.all(per_pixel[target != 255] > 0)
    loss, grad = _run(backend, input, target, samples, ignore_index=255)
    ref_loss, ref_grad = _reference(input, target, samples, ignore_index=255)
    assert_close(loss, ref_loss)
    assert_close(grad, ref_grad)
    ignored = (target == 255).unsqueeze(1).expand_as(grad)
    assert torch.count_nonzero(grad[ignored]) == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["channels_last", "transposed", "sliced"])
def test_non_contiguous_inputs(backend, layout):
    device = device_of(backend)
    input, target, samples = make_case(2, 6, (10, 13), 3, device=device)
    if layout == "channels_last":
        x = input.detach().contiguous(memory_format=torch.channels_last)
        s = samples.contiguous(memory_format=torch.channels_last_3d)
        t = target
    elif layout == "transposed":
        x = input.detach().transpose(2, 3).contiguous().transpose(2, 3)
        s = samples.transpose(3, 4).contiguous().transpose(3, 4)
        t = target.transpose(1, 2).contiguous().transpose(1, 2)
    else:
        big, _, big_samples = make_case(2, 9, (20, 13), 3, device=device)
        big_target = make_case(2, 6, (20, 13), 3, device=device)[1]
        x = big.detach()[:, 1:7, ::2]
        s = big_samples[:, :, 1:7, ::2]
        t = big_target[:, ::2]
    assert not x.is_contiguous() and not s.is_contiguous()
    loss, grad = _run(backend, x, t, s, reduction="none")
    ref_loss, ref_grad = _reference(x.contiguous(), t.contiguous(), s.contiguous(),
                                    reduction="none")
    assert_close(loss, ref_loss)
    assert_close(grad, ref_grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sample_dtype", DTYPES, ids=str)
def test_sample_dtype_independent_of_input(backend, sample_dtype):
    input, target, samples = make_case(2, 19, (21,), 4, dtype=torch.bfloat16,
                                       sample_dtype=sample_dtype, device=device_of(backend))
    loss, grad = _run(backend, input, target, samples)
    ref_loss, ref_grad = _reference(input, target, samples)
    assert_close(loss, ref_loss)
    assert_close(grad, ref_grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alpha", [0.0, 1.0, 10.0, -2.0])
def test_sigma_argument_equals_samples(backend, alpha):
    input, target, samples = make_case(2, 19, (8, 7), 5, device=device_of(backend))
    sigma = uce_fast.predictive_uncertainty(samples, backend=backend)
    from_sigma, grad_sigma = loss_and_grad(
        lambda x: uce_fast.uce_loss(x, target, sigma=sigma, alpha=alpha, backend=backend), input)
    from_samples, grad_samples = _run(backend, input, target, samples, alpha=alpha)
    assert_close(from_sigma, from_samples)
    assert_close(grad_sigma, grad_samples)
    ref_loss, ref_grad = loss_and_grad(
        lambda x: uce_fast.uce_loss(x, target, sigma=sigma.double(), alpha=alpha,
                                    backend="torch"), input.double())
    assert_close(from_sigma, ref_loss.float(), dtype=torch.float32, scale=5)
    assert_close(grad_sigma, ref_grad.float(), dtype=torch.float32, scale=5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_flows_to_input_only(backend):
    input, target, samples = make_case(2, 4, (5,), 3, device=device_of(backend))
    samples.requires_grad_(True)
    sigma = uce_fast.predictive_uncertainty(samples.detach()).requires_grad_(True)
    uce_fast.uce_loss(input, target, samples, backend=backend).backward()
    uce_fast.uce_loss(input, target, sigma=sigma, backend=backend).backward()
    assert input.grad is not None and samples.grad is None and sigma.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_uncertainty_weight_changes_loss(backend):
    """Pixels with uncertain samples weigh more: U-CE at alpha=10 exceeds plain CE."""
    input, target, samples = make_case(2, 19, (12, 12), 6, device=device_of(backend))
    uce = uce_fast.uce_loss(input, target, samples, alpha=10.0, reduction="none", backend=backend)
    ce = F.cross_entropy(input.detach().float(), target, reduction="none")
    sigma = uce_fast.predictive_uncertainty(samples, backend=backend)
    valid = target != -100
    assert torch.all(sigma[valid] > 0)
    assert_close(uce[valid], (ce * (1 + sigma) ** 10)[valid])
    assert torch.all(uce[valid] > ce[valid])


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    input, target, samples = make_case(0, 19, (4, 4), 3, device=device_of(backend))
    loss = uce_fast.uce_loss(input, target, samples, reduction="none", backend=backend)
    assert loss.shape == (0, 4, 4)
    total = uce_fast.uce_loss(input, target, samples, reduction="sum", backend=backend)
    total.backward()
    assert total.item() == 0 and input.grad.shape == input.shape


@pytest.mark.slow
@pytest.mark.skipif(SMALL, reason="UCE_FAST_TEST_SMALL=1: small shapes only")
@pytest.mark.parametrize("backend", BACKENDS)
def test_benchmark_shape(backend):
    """The benchmark's shape (β=10, B=2, C=19, 256²) against the float64 oracle."""
    input, target, samples = make_case(2, 19, (256, 256), 10, device=device_of(backend),
                                       ignore_index=255, ignore_frac=0.1)
    loss, grad = _run(backend, input, target, samples, ignore_index=255)
    assert_matches_oracle(loss, grad, input, target, samples, ignore_index=255)


# ---------------------------------------------------------------- predictive_uncertainty


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("correction", [0, 1])
def test_predictive_uncertainty(backend, dtype, shape, correction):
    batch, classes, spatial, beta = shape
    _, _, samples = make_case(batch, classes, spatial, beta, dtype=dtype,
                              device=device_of(backend), seed=beta)
    sigma, pred = uce_fast.predictive_uncertainty(samples, correction, backend=backend,
                                                  return_prediction=True)
    assert sigma.dtype == torch.float32 and pred.dtype == torch.int64
    assert sigma.shape == pred.shape == (batch, *spatial)
    ref_sigma, ref_pred = reference.mc_uncertainty(samples.double(), correction)
    assert torch.equal(pred.cpu(), ref_pred.cpu())
    assert_close(sigma, ref_sigma.float(), dtype=torch.float32, scale=5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shift", [1e3, 1e4])
@pytest.mark.parametrize("classes", [19, 150])
def test_shifted_samples_keep_sigma(backend, shift, classes):
    """Samples shifted by a large constant (float32 values, ulp(1e4) ≈ 1e-3): each sample's
    softmax is normalised with its max and sum apart, so sigma and the loss stay float32-exact
    against float64 on the same values. A single float32 log-sum-exp would carry the shift's
    rounding (~5e-4) into every probability and miss sigma by ~1e-4 absolute."""
    device = device_of(backend)
    input, target, samples = make_case(2, classes, (64,), 10, device=device, seed=5)
    samples = samples + shift
    sigma = uce_fast.predictive_uncertainty(samples, backend=backend)
    loss = uce_fast.uce_loss(input.detach(), target, samples, reduction="none",
                             backend=backend)
    ref = uce_oracle(input.cpu(), target.cpu(), samples.cpu(), got_loss=loss.cpu(),
                     reduction="none")
    assert_close(sigma.cpu(), ref.sigma.float(), dtype=torch.float32, scale=5, msg="sigma")
    assert_close(loss.cpu(), ref.loss.float(), dtype=torch.float32, scale=5, msg="loss")


@pytest.mark.parametrize("backend", BACKENDS)
def test_predicted_class_is_first_maximum(backend):
    samples = torch.zeros(3, 2, 7, 5, device=device_of(backend))
    samples[:, 1, 4] = 2.0
    samples[:, 1, 2] = 2.0  # tie between classes 2 and 4: the first wins
    sigma, pred = uce_fast.predictive_uncertainty(samples, backend=backend,
                                                  return_prediction=True)
    assert pred[0].tolist() == [0] * 5 and pred[1].tolist() == [2] * 5
    assert torch.count_nonzero(sigma) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_low_variance_samples_keep_their_signal(backend):
    """Samples that agree to 1e-4 logits: a float32 sum of squares loses sigma entirely."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(2, 19, 64, generator=gen)
    base[:, 3] += 4.0  # a confident class, p ≈ 0.8
    samples = base + 1e-4 * torch.randn(10, 2, 19, 64, generator=gen)
    exact, pred = reference.mc_uncertainty(samples.double())
    sigma = uce_fast.predictive_uncertainty(samples.to(device_of(backend)), backend=backend)
    assert exact.max() < 1e-4
    # float32 probabilities near 0.8 carry ~1e-8 absolute error: 2% of sigma ≈ 1e-5.
    torch.testing.assert_close(sigma.cpu().double(), exact, rtol=2e-2, atol=0.0)
    # The naive float32 formula misses by ~100%: the test can tell the two apart.
    probs = torch.softmax(samples, dim=2)
    mean_sq = ((probs * probs).mean(0) - probs.mean(0) ** 2).clamp_min(0) * 10 / 9
    naive = mean_sq.sqrt().gather(1, pred.unsqueeze(1)).squeeze(1).double()
    assert ((naive - exact).abs() / exact).median() > 0.5


# ---------------------------------------------------------------- property-based parity

@pytest.mark.parametrize("backend", backend_params([b for b in ALL_BACKENDS if b != "torch"]))
@settings(max_examples=20 if SMALL else 60, deadline=None, derandomize=True)
@given(
    batch=st.integers(1, 3), classes=st.integers(2, 40), beta=st.integers(2, 6),
    spatial=st.lists(st.integers(1, 9), min_size=0, max_size=3).map(tuple),
    dtype=st.sampled_from(DTYPES), ignore_frac=st.sampled_from([0.0, 0.3, 1.0]),
    weighted=st.booleans(), label_smoothing=st.sampled_from([0.0, 0.1, 1.0]),
    alpha=st.sampled_from([0.0, 1.0, 10.0]), correction=st.sampled_from([0, 1]),
    reduction=st.sampled_from(["mean", "sum", "none"]), avg_non_ignore=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_problems_match_reference(backend, batch, classes, beta, spatial, dtype,
                                         ignore_frac, weighted, label_smoothing, alpha,
                                         correction, reduction, avg_non_ignore, seed):
    input, target, samples = make_case(batch, classes, spatial, beta, dtype=dtype,
                                       ignore_frac=ignore_frac, device=device_of(backend),
                                       seed=seed)
    weight = (torch.rand(classes, generator=torch.Generator().manual_seed(seed)) + 0.1
              if weighted else None)
    options = dict(weight=None if weight is None else weight.to(input.device),
                   label_smoothing=label_smoothing, alpha=alpha, correction=correction,
                   reduction=reduction, avg_non_ignore=avg_non_ignore)
    loss, grad = _run(backend, input, target, samples, **options)
    assert_matches_oracle(loss, grad, input, target, samples, **options)
