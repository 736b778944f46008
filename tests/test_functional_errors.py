"""Bad input gets a clear error naming the argument and what was expected, on every backend."""

from __future__ import annotations

import pytest
import torch
from helpers import backend_params, device_of, make_case

import uce_fast

BACKENDS = backend_params()


def _case(backend):
    return make_case(2, 5, (4, 3), 3, device=device_of(backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("label", [-1, 5, 255, 2**40])
def test_label_out_of_range(backend, label):
    input, target, samples = _case(backend)
    target[1, 2, 1] = label
    with pytest.raises(ValueError, match=rf"label {label}, outside \[0, 5\) and not ignore_index"):
        uce_fast.uce_loss(input, target, samples, backend=backend)
    # The process survives and the same call with a valid label works.
    target[1, 2, 1] = 0
    assert torch.isfinite(uce_fast.uce_loss(input, target, samples, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("source", ["samples", "sigma"])
def test_unchecked_bad_labels_are_ignored(backend, reduction, source):
    """check_labels=False: an invalid label neither raises nor reads out of bounds; the pixel
    counts exactly as ignore_index, also in the mean's denominator and the gradient."""
    input, target, samples = _case(backend)
    given = {"samples": samples} if source == "samples" else {
        "sigma": torch.rand(target.shape, device=target.device)}
    bad = target.clone()
    bad[0, 0, 0], bad[1, 2, 1], bad[1, 3, 2] = -1, 5, 2**40
    ignored = target.clone()
    ignored[0, 0, 0] = ignored[1, 2, 1] = ignored[1, 3, 2] = -100
    results = []
    for labels in (bad, ignored):
        x = input.detach().clone().requires_grad_(True)
        loss = uce_fast.uce_loss(x, labels, **given, reduction=reduction, backend=backend,
                                 check_labels=False)
        (grad,) = torch.autograd.grad(loss.sum(), x)
        results.append((loss, grad))
    (loss, grad), (want_loss, want_grad) = results
    assert torch.equal(loss, want_loss) and torch.equal(grad, want_grad)
    assert torch.count_nonzero(grad[1, :, 2, 1]) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_low_resolution_samples_need_align_corners(backend):
    input, target, _ = make_case(2, 5, (8, 12), 3, device=device_of(backend))
    low = torch.randn(3, 2, 5, 4, 6, device=input.device)
    with pytest.raises(ValueError, match=r"at 4x6 are resampled to size=\(8, 12\): give "
                                         r"align_corners= to match the model's own upsampling"):
        uce_fast.uce_loss(input, target, low, backend=backend)
    for ac in (True, False):
        assert torch.isfinite(uce_fast.uce_loss(input, target, low, align_corners=ac,
                                                backend=backend))


def test_label_check_under_compile_raises():
    input, target, samples = _case("torch")
    target[0, 1, 1] = 7
    compiled = torch.compile(lambda x, t, s: uce_fast.uce_loss(x, t, s, backend="torch"),
                             fullgraph=True)
    with pytest.raises(ValueError, match=r"label 7, outside \[0, 5\)"):
        compiled(input, target, samples)


@pytest.mark.parametrize("check_labels", [1, None, "no"])
def test_check_labels_must_be_a_bool(check_labels):
    input, target, samples = _case("torch")
    with pytest.raises(TypeError, match="check_labels must be a bool"):
        uce_fast.uce_loss(input, target, samples, check_labels=check_labels)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("mutate", "error", "pattern"), [
    (lambda a: a.update(samples=a["samples"][:1]), ValueError, r"β >= 2"),
    (lambda a: a.update(samples=a["samples"][:, :, :4]), ValueError, r"samples must have shape"),
    (lambda a: a.update(samples=a["samples"][0]), ValueError, r"samples must have shape"),
    (lambda a: a.update(target=a["target"][:, :3]), ValueError, r"target must have shape"),
    (lambda a: a.update(target=a["target"].int()), TypeError, r"target must be int64"),
    (lambda a: a.update(input=a["input"].detach().long()), TypeError, r"input must be float"),
    (lambda a: a.update(input=a["input"].detach()[0, 0, 0]), ValueError, r"input must have"),
    (lambda a: a.update(samples=a["samples"].long()), TypeError, r"samples must be a floating"),
    (lambda a: a.update(samples=None), ValueError,
     r"needs the Monte-Carlo samples.*MCSampler\(model\)\.sample"),
    (lambda a: a.update(sigma=torch.zeros(2, 4, 3)), ValueError, r"exactly one of samples"),
    (lambda a: a.update(samples=None, sigma=torch.zeros(2, 4)), ValueError,
     r"sigma must have shape \(B, \*spatial\) = \(2, 4, 3\)"),
    (lambda a: a.update(weight=torch.ones(4)), ValueError, r"weight must have shape \(C,\)"),
    (lambda a: a.update(weight=torch.ones(5, dtype=torch.long)), TypeError, r"weight must be"),
    (lambda a: a.update(reduction="avg"), ValueError, r"reduction must be one of"),
    (lambda a: a.update(label_smoothing=1.5), ValueError, r"label_smoothing must be in \[0, 1\]"),
    (lambda a: a.update(alpha=float("nan")), ValueError, r"alpha must be a finite"),
    (lambda a: a.update(correction=3), ValueError, r"correction must be in \[0, β\)"),
    (lambda a: a.update(ignore_index=1.5), TypeError, r"ignore_index must be an int"),
    (lambda a: a.update(target=a["target"].to("meta")), ValueError,
     r"target is on meta but input is on"),
    (lambda a: a.update(samples=a["samples"].to("meta")), ValueError,
     r"samples is on meta but input is on"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_arguments(backend, mutate, error, pattern):
    input, target, samples = _case(backend)
    args = dict(input=input, target=target, samples=samples)
    mutate(args)
    for key in ("sigma", "weight"):
        if isinstance(args.get(key), torch.Tensor) and args[key].device.type != "meta":
            args[key] = args[key].to(input.device)
    with pytest.raises(error, match=pattern):
        uce_fast.uce_loss(args.pop("input"), args.pop("target"), args.pop("samples"),
                          backend=backend, **args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_predictive_uncertainty_bad_arguments(backend):
    _, _, samples = _case(backend)
    with pytest.raises(ValueError, match=r"β >= 2"):
        uce_fast.predictive_uncertainty(samples[:1], backend=backend)
    with pytest.raises(ValueError, match=r"samples must have shape"):
        uce_fast.predictive_uncertainty(samples[:, 0, 0, 0], backend=backend)
    with pytest.raises(ValueError, match=r"correction must be in"):
        uce_fast.predictive_uncertainty(samples, correction=-1, backend=backend)


def test_unknown_or_unusable_backend():
    input, target, samples = _case("torch")
    with pytest.raises(RuntimeError, match=r"backend='nope' cannot run: unknown backend"):
        uce_fast.uce_loss(input, target, samples, backend="nope")
    with pytest.raises(RuntimeError, match=r"backend='cuda' cannot run"):
        uce_fast.uce_loss(input, target, samples, backend="cuda")
    if "triton" not in uce_fast.available_backends():
        with pytest.raises(RuntimeError, match=r"backend='triton' cannot run"):
            uce_fast.uce_loss(input, target, samples, backend="triton")


@pytest.mark.parametrize("backend", backend_params(["triton"]))
def test_triton_rejects_other_devices_and_float64(backend):
    input, target, samples = make_case(2, 5, (4,), 3, dtype=torch.float64,
                                       device=device_of(backend))
    with pytest.raises(RuntimeError, match=r"backend='triton' cannot run: .*float64"):
        uce_fast.uce_loss(input, target, samples, backend=backend)
    meta = make_case(2, 5, (4,), 3, device="meta")
    with pytest.raises(RuntimeError, match=r"backend='triton' cannot run: it runs on cuda"):
        uce_fast.uce_loss(*meta, backend=backend)


@pytest.mark.parametrize("backend", backend_params(["cpu"]))
def test_native_backend_rejects_float64_explicitly(backend):
    input, target, samples = make_case(2, 5, (4,), 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"backend='cpu' cannot run: .*float64"):
        uce_fast.uce_loss(input, target, samples, backend=backend)
    # "auto" picks a backend that can: the reference.
    assert uce_fast.uce_loss(input, target, samples).dtype == torch.float64


def test_environment_variable_overrides_auto(monkeypatch):
    input, target, samples = _case("torch")
    monkeypatch.setenv("UCE_FAST_BACKEND", "nope")
    with pytest.raises(RuntimeError, match=r"backend='nope'"):
        uce_fast.uce_loss(input, target, samples)
    # An explicit backend is not overridden.
    assert torch.isfinite(uce_fast.uce_loss(input, target, samples, backend="torch"))
