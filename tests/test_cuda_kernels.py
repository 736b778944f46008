"""What is specific to the CUDA kernels: the 16-byte vector path against the scalar path (aligned,
misaligned and odd pixel counts), the register-tile buckets and the class-chunked path (with its
shared-memory and global-scratch variants), the fused forward's sigma against mc_reduce's, label
errors read back from the device (one host synchronisation per checked forward, none otherwise),
entropy maximisation (OoD labels), CUDA graph capture, streams, and tensors over 2^31 elements.
Everything runs the ops directly on the (B, C, N) contract and compares with the reference on the
same values."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import DTYPES, assert_close

import uce_fast
from uce_fast import reference

pytestmark = pytest.mark.skipif(
    "cuda" not in uce_fast.available_backends(),
    reason="the CUDA kernels need a CUDA device and uce_fast._C built against a CUDA build of "
    f"torch (available backends: {uce_fast.available_backends()})",
)

OPS = torch.ops.uce_fast
NO_BAD_PIXEL = 2**63 - 1
# The ops' (ood_index, ood_scale) with entropy maximisation off: ood_index == ignore_index (-100).
NO_OOD = (-100, 0.0)
OOD = 254


def _with_offset(t: torch.Tensor, offset: int) -> torch.Tensor:
    """A contiguous tensor equal to ``t`` whose data starts ``offset`` elements into its storage,
    so its pointer is misaligned for vector loads when ``offset`` is not a multiple of 16 bytes."""
    if offset == 0:
        return t.contiguous()
    flat = torch.empty(t.numel() + offset, dtype=t.dtype, device=t.device)
    view = flat[offset:].view(t.shape)
    view.copy_(t)
    assert view.is_contiguous() and view.storage_offset() == offset
    return view


def _problem(batch, classes, pixels, beta, *, dtype=torch.float32, sample_dtype=None,
             ignore_index=-100, ignore_frac=0.2, seed=0, device="cuda"):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, classes, pixels, generator=gen) * 2.0
    samples = logits + torch.randn(beta, batch, classes, pixels, generator=gen)
    target = torch.randint(0, classes, (batch, pixels), generator=gen)
    target[torch.rand(batch, pixels, generator=gen) < ignore_frac] = ignore_index
    return (logits.to(device, dtype), target.to(device),
            samples.to(device, sample_dtype or dtype))


def _ood_mask(target, ignore_index, ood_index, ood_scale):
    """The OoD pixels (entropy maximisation), on the CPU: labelled ood_index, on only when
    ood_index is not ignore_index and ood_scale > 0; None when off."""
    if ood_index is None or ood_index == ignore_index or ood_scale == 0:
        return None
    return target.cpu() == ood_index


def _expected(input, target, samples, sigma, weight, alpha, ignore_index, eps, correction,
              grad_loss, ood_index=None, ood_scale=0.0):
    """(loss, lse, pixel_weight, grad_input) from the reference, on the CPU, same values; OoD
    pixels (``_ood_mask``) get ood_scale times the CE against the uniform distribution and the
    pixel weight ood_scale."""
    x = input.detach().cpu().requires_grad_(True)
    if samples is not None:
        sigma = reference.mc_uncertainty(samples.cpu(), correction)[0]
    pixel_weight = reference.uncertainty_weight(sigma.cpu(), alpha)
    if alpha == 0:
        pixel_weight = torch.ones_like(pixel_weight)
    w = None if weight is None else weight.cpu()
    ood = _ood_mask(target, ignore_index, ood_index, ood_scale)
    loss = reference.weighted_cross_entropy(x, target.cpu(), pixel_weight, weight=w,
                                            ignore_index=ignore_index, label_smoothing=eps,
                                            ood=ood, ood_scale=ood_scale)
    (grad,) = torch.autograd.grad(loss, x, grad_loss.cpu())
    lse = torch.logsumexp(x.detach().float(), dim=1)
    pixel_weight = pixel_weight.float()
    if ood is not None:
        pixel_weight = torch.where(ood, torch.tensor(ood_scale), pixel_weight)
    return loss.detach(), lse, pixel_weight, grad


def _sigma_pred(samples, correction):
    """(sigma, pred) of a (β, B, C, N) stack from the mc_reduce op."""
    pixels = samples.shape[-1]
    sigma, pred, *_ = OPS.mc_reduce(samples, None, None, None, 0, 1, pixels, 1, pixels, False,
                                    correction, False, False)
    return sigma, pred


def _check_all_ops(input, target, samples, *, weight=None, alpha=3.0, ignore_index=-100,
                   eps=0.1, correction=1, sigma=None, scale=1.0, ood_index=None, ood_scale=0.0):
    """Forward and backward of the CUDA kernels, and mc_reduce's (sigma, pred) of the same
    samples, against the reference. ood_index None: entropy maximisation off (the ops get
    ood_index = ignore_index)."""
    grad_loss = torch.rand(target.shape, device=input.device) + 0.5
    ood_args = (ignore_index if ood_index is None else ood_index, ood_scale)
    loss, norm, pixel_weight = OPS.uce_forward(input, target, samples, sigma, weight, alpha,
                                              ignore_index, eps, correction, True, *ood_args)
    grad = OPS.uce_backward(grad_loss, input, target, norm, pixel_weight, weight, ignore_index,
                            eps, *ood_args)
    ref = _expected(input, target, samples, sigma, weight, alpha, ignore_index, eps, correction,
                    grad_loss, ood_index, ood_scale)
    # The pixels with a loss: not ignored (the labels here are never bad ones).
    valid = (target != ignore_index).cpu()
    assert_close(loss.cpu(), ref[0], dtype=torch.float32, scale=5 * scale, msg="loss")
    assert_close(norm.sum(0).cpu(), ref[1], dtype=torch.float32, scale=scale, msg="lse")
    assert torch.equal(norm[0].cpu(), input.detach().float().amax(1).cpu()), "max"
    assert_close(pixel_weight.cpu(), ref[2], dtype=torch.float32, scale=5 * scale, msg="weight")
    assert_close(grad.cpu(), ref[3], scale=5 * scale, msg="grad")
    assert torch.count_nonzero(loss.cpu()[~valid]) == 0
    assert torch.count_nonzero(grad.cpu().transpose(0, 1)[:, ~valid]) == 0
    if samples is not None:
        sig, pred = _sigma_pred(samples, correction)
        ref_sig, ref_pred = reference.mc_uncertainty(samples.cpu(), correction)
        assert_close(sig.cpu(), ref_sig, dtype=torch.float32, scale=5 * scale, msg="sigma")
        assert torch.equal(pred.cpu(), ref_pred)


# ---------------------------------------------------------------- access paths and class buckets

# Class counts in every register bucket (<= 4, 8, 16, 32, 64) and on the chunked path (> 64);
# pixel counts that allow the vector path (multiples of 8), that do not (odd), and N = 1.
CLASSES = [2, 5, 16, 19, 40, 64, 65, 150]
LAYOUTS = [  # (pixels, input offset, samples offset)
    (64, 0, 0),    # vector path
    (64, 1, 1),    # pointers misaligned by one element: scalar path
    (64, 2, 2),    # 8-byte (fp32) / 4-byte (fp16) aligned: vector only where that suffices
    (64, 0, 1),    # logits aligned, samples not
    (37, 0, 0),    # N not a multiple of 4 or 8
    (1, 0, 0),     # no spatial dims: classes adjacent in memory
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("classes", CLASSES)
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda v: f"N{v[0]}-off{v[1]}{v[2]}")
def test_vector_and_scalar_paths(dtype, classes, layout):
    pixels, input_offset, samples_offset = layout
    batch = 5 if pixels == 1 else 2
    input, target, samples = _problem(batch, classes, pixels, 3, dtype=dtype, seed=classes)
    input = _with_offset(input, input_offset)
    samples = _with_offset(samples, samples_offset)
    if input_offset % 2 == 1:
        assert input.data_ptr() % 16 != 0
    weight = torch.rand(classes, device="cuda") + 0.5
    _check_all_ops(input, target, samples, weight=weight)
    sigma = torch.rand(target.shape, device="cuda")
    _check_all_ops(input, target, None, sigma=sigma)


@pytest.mark.parametrize(("dtype", "sample_dtype"),
                         [(a, b) for a in DTYPES for b in DTYPES if a != b], ids=str)
@pytest.mark.parametrize("classes", [3, 19, 150])
def test_mixed_input_and_sample_dtypes(dtype, sample_dtype, classes):
    input, target, samples = _problem(2, classes, 48, 4, dtype=dtype, sample_dtype=sample_dtype)
    _check_all_ops(input, target, samples, alpha=10.0)


@pytest.mark.parametrize("classes", [65, 150, 1000])
@pytest.mark.parametrize("beta", [2, 23, 24, 40])
def test_class_chunked_path_any_beta(classes, beta):
    """beta <= 23 keeps the per-sample softmax normalisers in shared memory, more uses a global
    scratch buffer with a capped, grid-stride grid; both must give the same statistics."""
    input, target, samples = _problem(2, classes, 300, beta, seed=beta)
    _check_all_ops(input, target, samples, alpha=10.0, correction=0)


def test_many_tiles_per_row_and_batch():
    """Several blocks per batch row and tiles straddling row ends (flattened pixels)."""
    input, target, samples = _problem(3, 19, 4099, 3)
    _check_all_ops(input, target, samples)
    input, target, samples = _problem(2, 150, 1031, 2)
    _check_all_ops(input, target, samples)


def _bits(t):
    """The float32 tensor's bit patterns: equal exactly when the values are, NaNs included."""
    return t.contiguous().view(torch.int32)


@pytest.mark.parametrize("sample_dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("classes", "beta"), [(3, 5), (19, 10), (40, 6), (150, 10), (150, 40)])
@pytest.mark.parametrize("pixels", [4096, 1001])
def test_fused_sigma_is_mc_reduce_sigma(sample_dtype, classes, beta, pixels):
    """The fused forward takes sigma from the kernels of mc_reduce (the same device functions in
    the same order): given mc_reduce's sigma of the same stack, the CE-only forward returns the
    fused forward's loss, norm and pixel weight bit for bit. Exact ties between the two best
    classes (the first maximum wins) and a NaN sample are included."""
    input, target, samples = _problem(2, classes, pixels, beta, sample_dtype=sample_dtype,
                                      seed=classes + beta)
    samples[:, :, 1] = samples[:, :, 0]
    samples[:, :, :2, :64] = 10.0           # pixels 0 .. 63: classes 0 and 1 tie as the best
    samples[1, 0, classes - 1, 100] = float("nan")
    weight = torch.rand(classes, device="cuda") + 0.5
    for correction in (0, 1):
        fused = OPS.uce_forward(input, target, samples, None, weight, 10.0, -100, 0.1,
                                correction, True, *NO_OOD)
        sigma, pred, *_ = OPS.mc_reduce(samples, None, None, None, 0, 1, pixels, 1, pixels,
                                        False, correction, False, False)
        given = OPS.uce_forward(input, target, None, sigma, weight, 10.0, -100, 0.1, correction,
                                True, *NO_OOD)
        for name, a, b in zip(("loss", "norm", "pixel_weight"), fused, given, strict=True):
            assert torch.equal(_bits(a), _bits(b)), name
        assert torch.equal(pred[:, :64].cpu(), torch.zeros(2, 64, dtype=torch.int64))
        assert torch.isnan(sigma[0, 100]).item()


# ---------------------------------------------------------------- non-finite values


@pytest.mark.parametrize("classes", [4, 19, 150])
@pytest.mark.parametrize("fill", [float("-inf"), float("inf"), float("nan")], ids=str)
def test_non_finite_values_match_cpu_kernels(classes, fill):
    if "cpu" not in uce_fast.available_backends():
        pytest.skip("the compiled CPU kernels are not built")
    input, target, samples = _problem(1, classes, 8, 3, ignore_frac=0.0)
    samples[:, 0, :, 2] = fill          # a pixel whose every sample row is non-finite
    samples[1, 0, 0, 3] = fill          # one class of one sample
    input[0, 1, 5] = fill               # one logit
    input[0, :, 6] = fill               # every logit of a pixel
    for eps in (0.0, 0.1):
        got = OPS.uce_forward(input, target, samples, None, None, 2.0, -100, eps, 1, True,
                              *NO_OOD)
        want = OPS.uce_forward(input.cpu(), target.cpu(), samples.cpu(), None, None, 2.0, -100,
                               eps, 1, True, *NO_OOD)
        for name, a, b in zip(("loss", "norm", "pixel_weight"), got, want, strict=True):
            assert_close(a.cpu(), b, scale=5, msg=name)
    sig, pred = _sigma_pred(samples, 1)
    cpu_sig, cpu_pred = _sigma_pred(samples.cpu(), 1)
    assert_close(sig.cpu(), cpu_sig, scale=5)
    assert torch.equal(pred.cpu(), cpu_pred)


def test_leading_minus_inf_classes_are_zero_probability():
    """-inf in the first classes must not poison the online max/sum of the chunked path."""
    input, target, samples = _problem(1, 150, 16, 3)
    samples[:, :, :10] = float("-inf")
    input[:, :10] = float("-inf")
    target[(target >= 0) & (target < 10)] += 10  # a -inf target logit would make the loss inf
    sig, pred = _sigma_pred(samples, 1)
    ref_sig, ref_pred = reference.mc_uncertainty(samples.cpu(), 1)
    assert torch.isfinite(sig).all()
    assert_close(sig.cpu(), ref_sig, scale=5)
    assert torch.equal(pred.cpu(), ref_pred)
    _check_all_ops(input, target, samples, eps=0.0)


# ---------------------------------------------------------------- labels and gradients


def _syncs(fn):
    """fn()'s result and the number of host synchronisations it made through torch's
    synchronising copies (counted by torch's sync debug mode)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            out = fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return out, sum("synchronizing CUDA operation" in str(w.message) for w in caught)


def _bad_labels(classes, with_samples):
    """A problem with bad labels: (input, target, args (samples, sigma), bad mask); the first
    bad label in memory order is -7 at pixel (0, 39)."""
    input, target, samples = _problem(2, classes, 40, 3, ignore_frac=0.1)
    target[1, 3] = classes
    target[0, 39] = -7           # the first bad label in memory order
    target[1, 0] = 2**40
    sigma = torch.rand(target.shape, device="cuda")
    args = (samples, None) if with_samples else (None, sigma)
    bad = (target != -100) & ((target < 0) | (target >= classes))
    return input, target, args, bad


@pytest.mark.parametrize("classes", [5, 150])
@pytest.mark.parametrize("with_samples", [True, False], ids=["samples", "sigma"])
def test_bad_labels_raise_first_in_memory_order(classes, with_samples):
    """check_labels=True: the first bad label in memory order is named, after one host
    synchronisation; the context stays usable (no device assert)."""
    input, target, args, _ = _bad_labels(classes, with_samples)
    pattern = rf"target contains label -7, outside \[0, {classes}\) and not ignore_index \(-100\)"
    with pytest.raises(ValueError, match=pattern):
        OPS.uce_forward(input, target, *args, None, 2.0, -100, 0.0, 1, True, *NO_OOD)
    torch.cuda.synchronize()
    target_ok = target.clamp(0, classes - 1)
    loss = OPS.uce_forward(input, target_ok, *args, None, 2.0, -100, 0.0, 1, True, *NO_OOD)[0]
    assert torch.isfinite(loss).all()


@pytest.mark.parametrize("classes", [5, 150])
@pytest.mark.parametrize("with_samples", [True, False], ids=["samples", "sigma"])
def test_unchecked_bad_labels_are_ignored_pixels_without_a_sync(classes, with_samples):
    """check_labels=False: no error and no host synchronisation; a bad label's pixel has loss 0
    and gradient 0 for every class, and all outputs equal those with the bad labels replaced by
    ignore_index. The backward never checks and never synchronises, and the checked forward
    synchronises exactly once."""
    input, target, args, bad = _bad_labels(classes, with_samples)
    grad_loss = torch.rand(target.shape, device="cuda") + 0.5
    weight = torch.rand(classes, device="cuda") + 0.5

    def run(t, check):
        loss, norm, pw = OPS.uce_forward(input, t, *args, weight, 2.0, -100, 0.1, 1, check,
                                         *NO_OOD)
        return loss, norm, pw

    got, n = _syncs(lambda: run(target, False))
    assert n == 0
    grad, n = _syncs(lambda: OPS.uce_backward(grad_loss, input, target, got[1], got[2], weight,
                                              -100, 0.1, *NO_OOD))
    assert n == 0
    assert torch.count_nonzero(got[0][bad]) == 0
    assert torch.count_nonzero(grad.transpose(0, 1)[:, bad]) == 0
    ignored = target.masked_fill(bad, -100)
    want, n = _syncs(lambda: run(ignored, True))
    assert n == 1
    want_grad = OPS.uce_backward(grad_loss, input, ignored, want[1], want[2], weight, -100, 0.1,
                                 *NO_OOD)
    for name, a, b in zip(("loss", "norm", "pixel_weight", "grad"), (*got, grad),
                          (*want, want_grad), strict=True):
        assert torch.equal(a, b), name
    _check_all_ops(input, ignored, args[0], sigma=args[1], weight=weight)


@pytest.mark.parametrize("classes", [5, 150])
@pytest.mark.parametrize("with_samples", [True, False], ids=["samples", "sigma"])
def test_ood_labels_sync_once_checked_and_match_the_cpu_kernels(classes, with_samples):
    """Entropy maximisation: OoD labels are never bad ones, so a checked forward with OoD and
    ignored labels synchronises exactly once and an unchecked one never (nor the backward); the
    results equal the CPU kernels' and the reference's. Bad labels beside OoD ones: checked, the
    first in memory order is named in the wording that names ood_index; unchecked, their pixels
    are ignored ones, bit for bit, while the OoD pixels keep their loss."""
    input, target, args, bad = _bad_labels(classes, with_samples)
    target[0, :39:3] = OOD       # OoD labels before the first bad one, (0, 39)
    target[1, 7] = OOD
    ood = target == OOD
    clean = target.masked_fill(bad, -100)
    grad_loss = torch.rand(target.shape, device="cuda") + 0.5
    weight = torch.rand(classes, device="cuda") + 0.5

    def run(t, check):
        return OPS.uce_forward(input, t, *args, weight, 2.0, -100, 0.1, 1, check, OOD, 3.0)

    def backward(t, out):
        return OPS.uce_backward(grad_loss, input, t, out[1], out[2], weight, -100, 0.1, OOD, 3.0)

    want, n = _syncs(lambda: run(clean, True))
    assert n == 1
    want_grad, n = _syncs(lambda: backward(clean, want))
    assert n == 0
    unchecked, n = _syncs(lambda: run(clean, False))
    assert n == 0
    for name, a, b in zip(("loss", "norm", "pixel_weight"), unchecked, want, strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(want[2][ood], torch.full_like(want[2][ood], 3.0))
    assert (want[0][ood] > 0).all()

    cpu_args = [None if a is None else a.cpu() for a in args]
    cpu = OPS.uce_forward(input.cpu(), clean.cpu(), *cpu_args, weight.cpu(), 2.0, -100, 0.1, 1,
                          True, OOD, 3.0)
    cpu_grad = OPS.uce_backward(grad_loss.cpu(), input.cpu(), clean.cpu(), cpu[1], cpu[2],
                                weight.cpu(), -100, 0.1, OOD, 3.0)
    for name, a, b in zip(("loss", "norm", "pixel_weight", "grad"), (*want, want_grad),
                          (*cpu, cpu_grad), strict=True):
        assert_close(a.cpu(), b, scale=5, msg=f"{name} vs the CPU kernels")

    pattern = (rf"target contains label -7, outside \[0, {classes}\) and neither ignore_index "
               rf"\(-100\) nor ood_index \({OOD}\)")
    with pytest.raises(ValueError, match=pattern):
        run(target, True)
    torch.cuda.synchronize()
    got, n = _syncs(lambda: run(target, False))
    assert n == 0
    grad, n = _syncs(lambda: backward(target, got))
    assert n == 0
    for name, a, b in zip(("loss", "norm", "pixel_weight", "grad"), (*got, grad),
                          (*want, want_grad), strict=True):
        assert torch.equal(a, b), name
    assert torch.count_nonzero(got[0][bad]) == 0
    _check_all_ops(input, clean, args[0], sigma=args[1], weight=weight, ood_index=OOD,
                   ood_scale=3.0)


def test_ignore_index_inside_class_range():
    input, target, samples = _problem(2, 19, 64, 3, ignore_index=0, ignore_frac=0.3)
    _check_all_ops(input, target, samples, ignore_index=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("upstream", [float("inf"), float("-inf"), float("nan")], ids=str)
def test_ignored_pixels_get_exact_zero_grad_under_non_finite_upstream(dtype, upstream):
    """A non-finite upstream gradient on the ignored pixels gives them exactly 0 for every
    class, as the reference (whose ignored pixels are a select of constants); every other
    pixel gets the reference's gradient, and no entry anywhere is non-finite."""
    input, target, samples = _problem(2, 19, 64, 3, dtype=dtype, ignore_index=255)
    weight = torch.rand(19, device="cuda") + 0.5
    _, norm, pixel_weight = OPS.uce_forward(input, target, samples, None, weight, 10.0, 255, 0.1,
                                           1, True, 255, 0.0)
    ignored = target == 255
    assert 0 < ignored.sum() < ignored.numel()
    grad_loss = torch.rand(target.shape, device="cuda") + 0.5
    grad_loss[ignored] = upstream
    grad = OPS.uce_backward(grad_loss, input, target, norm, pixel_weight, weight, 255,
                            0.1, 255, 0.0).cpu()
    ref = _expected(input, target, samples, None, weight, 10.0, 255, 0.1, 1, grad_loss)[3]
    per_class = ignored.cpu().unsqueeze(1).expand_as(grad)
    assert torch.equal(ref[per_class], torch.zeros_like(ref[per_class])), "reference"
    assert torch.equal(grad[per_class], torch.zeros_like(grad[per_class]))
    assert torch.isfinite(ref).all() and torch.isfinite(grad).all()
    assert_close(grad, ref, scale=5, msg="grad")


# ---------------------------------------------------------------- streams, devices, graphs


def test_runs_on_the_current_stream():
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        input, target, samples = _problem(2, 19, 1000, 3)
        loss, norm, pixel_weight = OPS.uce_forward(input, target, samples, None, None, 3.0, -100,
                                                  0.0, 1, True, *NO_OOD)
        grad = OPS.uce_backward(torch.ones_like(norm), input, target, norm, pixel_weight, None,
                                -100, 0.0, *NO_OOD)
    stream.synchronize()
    ref = _expected(input, target, samples, None, None, 3.0, -100, 0.0, 1,
                    torch.ones_like(norm))
    assert_close(loss.cpu(), ref[0], scale=5)
    assert_close(grad.cpu(), ref[3], scale=5)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_device():
    input, target, samples = _problem(2, 19, 100, 3, device="cuda:1")
    with torch.cuda.device(0):
        _check_all_ops(input, target, samples)


def test_tensors_on_different_devices_are_rejected():
    input, target, samples = _problem(2, 5, 16, 3)
    with pytest.raises(RuntimeError, match="target must be a CUDA tensor"):
        OPS.uce_forward(input, target.cpu(), samples, None, None, 2.0, -100, 0.0, 1, True,
                        *NO_OOD)
    with pytest.raises(RuntimeError, match="samples must be a CUDA tensor"):
        OPS.uce_forward(input, target, samples.cpu(), None, None, 2.0, -100, 0.0, 1, True,
                        *NO_OOD)


@pytest.mark.parametrize("check_labels", [True, False])
def test_cuda_graph_capture_and_replay(check_labels):
    """The label read-back synchronises, which graph capture forbids: it is skipped while the
    stream is capturing, so the op can be captured (after an eager warm-up that checks); without
    label checks there is nothing to skip."""
    input, target, samples = _problem(2, 19, 256, 3)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        eager = OPS.uce_forward(input, target, samples, None, None, 3.0, -100, 0.1, 1, True,
                                *NO_OOD)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = OPS.uce_forward(input, target, samples, None, None, 3.0, -100, 0.1, 1,
                                   check_labels, *NO_OOD)
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured, eager, strict=True):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- more than 2^31 elements


def _free_gib() -> float:
    free, _ = torch.cuda.mem_get_info()
    return free / 2**30


@pytest.mark.slow
@pytest.mark.parametrize(("classes", "vector"), [(19, True), (19, False), (150, True)],
                         ids=["C19-vector", "C19-scalar", "C150-vector"])
def test_more_than_2_pow_31_elements(classes, vector):
    """The logits alone exceed 2^31 elements (the stack twice that): every offset must be int64.
    The first and last pixels of the full run are compared with runs on copies of just those
    pixels, which are small."""
    need_gib = 40
    if _free_gib() < need_gib:
        pytest.skip(f"needs a CUDA device with >= {need_gib} GiB free, has {_free_gib():.0f}")
    pixels = 2**31 // classes + 1024
    pixels = pixels + (-pixels) % 8 if vector else pixels | 1
    assert classes * pixels > 2**31
    gen = torch.Generator(device="cuda").manual_seed(0)
    input = torch.randn(1, classes, pixels, device="cuda", dtype=torch.float16, generator=gen)
    samples = torch.empty(2, 1, classes, pixels, device="cuda", dtype=torch.float16)
    for s in range(2):
        samples[s] = input + torch.randn(input.shape, device="cuda", dtype=torch.float16,
                                         generator=gen)
    target = torch.randint(0, classes, (1, pixels), device="cuda", generator=gen)
    loss, norm, pixel_weight = OPS.uce_forward(input, target, samples, None, None, 10.0, -100,
                                              0.1, 1, True, *NO_OOD)
    grad_loss = torch.ones_like(loss)
    grad = OPS.uce_backward(grad_loss, input, target, norm, pixel_weight, None, -100, 0.1,
                            *NO_OOD)
    sigma, pred = _sigma_pred(samples, 1)
    for part in (slice(0, 1000), slice(pixels - 1000, pixels)):
        x, s, t = (input[..., part].contiguous(), samples[..., part].contiguous(),
                   target[..., part].contiguous())
        small = OPS.uce_forward(x, t, s, None, None, 10.0, -100, 0.1, 1, True, *NO_OOD)
        assert_close(loss[..., part], small[0], msg="loss")
        assert_close(norm[..., part], small[1], msg="norm")
        small_grad = OPS.uce_backward(torch.ones_like(small[0]), x, t, small[1], small[2], None,
                                      -100, 0.1, *NO_OOD)
        assert_close(grad[..., part], small_grad, msg="grad")
        small_sigma, small_pred = _sigma_pred(s, 1)
        assert_close(sigma[..., part], small_sigma, msg="sigma")
        assert torch.equal(pred[..., part], small_pred)
    assert torch.isfinite(loss).all()
