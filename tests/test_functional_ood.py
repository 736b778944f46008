"""Entropy maximisation in uce_loss (ood_index, ood_weight): every backend against the float64
oracle, against the paper's loss written here in plain PyTorch, and its exact reductions to the
loss without it."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import (
    DTYPES,
    SMALL,
    assert_close,
    assert_matches_oracle,
    backend_params,
    device_of,
    loss_and_grad,
    make_case,
)

import uce_fast

BACKENDS = backend_params()
OOD = 254
IGNORE = 255

# (B, C, spatial, β): the register path, the class-chunked one (150) and no spatial dims.
SHAPES = [
    (2, 3, (11, 7), 2),
    (2, 19, (9, 13), 10),
    (3, 19, (), 3),
    (1, 150, (5, 9), 3),
    (2, 5, (3, 4, 5), 3),
]
if not SMALL:
    SHAPES.append((1, 19, (67, 65), 10))


def _ids(shape):
    batch, classes, spatial, beta = shape
    return f"B{batch}-C{classes}-S{'x'.join(map(str, spatial)) or 'none'}-beta{beta}"


def _with_ood(target: torch.Tensor, frac: float = 0.25, seed: int = 5) -> torch.Tensor:
    """``target`` with a random share ``frac`` of its pixels relabelled OOD."""
    gen = torch.Generator().manual_seed(seed)
    pick = (torch.rand(target.shape, generator=gen) < frac).to(target.device)
    return torch.where(pick, torch.full_like(target, OOD), target)


def _case(batch, classes, spatial, beta, *, dtype=torch.float32, device="cpu", seed=0,
          ood_frac=0.25):
    input, target, samples = make_case(batch, classes, spatial, beta, dtype=dtype,
                                       ignore_index=IGNORE, device=device, seed=seed)
    return input, _with_ood(target, ood_frac, seed + 1), samples


def _run(backend, input, target, samples=None, grad_out=None, **options):
    return loss_and_grad(
        lambda x: uce_fast.uce_loss(x, target, samples, backend=backend,
                                    ignore_index=IGNORE, **options), input, grad_out)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ood_weight", [0.5, 0.9])
def test_matches_float64_oracle(backend, dtype, shape, reduction, ood_weight):
    """U-CE with entropy maximisation against the float64 oracle (uce_fast.testing), which writes
    the OoD term from its definition."""
    batch, classes, spatial, beta = shape
    input, target, samples = _case(batch, classes, spatial, beta, dtype=dtype,
                                   device=device_of(backend), seed=classes + beta)
    grad_out = None
    if reduction == "none":
        grad_out = (torch.rand(target.shape, generator=torch.Generator().manual_seed(1))
                    + 0.5).to(target.device)
    options = dict(reduction=reduction, ood_index=OOD, ood_weight=ood_weight,
                   ignore_index=IGNORE)
    loss, grad = loss_and_grad(
        lambda x: uce_fast.uce_loss(x, target, samples, backend=backend, **options), input,
        grad_out)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert_matches_oracle(loss, grad, input, target, samples, grad_out, **options)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weighted", [False, True], ids=["no-weight", "weight"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("avg_non_ignore", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("form", ["samples", "sigma", "low-res"])
def test_options(backend, weighted, label_smoothing, avg_non_ignore, reduction, form):
    """Class weights, smoothing, both means and every reduction, with a stack, a given sigma
    and a low-resolution stack; against the float64 "torch" backend."""
    device = device_of(backend)
    input, target, samples = _case(2, 19, (16, 12), 4, device=device)
    options = dict(
        weight=(torch.rand(19, generator=torch.Generator().manual_seed(3)) + 0.1).to(device)
        if weighted else None,
        label_smoothing=label_smoothing, avg_non_ignore=avg_non_ignore, reduction=reduction,
        alpha=3.0, ood_index=OOD, ood_weight=0.8)
    extra = {}
    if form == "sigma":
        extra = dict(sigma=uce_fast.predictive_uncertainty(samples, backend="torch"))
        samples = None
    elif form == "low-res":
        samples = samples[..., ::4, ::4].contiguous()
        options["align_corners"] = True
    loss, grad = _run(backend, input, target, samples, **options, **extra)
    ref_loss, ref_grad = loss_and_grad(
        lambda x: uce_fast.uce_loss(
            x.double(), target, None if samples is None else samples.double(), backend="torch",
            ignore_index=IGNORE, **options,
            **{k: v.double() for k, v in extra.items()}), input)
    assert_close(loss, ref_loss.float(), dtype=torch.float32, scale=5)
    assert_close(grad, ref_grad.float(), dtype=torch.float32, scale=5)


def _paper_loss(logits: torch.Tensor, target: torch.Tensor, lam: float) -> torch.Tensor:
    """Entropy maximisation as Chan, Rottmann & Gottschalk (ICCV 2021) write it, in float64:
    every pixel's target distribution is (1 - λ)·onehot(y) for an in-distribution pixel,
    λ·uniform for an OoD one and 0 for an ignored one, and the loss is the mean over all pixels
    and classes of -target·log p (their released code's ``cross_entropy`` of
    ``encode_target``'s targets), i.e. ((1 - λ) Σ_in CE + λ Σ_out -(1/C) Σ_c log p_c) / (N C)."""
    classes = logits.shape[1]
    logp = torch.log_softmax(logits.double(), dim=1)
    known = (target >= 0) & (target < classes)
    onehot = torch.nn.functional.one_hot(torch.where(known, target, 0), classes).movedim(-1, 1)
    dist = torch.where(known.unsqueeze(1), (1.0 - lam) * onehot.double(), 0.0)
    dist = torch.where((target == OOD).unsqueeze(1), lam / classes, dist)
    return (-dist * logp).mean()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("spatial", [(), (31,), (9, 7)], ids=str)
@pytest.mark.parametrize("lam", [0.25, 0.9])
def test_alpha_zero_is_the_papers_entropy_maximisation(backend, dtype, spatial, lam):
    """With α = 0 (and no samples needed) the loss is the paper's, value and gradient: its mean
    over all pixels and classes is ours with ``avg_non_ignore=False`` times (1 - λ) / C, and
    ours with the default mean divides the same sum by (1 - λ)·#known + λ·#OoD."""
    device = device_of(backend)
    input, target, _ = _case(3, 7, spatial, 2, dtype=dtype, device=device, seed=4, ood_frac=0.3)
    target = target.to(device)
    known = int(((target >= 0) & (target < 7)).sum())
    ood = int((target == OOD).sum())
    assert known and ood
    options = dict(alpha=0.0, ood_index=OOD, ood_weight=lam)
    ref, ref_grad = loss_and_grad(lambda x: _paper_loss(x, target, lam), input)

    loss, grad = _run(backend, input, target, avg_non_ignore=False, **options)
    factor = (1.0 - lam) / 7
    assert_close(loss * factor, ref.float(), dtype=torch.float32)
    assert_close(grad * factor, ref_grad.to(dtype), dtype=dtype)

    loss, grad = _run(backend, input, target, **options)
    mean_factor = ((1.0 - lam) * known + lam * ood) / (target.numel() * 7)
    assert_close(loss * mean_factor, ref.float(), dtype=torch.float32)
    assert_close(grad * mean_factor, ref_grad.to(dtype), dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True], ids=["no-weight", "weight"])
def test_lambda_zero_or_no_ood_pixels_is_the_loss_without_it(backend, reduction, weighted):
    """λ = 0 gives exactly the loss with the OoD pixels ignored; no OoD pixels give exactly the
    loss without ``ood_index``; bit for bit, value and gradient."""
    device = device_of(backend)
    input, target, samples = _case(2, 19, (9, 13), 5, device=device)
    weight = torch.rand(19, device=device) + 0.1 if weighted else None
    options = dict(reduction=reduction, weight=weight, label_smoothing=0.1)
    ignored = torch.where(target == OOD, torch.full_like(target, IGNORE), target)

    got = _run(backend, input, target, samples, ood_index=OOD, ood_weight=0.0, **options)
    want = _run(backend, input, ignored, samples, **options)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)

    got = _run(backend, input, ignored, samples, ood_index=OOD, ood_weight=0.9, **options)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ood_pixels_get_no_uncertainty_factor(backend):
    """At OoD pixels the loss is λ/(1-λ) times the uniform CE whatever sigma is; at known pixels
    it is (1 + sigma)^α times the CE."""
    device = device_of(backend)
    input, target, _ = _case(2, 5, (6, 7), 2, device=device)
    sigma = torch.rand(target.shape, device=device)
    loss = uce_fast.uce_loss(input, target, sigma=sigma, alpha=2.0, reduction="none",
                             ignore_index=IGNORE, ood_index=OOD, ood_weight=0.75,
                             backend=backend).detach()
    logp = torch.log_softmax(input.detach().double(), dim=1)
    ood = target == OOD
    uniform = -logp.mean(dim=1)
    torch.testing.assert_close(loss[ood].double(), 3.0 * uniform[ood], rtol=1e-5, atol=1e-6)
    known = (target >= 0) & (target < 5)
    ce = -logp.gather(1, torch.where(known, target, 0).unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(loss[known].double(),
                               ((1 + sigma.double()) ** 2 * ce)[known], rtol=1e-5, atol=1e-6)
    assert bool((loss[target == IGNORE] == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_unchecked_labels_keep_ood_pixels(backend):
    """With check_labels=False a bad label is an ignored pixel; an OoD label stays OoD."""
    device = device_of(backend)
    input, target, samples = _case(2, 7, (8, 9), 3, device=device)
    bad = target.clone()
    bad[0, 0, :3] = torch.tensor([7, -3, 1000])
    options = dict(ood_index=OOD, ood_weight=0.6, reduction="mean")
    got = _run(backend, input, bad, samples, check_labels=False, **options)
    ignored = bad.clone()
    ignored[0, 0, :3] = IGNORE
    want = _run(backend, input, ignored, samples, **options)
    assert_close(got[0], want[0])
    assert_close(got[1], want[1])
    with pytest.raises(ValueError, match=r"label 7, outside \[0, 7\) and neither ignore_index "
                                         r"\(255\) nor ood_index \(254\)"):
        _run(backend, input, bad, samples, **options)


@pytest.mark.parametrize(("options", "error", "pattern"), [
    (dict(ood_index=3), ValueError, r"ood_index must be a label outside the classes \[0, 7\)"),
    (dict(ood_index=IGNORE), ValueError, r"other than ignore_index \(255\)"),
    (dict(ood_index=1.5), TypeError, r"ood_index must be an int"),
    (dict(ood_index=OOD, ood_weight=1.0), ValueError, r"ood_weight must be a number in \[0, 1\)"),
    (dict(ood_index=OOD, ood_weight=-0.1), ValueError, r"ood_weight must be"),
    (dict(ood_index=OOD, ood_weight=math.nan), ValueError, r"ood_weight must be"),
    (dict(ood_weight=0.5), ValueError, r"give ood_index too"),
])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_arguments(backend, options, error, pattern):
    input, target, samples = _case(2, 7, (4, 3), 3, device=device_of(backend))
    with pytest.raises(error, match=pattern):
        uce_fast.uce_loss(input, target, samples, ignore_index=IGNORE, backend=backend,
                          **options)


@pytest.mark.parametrize("backend", backend_params(["cpu", "cuda", "triton"]))
def test_op_checks_ood_arguments(backend):
    """The ops themselves refuse an ood_index inside [0, C) and a negative or non-finite
    ood_scale (ood_index == ignore_index turns the feature off)."""
    from test_ops import _flat, _op

    device = device_of(backend)
    input, target, samples = _flat(*make_case(2, 7, (5, 3), 3, device=device))
    op = _op(backend, "uce_forward")
    with pytest.raises(ValueError, match="ood_index must be outside"):
        op(input, target, samples, None, None, 2.0, -100, 0.0, 1, True, 3, 1.0)
    for scale in (-1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="ood_scale must be a finite number"):
            op(input, target, samples, None, None, 2.0, -100, 0.0, 1, True, OOD, scale)
    off = op(input, target, samples, None, None, 2.0, -100, 0.0, 1, True, -100, 0.0)[0]
    assert torch.isfinite(off).all()


def test_module_passes_the_options():
    input, target, samples = _case(2, 7, (5, 6), 3)
    criterion = uce_fast.UCELoss(alpha=2.0, ignore_index=IGNORE, ood_index=OOD, ood_weight=0.7)
    assert "ood_index=254, ood_weight=0.7" in repr(criterion)
    want = uce_fast.uce_loss(input, target, samples, alpha=2.0, ignore_index=IGNORE,
                             ood_index=OOD, ood_weight=0.7)
    assert torch.equal(criterion(input, target, samples), want)
    # The paper's λ = 0.9 when only ood_index is given.
    default = uce_fast.UCELoss(alpha=2.0, ignore_index=IGNORE, ood_index=OOD)
    assert torch.equal(default(input, target, samples),
                       uce_fast.uce_loss(input, target, samples, alpha=2.0, ignore_index=IGNORE,
                                         ood_index=OOD, ood_weight=0.9))
    # alpha=0: no samples needed, plain CE on the known pixels.
    ce = uce_fast.UCELoss(alpha=0.0, ignore_index=IGNORE)
    known = torch.where(target == OOD, torch.full_like(target, IGNORE), target)
    torch.testing.assert_close(
        ce(input, known), torch.nn.functional.cross_entropy(input, known, ignore_index=IGNORE))


@pytest.mark.parametrize("backend", [*backend_params(["torch"]),
                                     *backend_params(["cpu", "cuda", "triton"])])
def test_compile_fullgraph(backend):
    torch._dynamo.reset()
    input, target, samples = _case(2, 19, (6, 5), 3, device=device_of(backend))

    def step(x, t, s):
        return uce_fast.uce_loss(x, t, s, alpha=4.0, ignore_index=IGNORE, ood_index=OOD,
                                 ood_weight=0.9, backend=backend)

    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    loss, grad = loss_and_grad(lambda x: compiled(x, target, samples), input)
    ref_loss, ref_grad = loss_and_grad(lambda x: step(x, target, samples), input)
    assert_close(loss, ref_loss)
    assert_close(grad, ref_grad)
