"""The Triton kernels directly: the class-chunked path on small class counts (several chunks and a
ragged last chunk, any number of samples), ties and NaN across chunk boundaries, edge values of the
pixel weight and the logits, bad labels anywhere in the launch (checked: raised after one flag
read; unchecked: ignored, with no read), the cached bilinear tables, and int64 offsets on a stack
beyond 2^31 elements. Entropy maximisation (OoD pixels) on those paths: the class chunks, the int64
offsets, -inf logits and infinite upstream gradients in the variants it selects."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, backend_params, device_of, make_case

import uce_fast
from uce_fast import reference

pytestmark = pytest.mark.parametrize("backend", backend_params(["triton"]))

#: The ops' (ood_index, ood_scale) with entropy maximisation off (ood_index == ignore_index), and
#: an OoD label with its scale.
NO_OOD = (-100, 0.0)
OOD = 254


def _ops():
    from uce_fast.triton import ops

    return ops


def _flat(input, target, samples):
    batch, classes = input.shape[:2]
    return (input.detach().reshape(batch, classes, -1), target.reshape(batch, -1),
            samples.reshape(samples.shape[0], batch, classes, -1))


def _sigma_pred(samples, correction=1, **kw):
    """(sigma, pred) of a (β, B, C, N) stack from the mc_reduce launcher (``chunk_c``/``wide``
    passed through)."""
    pixels = samples.shape[-1]
    sigma, pred, *_ = _ops()._mc_reduce(samples, None, None, None, 0, 1, pixels, 1, pixels,
                                        False, correction, False, False, **kw)
    return sigma, pred


def _expected(input, target, samples, weight=None, alpha=3.0, ignore_index=-100,
              label_smoothing=0.0, correction=1):
    """float64 reference: (sigma, pred, per-pixel loss, lse)."""
    sigma, pred = reference.mc_uncertainty(samples.double(), correction)
    loss = reference.weighted_cross_entropy(
        input.double(), target, reference.uncertainty_weight(sigma, alpha),
        weight=None if weight is None else weight.double(), ignore_index=ignore_index,
        label_smoothing=label_smoothing)
    return sigma, pred, loss, torch.logsumexp(input.double(), dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("classes", "chunk"), [(19, 4), (13, 8), (3, 2), (40, 16)])
@pytest.mark.parametrize("beta", [2, 5])
def test_chunked_path_matches_reference(backend, dtype, classes, chunk, beta):
    input, target, samples = _flat(*make_case(2, classes, (37,), beta, dtype=dtype,
                                              device=device_of(backend), seed=classes))
    weight = torch.rand(classes, generator=torch.Generator().manual_seed(0)).to(input.device)
    sigma, pred, loss, lse = _expected(input, target, samples, weight=weight,
                                       label_smoothing=0.1)
    got_sigma, got_pred = _sigma_pred(samples, chunk_c=chunk)
    assert torch.equal(got_pred.cpu(), pred.cpu())
    assert_close(got_sigma, sigma.float(), dtype=torch.float32, scale=5)
    got_loss, got_norm, got_weight = _ops()._forward(input, target, samples, None, weight, 3.0,
                                                    -100, 0.1, 1, True, *NO_OOD, chunk_c=chunk)
    assert_close(got_loss, loss.float(), dtype=torch.float32, scale=5)
    assert_close(got_norm.sum(0), lse.float(), dtype=torch.float32, scale=5)
    assert torch.equal(got_norm[0], input.float().amax(1))
    # The fused forward's own sigma, through its weight (1 + sigma)^3.
    assert_close(got_weight, (1 + sigma.float()) ** 3, dtype=torch.float32, scale=5)


@pytest.mark.parametrize("chunk", [None, 8])
@pytest.mark.parametrize("ood", [False, True], ids=["no-ood", "ood"])
def test_int64_tile_offsets_give_identical_results(backend, chunk, ood):
    """The int64 in-tile offsets (used when C·N needs them) on a small problem: bit-identical;
    with OoD pixels in the variant they select (no label smoothing)."""
    input, target, samples = _flat(*make_case(2, 19, (45,), 3, dtype=torch.bfloat16,
                                              device=device_of(backend)))
    weight = torch.rand(19, device=input.device)
    grad_loss = torch.rand(target.shape, device=input.device)
    smoothing, ood_args = 0.1, NO_OOD
    if ood:
        target[:, 1::4] = OOD
        smoothing, ood_args = 0.0, (OOD, 2.5)
    ops = _ops()

    def run(wide):
        loss, norm, pixel_weight = ops._forward(input, target, samples, None, weight, 2.0, -100,
                                               smoothing, 1, True, *ood_args, chunk_c=chunk,
                                               wide=wide)
        grad = ops._backward(grad_loss, input, target, norm, pixel_weight, weight, -100,
                             smoothing, *ood_args, wide=wide)
        sigma, pred = _sigma_pred(samples, chunk_c=chunk, wide=wide)
        return dict(loss=loss, norm=norm, weight=pixel_weight, grad=grad, sigma=sigma, pred=pred)

    narrow, wide = run(False), run(True)
    for name in narrow:
        assert torch.equal(narrow[name], wide[name]), name


@pytest.mark.parametrize("chunk", [None, 4])
def test_ties_and_nan_across_chunks(backend, chunk):
    device = device_of(backend)
    samples = torch.zeros(3, 1, 11, 4, device=device)
    samples[:, 0, 9, 0] = 2.0
    samples[:, 0, 2, 0] = 2.0  # pixel 0: tie between classes 2 and 9 (different chunks)
    samples[:, 0, 7, 1] = 3.0  # pixel 1: a single maximum in the second chunk
    samples[1, 0, 6, 2] = float("nan")  # pixel 2: NaN in one sample: every mean is NaN
    samples[0, 0, 10, 3] = float("-inf")  # pixel 3: a -inf logit, class 10 gets p = 0
    sigma, pred = _sigma_pred(samples, chunk_c=chunk)
    ref_sigma, ref_pred = reference.mc_uncertainty(samples.double(), 1)
    assert pred[0].tolist() == ref_pred[0].tolist() == [2, 7, 0, 0]
    assert_close(sigma, ref_sigma.float(), dtype=torch.float32)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy: log2(0), 0 * inf
@pytest.mark.parametrize("alpha", [0.0, 2.0, 3.0, 2.5, -1.0])
def test_pixel_weight_edge_values(backend, alpha):
    """(1 + sigma) ** alpha for given sigma, as torch.pow: negative bases, 0, inf, NaN."""
    device = device_of(backend)
    sigma = torch.tensor([[0.0, 0.3, -1.0, -3.0, -2.5, float("inf"), float("nan"), 1e-30]],
                         device=device)
    input = torch.zeros(1, 2, sigma.shape[1], device=device)
    target = torch.zeros(1, sigma.shape[1], dtype=torch.int64, device=device)
    _, _, pixel_weight = _ops()._forward(input, target, None, sigma, None, alpha, -100, 0.0, 1,
                                         True, *NO_OOD)
    expected = (1.0 + sigma.double()).pow(alpha)
    assert_close(pixel_weight, expected.float(), dtype=torch.float32)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy: 0 * inf
def test_infinite_logits(backend):
    """A -inf logit: an infinite loss where it is the target, or with any label smoothing."""
    device = device_of(backend)
    input = torch.randn(1, 4, 6, device=device)
    input[0, 1] = float("-inf")
    target = torch.tensor([[0, 1, 2, 3, 1, -100]], device=device)
    sigma = torch.rand(1, 6, device=device)
    for label_smoothing in (0.0, 0.2):
        loss, norm, _ = _ops()._forward(input, target, None, sigma, None, 2.0, -100,
                                       label_smoothing, 1, True, *NO_OOD)
        expected = reference.weighted_cross_entropy(
            input, target, reference.uncertainty_weight(sigma, 2.0),
            label_smoothing=label_smoothing)
        assert_close(loss, expected, msg=f"label_smoothing={label_smoothing}")
        assert_close(norm.sum(0), torch.logsumexp(input, dim=1))
    # label_smoothing=1: the hard term's factor is exactly 0 and is dropped (not 0 * inf = NaN).
    loss, _, _ = _ops()._forward(input, target, None, sigma, None, 2.0, -100, 1.0, 1, True,
                                 *NO_OOD)
    assert loss[0].tolist()[:5] == [float("inf")] * 5 and loss[0, 5] == 0


def _ood_reference(input, target, pixel_weight, grad_loss, weight, label_smoothing, ood_scale):
    """float64 (per-pixel loss, grad_input) with entropy maximisation at the OOD pixels."""
    x = input.detach().double().requires_grad_(True)
    loss = reference.weighted_cross_entropy(
        x, target, pixel_weight.double(), weight=None if weight is None else weight.double(),
        label_smoothing=label_smoothing, ood=target == OOD, ood_scale=ood_scale)
    (grad,) = torch.autograd.grad((loss * grad_loss.double()).sum(), x)
    return loss.detach(), grad


@pytest.mark.parametrize("chunk", [None, 4])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("form", ["samples", "sigma"])
def test_ood_pixels_on_both_paths(backend, chunk, label_smoothing, form):
    """Entropy maximisation in all classes at once and in class chunks (with a stack: sigma from
    mc_reduce's chunked kernel first), with and without label smoothing (without it, the
    smoothing sum is formed for the OoD pixels only): loss, saved weight and gradient against
    float64; an OOD label is never a bad one, another one is reported naming both indices."""
    device = device_of(backend)
    input, target, samples = _flat(*make_case(2, 13, (29,), 3, device=device, seed=7))
    target[:, ::5] = OOD
    weight = torch.rand(13, generator=torch.Generator().manual_seed(1)).to(device) + 0.2
    grad_loss = torch.rand(target.shape, generator=torch.Generator().manual_seed(2)).to(device)
    sigma = reference.mc_uncertainty(samples.double(), 1)[0].float()
    stack, given = (samples, None) if form == "samples" else (None, sigma)
    ops = _ops()
    loss, norm, pixel_weight = ops._forward(input, target, stack, given, weight, 2.0, -100,
                                            label_smoothing, 1, True, OOD, 2.5, chunk_c=chunk)
    grad = ops._backward(grad_loss, input, target, norm, pixel_weight, weight, -100,
                         label_smoothing, OOD, 2.5)
    ood = target == OOD
    expected_weight = torch.where(ood, 2.5, (1 + sigma.double()) ** 2)
    assert_close(pixel_weight, expected_weight.float(), dtype=torch.float32, scale=5)
    ref_loss, ref_grad = _ood_reference(input, target, expected_weight, grad_loss, weight,
                                        label_smoothing, 2.5)
    assert_close(loss, ref_loss.float(), dtype=torch.float32, scale=5)
    assert_close(grad, ref_grad.float(), dtype=torch.float32, scale=5)
    assert bool((loss[ood] > 0).all()) and bool((loss[target == -100] == 0).all())
    bad = target.clone()
    bad[1, 3] = 253
    with pytest.raises(ValueError, match=r"target contains label 253, outside \[0, 13\) and "
                                         r"neither ignore_index \(-100\) nor ood_index \(254\)"):
        ops._forward(input, bad, stack, given, weight, 2.0, -100, label_smoothing, 1, True, OOD,
                     2.5, chunk_c=chunk)


@pytest.mark.parametrize("chunk", [None, 4])
def test_ood_scale_zero_is_ignore(backend, chunk):
    """ood_scale = 0: OOD pixels are exactly ignored ones (bit for bit, in the variant without
    smoothing), and their label is still not a bad one."""
    device = device_of(backend)
    input, target, samples = _flat(*make_case(2, 9, (31,), 3, device=device, seed=3))
    target[:, 2::6] = OOD
    ignored = torch.where(target == OOD, -100, target)
    grad_loss = torch.rand(target.shape, device=device)
    ops = _ops()
    results = []
    for labels, ood_args in ((target, (OOD, 0.0)), (ignored, NO_OOD)):
        loss, norm, pixel_weight = ops._forward(input, labels, samples, None, None, 2.0, -100,
                                                0.0, 1, True, *ood_args, chunk_c=chunk)
        grad = ops._backward(grad_loss, input, labels, norm, pixel_weight, None, -100, 0.0,
                             *ood_args)
        results.append((loss, norm, pixel_weight, grad))
    for got, expected in zip(*results, strict=True):
        assert torch.equal(got, expected)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy: 0 * inf
@pytest.mark.parametrize("chunk", [None, 2])
def test_ood_infinite_logits(backend, chunk):
    """A -inf logit with OoD pixels and no label smoothing: the smoothing sum is infinite at
    every pixel, but enters only the OoD pixels' loss (infinite there); the known pixels keep
    their finite CE (its dropped ε = 0 term is not 0 · inf = NaN), and every gradient is finite."""
    device = device_of(backend)
    input = torch.randn(1, 5, 7, device=device)
    input[0, 1] = float("-inf")
    target = torch.tensor([[0, 1, 2, OOD, 3, -100, OOD]], device=device)
    sigma = torch.rand(1, 7, device=device)
    grad_loss = torch.rand(1, 7, device=device) + 0.5
    ops = _ops()
    loss, norm, pixel_weight = ops._forward(input, target, None, sigma, None, 2.0, -100, 0.0, 1,
                                            True, OOD, 1.5, chunk_c=chunk)
    assert loss[0].isinf().tolist() == [False, True, False, True, False, False, True]
    grad = ops._backward(grad_loss, input, target, norm, pixel_weight, None, -100, 0.0, OOD, 1.5)
    ref_loss, ref_grad = _ood_reference(
        input, target, torch.where(target == OOD, 1.5, (1 + sigma) ** 2), grad_loss, None, 0.0,
        1.5)
    assert_close(loss, ref_loss.float(), dtype=torch.float32)
    assert torch.isfinite(grad).all()
    assert_close(grad, ref_grad.float(), dtype=torch.float32)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy: inf * 0
def test_ood_variant_with_infinite_upstream_gradient(backend):
    """An infinite grad_loss everywhere, no label smoothing, OoD on: ignored pixels get exactly 0,
    known pixels the gradient of the variant without OoD (the dropped ε = 0 term is not
    inf · 0 = NaN), OoD pixels infinite values, never NaN."""
    device = device_of(backend)
    input, target, samples = _flat(*make_case(2, 6, (17,), 3, device=device, ignore_frac=0.3))
    target[:, 1::4] = OOD
    grad_loss = torch.full(target.shape, float("inf"), device=device)
    ops = _ops()
    grads = []
    for labels, ood_args in ((target, (OOD, 2.0)), (torch.where(target == OOD, -100, target),
                                                    NO_OOD)):
        _, norm, pixel_weight = ops._forward(input, labels, samples, None, None, 2.0, -100, 0.0,
                                             1, True, *ood_args)
        grads.append(ops._backward(grad_loss, input, labels, norm, pixel_weight, None, -100, 0.0,
                                   *ood_args))
    grad, without = grads
    assert not torch.isnan(grad).any()
    ignored = (target == -100).unsqueeze(1).expand_as(grad)
    assert torch.count_nonzero(grad[ignored]) == 0
    known = ((target >= 0) & (target < 6)).unsqueeze(1).expand_as(grad)
    assert torch.equal(grad[known], without[known])
    ood = (target == OOD).unsqueeze(1).expand_as(grad)
    assert torch.isinf(grad[ood]).all()


@pytest.mark.parametrize("position", ["first", "last", "middle"])
def test_bad_label_anywhere(backend, position):
    input, target, samples = _flat(*make_case(3, 5, (301,), 2, device=device_of(backend)))
    index = {"first": (0, 0), "last": (2, 300), "middle": (1, 150)}[position]
    target[index] = 7
    with pytest.raises(ValueError, match=r"target contains label 7, outside \[0, 5\) and not "
                                         r"ignore_index \(-100\)"):
        _ops()._forward(input, target, samples, None, None, 1.0, -100, 0.0, 1, True, *NO_OOD)


@pytest.mark.parametrize("chunk", [None, 4])
def test_unchecked_bad_labels_are_ignored(backend, chunk, monkeypatch):
    """check_labels=False: a bad label gives loss 0 and gradient 0, exactly as ignore_index, and
    the forward reads nothing back from the device; check_labels=True reads one flag."""
    device = device_of(backend)
    input, target, samples = _flat(*make_case(2, 9, (23,), 3, device=device, ignore_frac=0.2))
    weight = torch.rand(9, device=device) + 0.5
    bad = target.clone()
    bad[0, 3], bad[1, 0], bad[1, 22] = 9, -7, 2**40
    ignored = torch.where(bad == target, target, -100)
    reads = []
    item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda t: reads.append(1) or item(t))
    ops = _ops()
    grad_loss = torch.rand(target.shape, device=device)
    results = []
    for labels in (bad, ignored):
        loss, norm, pixel_weight = ops._forward(input, labels, samples, None, weight, 2.0, -100,
                                                0.1, 1, False, *NO_OOD, chunk_c=chunk)
        grad = ops._backward(grad_loss, input, labels, norm, pixel_weight, weight, -100, 0.1,
                             *NO_OOD)
        results.append((loss, norm, pixel_weight, grad))
    assert not reads
    for got, expected in zip(*results, strict=True):
        assert torch.equal(got, expected)
    assert torch.count_nonzero(results[0][0][bad != ignored]) == 0
    ops._forward(input, ignored, samples, None, weight, 2.0, -100, 0.1, 1, True, *NO_OOD,
                 chunk_c=chunk)
    assert len(reads) == 1


@pytest.mark.parametrize("resample", [False, True], ids=["as-is", "resample"])
def test_chunked_statistics_any_number_of_samples(backend, resample):
    """More samples than any register tile could hold (the class-chunked kernels keep per-sample
    normalisers in memory): the streaming state in two calls, the reduction of a stack, of a
    state, of a state plus samples, and the fused forward, against float64."""
    device = device_of(backend)
    in_hw, out_hw = ((3, 4), (5, 7)) if resample else ((5, 7), (5, 7))
    gen = torch.Generator().manual_seed(3)
    first, beta, classes, chunk = 17, 33, 9, 8
    samples = (torch.randn(beta, 1, classes, in_hw[0] * in_hw[1], generator=gen) * 3).to(device)
    ops = _ops()
    state = [torch.zeros(1, classes, 35, device=device) for _ in range(2)]
    state.append(torch.zeros(1, 35, device=device))
    ops._mc_accumulate(*state, samples[:first], 0, *in_hw, *out_hw, False, chunk_c=chunk)
    head = [t.clone() for t in state]
    ops._mc_accumulate(*state, samples[first:], first, *in_hw, *out_hw, False, chunk_c=chunk)
    ref = [torch.zeros(t.shape, dtype=torch.float64, device=device) for t in state]
    reference.mc_accumulate_(*ref, samples.double(), 0, in_hw, out_hw, False)
    for got, expected in zip(state, ref, strict=True):
        assert_close(got, expected.float(), dtype=torch.float32, scale=5)
    expected = reference.mc_reduce(samples.double(), None, None, None, 0, in_hw, out_hw, False, 1,
                                   True, True)
    for args in ((samples, None, None, None, 0), (None, *state, beta),
                 (samples[first:], *head, first)):
        got = ops._mc_reduce(*args, *in_hw, *out_hw, False, 1, True, True, chunk_c=chunk)
        assert torch.equal(got[1], expected[1])
        for i, name in ((0, "sigma"), (2, "entropy"), (3, "mutual_info"), (4, "probs")):
            assert_close(got[i], expected[i].float(), dtype=torch.float32, scale=5, msg=name)
    if not resample:
        input = torch.randn(1, classes, 35, generator=gen).to(device)
        target = torch.randint(0, classes, (1, 35), generator=gen).to(device)
        _, _, pixel_weight = ops._forward(input, target, samples, None, None, 2.0, -100, 0.0, 1,
                                          True, *NO_OOD, chunk_c=chunk)
        assert_close(pixel_weight, (1 + expected[0].float()) ** 2, dtype=torch.float32, scale=5)


def test_resample_tables_cached_per_device(backend):
    """The bilinear tables are built once per (dtype, device, sizes, align_corners), on the
    samples' device, with the values of a fresh build."""
    device = device_of(backend)
    ops = _ops()
    samples = torch.randn(2, 1, 3, 4 * 5, device=device)
    first = ops._sources(samples, 4, 5, 7, 9, False, True)
    assert ops._sources(samples, 4, 5, 7, 9, False, True) is first
    for sizes, tables in (((4, 7), first.tables[:2]), ((5, 9), first.tables[2:])):
        for got, fresh in zip(tables, ops._source_index(*sizes, False, device), strict=True):
            assert got.device == samples.device and torch.equal(got, fresh)
    other = ops._sources(samples.to("meta"), 4, 5, 7, 9, False, True)
    assert all(t.device.type == "meta" for t in other.tables)
    corners = ops._sources(samples, 4, 5, 7, 9, True, True)
    assert not torch.equal(corners.tables[1], first.tables[1])
    assert ops._sources(samples, 4, 5, 4, 5, False, False).tables is None


def test_backward_ignored_pixels_get_zero_even_for_inf_grad(backend):
    device = device_of(backend)
    input, target, samples = _flat(*make_case(2, 6, (9,), 3, device=device, ignore_frac=0.5))
    weight = torch.rand(6, device=device) + 0.5
    _, norm, pixel_weight = _ops()._forward(input, target, samples, None, weight, 2.0, -100, 0.1,
                                           1, True, *NO_OOD)
    grad_loss = torch.full(target.shape, float("inf"), device=device)
    grad_loss[target != -100] = 1.0
    grad = _ops()._backward(grad_loss, input, target, norm, pixel_weight, weight, -100, 0.1,
                            *NO_OOD)
    ignored = (target == -100).unsqueeze(1).expand_as(grad)
    assert torch.count_nonzero(grad[ignored]) == 0
    assert torch.isfinite(grad[~ignored]).all()


def _tail_matches_reference(backend, batch, classes, pixels, beta, dtype, tail):
    """uce_loss and its gradient on a (batch, classes, pixels) problem; the last ``tail`` pixels
    (the largest offsets) compared with the reference run on just those pixels."""
    device = device_of(backend)
    gen = torch.Generator(device=device).manual_seed(0)
    input = torch.empty(batch, classes, pixels, device=device, dtype=dtype).normal_(generator=gen)
    samples = torch.empty(beta, batch, classes, pixels, device=device, dtype=dtype)
    samples.normal_(generator=gen)
    target = torch.randint(0, classes, (batch, pixels), device=device, generator=gen)
    input.requires_grad_(True)
    options = dict(alpha=4.0, ignore_index=-100, reduction="none", backend=backend)
    loss = uce_fast.uce_loss(input, target, samples, **options)
    (grad,) = torch.autograd.grad(loss.sum(), input)
    tail_input = input.detach()[-1:, :, -tail:].clone().requires_grad_(True)
    ref = uce_fast.uce_loss(tail_input.float(), target[-1:, -tail:],
                            samples[:, -1:, :, -tail:].float(), **{**options, "backend": "torch"})
    (ref_grad,) = torch.autograd.grad(ref.sum(), tail_input)
    assert_close(loss[-1:, -tail:], ref, msg="per-pixel loss at the largest offsets")
    assert_close(grad[-1:, :, -tail:], ref_grad, msg="gradient at the largest offsets")


def test_tail_pixels_small(backend):
    """The large-offset check below, on a size the interpreter runs (checks the check)."""
    _tail_matches_reference(backend, 2, 7, 1000, 2, torch.float32, 64)


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device with ~25 GB free")
def test_offsets_beyond_int32(backend):
    """input of 2^31 + 8·1001 elements (bf16, 4.3 GB), a stack twice that: the offsets of the
    last class rows and of the second sample exceed int32. About 25 GB in all (inputs, gradient,
    per-pixel outputs)."""
    free, _ = torch.cuda.mem_get_info()
    if free < 32 * 2**30:
        pytest.skip(f"needs ~25 GB of free GPU memory, {free / 2**30:.0f} GiB free")
    _tail_matches_reference(backend, 1, 8, 2**28 + 1001, 2, torch.bfloat16, 512)
