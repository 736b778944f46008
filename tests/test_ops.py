"""The kernel ops (compiled and Triton): torch.library.opcheck, torch.compile(fullgraph=True) and
gradients."""

from __future__ import annotations

import pytest
import torch
from helpers import DTYPES, assert_close, backend_params, device_of, loss_and_grad, make_case

import uce_fast
from uce_fast import ops

NATIVE = backend_params(["cpu", "cuda", "triton"])


def _op(backend: str, name: str):
    """The op of a kernel backend: ``uce_fast::NAME`` (compiled) or ``uce_fast::triton_NAME``."""
    if backend == "triton":
        import uce_fast.triton.ops  # noqa: F401  (registers the Triton ops)

        name = f"triton_{name}"
    return getattr(torch.ops.uce_fast, name)


def _flat(input, target, samples):
    batch, classes = input.shape[:2]
    return (input.detach().reshape(batch, classes, -1).requires_grad_(True),
            target.reshape(batch, -1), samples.reshape(samples.shape[0], batch, classes, -1))


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_samples", [True, False], ids=["samples", "sigma"])
@pytest.mark.parametrize("weighted", [False, True], ids=["no-weight", "weight"])
@pytest.mark.parametrize("check_labels", [True, False], ids=["checked", "unchecked"])
@pytest.mark.parametrize("ood", [False, True], ids=["no-ood", "ood"])
def test_opcheck_uce_forward(backend, dtype, with_samples, weighted, check_labels, ood):
    device = device_of(backend)
    input, target, samples = _flat(*make_case(2, 7, (5, 3), 3, dtype=dtype, device=device))
    if ood:
        target = target.clone()
        target[:, ::3] = 9
    sigma = torch.rand(target.shape, device=device)
    weight = torch.rand(7, device=device) if weighted else None
    args = (input, target, samples if with_samples else None, None if with_samples else sigma,
            weight, 2.0, -100, 0.1, 1, check_labels, 9 if ood else -100, 3.0 if ood else 0.0)
    torch.library.opcheck(_op(backend, "uce_forward").default, args)


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ood", [False, True], ids=["no-ood", "ood"])
def test_opcheck_uce_backward(backend, dtype, ood):
    device = device_of(backend)
    input, target, samples = _flat(*make_case(2, 7, (5, 3), 3, dtype=dtype, device=device))
    if ood:
        target = target.clone()
        target[:, ::3] = 9
    ood_args = (9, 3.0) if ood else (-100, 0.0)
    _, norm, pixel_weight = _op(backend, "uce_forward")(
        input, target, samples, None, None, 2.0, -100, 0.0, 1, True, *ood_args)
    grad = torch.rand(target.shape, device=device)
    torch.library.opcheck(_op(backend, "uce_backward").default,
                          (grad, input.detach(), target, norm, pixel_weight, None, -100, 0.0,
                           *ood_args))


def test_native_devices_reports_compiled_kernels():
    devices = ops.native_devices()
    assert set(devices) <= {"cpu", "cuda"}
    assert ("cpu" in devices) == ("cpu" in uce_fast.available_backends())


@pytest.mark.parametrize("backend", [*backend_params(["torch"]), *NATIVE])
def test_compile_fullgraph(backend):
    torch._dynamo.reset()
    input, target, samples = make_case(2, 19, (6, 5), 3, device=device_of(backend))

    def step(x, t, s):
        return uce_fast.uce_loss(x, t, s, alpha=4.0, label_smoothing=0.1, backend=backend)

    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    loss, grad = loss_and_grad(lambda x: compiled(x, target, samples), input)
    ref_loss, ref_grad = loss_and_grad(lambda x: step(x, target, samples), input)
    assert_close(loss, ref_loss)
    assert_close(grad, ref_grad)


def test_gradcheck_reference_float64():
    input, target, samples = make_case(2, 5, (3, 2), 3, dtype=torch.float64)
    weight = torch.rand(5, dtype=torch.float64) + 0.5
    for reduction in ("mean", "none"):
        assert torch.autograd.gradcheck(
            lambda x, r=reduction: uce_fast.uce_loss(
                x, target, samples, alpha=3.0, weight=weight, label_smoothing=0.1, reduction=r,
                backend="torch"),
            (input,),
        )


@pytest.mark.parametrize("backend", NATIVE)
def test_native_gradient_matches_float64_finite_differences(backend):
    """The compiled backward against central differences of the float64 reference."""
    input, target, samples = make_case(1, 4, (3,), 3, device=device_of(backend))
    weight = torch.tensor([0.5, 1.0, 2.0, 1.5], device=input.device)
    options = dict(alpha=3.0, weight=weight, label_smoothing=0.1, reduction="sum")
    _, grad = loss_and_grad(lambda x: uce_fast.uce_loss(x, target, samples, backend=backend,
                                                        **options), input)
    x64 = input.detach().double()
    numeric = torch.zeros_like(x64)
    eps = 1e-6
    for index in range(x64.numel()):
        for sign in (1, -1):
            shifted = x64.clone()
            shifted.view(-1)[index] += sign * eps
            value = uce_fast.uce_loss(shifted, target, samples.double(), backend="torch",
                                      **options)
            numeric.view(-1)[index] += sign * value / (2 * eps)
    assert_close(grad, numeric.float(), dtype=torch.float32, scale=10)


@pytest.mark.parametrize("backend", NATIVE)
def test_double_backward_fails_loudly(backend):
    input, target, samples = make_case(2, 5, (4,), 3, device=device_of(backend))
    loss = uce_fast.uce_loss(input, target, samples, backend=backend)
    (grad,) = torch.autograd.grad(loss, input, create_graph=True)
    assert not grad.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        grad.sum().backward()


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sizes", [((1, 15), (1, 15)), ((3, 5), (7, 9)), ((4, 4), (2, 3))],
                         ids=["same", "up", "down"])
def test_opcheck_mc_accumulate_and_mc_reduce(backend, dtype, sizes):
    device = device_of(backend)
    (in_h, in_w), (out_h, out_w) = sizes
    samples = torch.randn(3, 2, 5, in_h * in_w, device=device).to(dtype)
    state = (torch.rand(2, 5, out_h * out_w, device=device),
             torch.rand(2, 5, out_h * out_w, device=device),
             torch.rand(2, out_h * out_w, device=device))
    torch.library.opcheck(_op(backend, "mc_accumulate_").default,
                          (*state, samples, 2, in_h, in_w, out_h, out_w, True))
    for want in (False, True):
        torch.library.opcheck(_op(backend, "mc_reduce").default,
                              (samples, *state, 2, in_h, in_w, out_h, out_w, False, 1, want,
                               want))
        torch.library.opcheck(_op(backend, "mc_reduce").default,
                              (samples, None, None, None, 0, in_h, in_w, out_h, out_w, True, 1,
                               want, not want))
    torch.library.opcheck(_op(backend, "mc_reduce").default,
                          (None, *state, 4, in_h, in_w, out_h, out_w, False, 1, True, True))
