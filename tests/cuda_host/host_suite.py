"""The CUDA kernels of csrc/cuda executed on the CPU: built as host C++ against the emulation in
include/cuda_host.h with AddressSanitizer and UndefinedBehaviorSanitizer (host_build.py), driven
through the launchers (uce_cuda::forward, backward, mc_accumulate, mc_reduce) with the argument
structs of the torch glue (csrc/cuda/op_args.h), and compared with the reference on the same
values. Every launch is checked to take the path its arguments call for (register bucket or
class chunks, vector or scalar loads, shared memory or global scratch).

Not collected by the ordinary run (the file name does not match test_*.py): tests/test_cuda_host.py
runs it in a subprocess with the ASan runtime preloaded. By hand, from the repository root:

    LD_PRELOAD=$(c++ -print-file-name=libasan.so) \\
    ASAN_OPTIONS=detect_leaks=0:alloc_dealloc_mismatch=0:detect_odr_violation=0 \\
    python -m pytest -q tests/cuda_host/host_suite.py

UCE_CUDA_HOST_BUILD_DIR reuses a build directory (incremental rebuilds); UCE_CUDA_HOST_REPORT
names a JSON file that receives the build time and the worst error of every output.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: helpers
import host_build
from helpers import DTYPES, assert_close

import uce_fast
from uce_fast import reference

if "libasan" not in os.environ.get("LD_PRELOAD", ""):
    pytest.skip("needs the ASan runtime preloaded: run tests/test_cuda_host.py (or see this "
                "file's docstring)", allow_module_level=True)

BUILD_DIR = os.environ.get("UCE_CUDA_HOST_BUILD_DIR") or tempfile.mkdtemp(prefix="uce_cuda_host_")
_, BUILD_SECONDS = host_build.build(BUILD_DIR)
H = torch.ops.uce_cuda_host
NAN = float("nan")
INF = float("inf")
# The ops' (ood_index, ood_scale) with entropy maximisation off: ood_index == ignore_index (-100).
NO_OOD = (-100, 0.0)


def _cpu_forward(*args, ood=NO_OOD):
    """torch.ops.uce_fast.uce_forward of the compiled CPU kernels with label checks: the op's
    arguments up to correction, then check_labels (True) and ``ood`` (ood_index, ood_scale)."""
    return torch.ops.uce_fast.uce_forward.default(*args, True, *ood)


# Worst error of each output against the reference: name -> (max |diff|, max |diff| / tolerance).
WORST: dict[str, tuple[float, float]] = {}
_TOL = {torch.float32: (2e-5, 2e-6), torch.float16: (4e-3, 1e-5), torch.bfloat16: (2e-2, 1e-4)}


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    path = os.environ.get("UCE_CUDA_HOST_REPORT")
    if path:
        Path(path).write_text(json.dumps({"build_seconds": BUILD_SECONDS, "worst": WORST},
                                         indent=1, sort_keys=True))


@pytest.fixture(autouse=True)
def _device():
    """A fresh emulated device per test: 132 SMs, every block run, in order."""
    H.configure(132, 0, False, False)
    H.launches()
    yield
    H.configure(132, 0, False, False)


def _close(name, actual, expected, *, dtype=None, scale=1.0):
    """assert_close with the suite's tolerance, recording the worst error per output."""
    dtype = dtype or actual.dtype
    a, e = actual.double(), expected.double()
    both = torch.isfinite(a) & torch.isfinite(e)
    if both.any():
        rtol, atol = _TOL[dtype]
        diff = (a - e).abs()[both]
        ratio = (diff / (atol * scale + rtol * scale * e.abs()[both])).max().item()
        key = f"{name} ({str(dtype).removeprefix('torch.')})"
        old = WORST.get(key, (0.0, 0.0))
        WORST[key] = (max(old[0], diff.max().item()), max(old[1], ratio))
    assert_close(actual, expected, dtype=dtype, scale=scale, msg=name)


# ---------------------------------------------------------------------------------- launch log

_ELEM_BYTES = {"0": 4, "1": 2, "2": 2}  # uce_cuda::DType: float32, float16, bfloat16


def _launched():
    """The launches since the last call: kernel, template arguments, grid, block, shared memory."""
    out = []
    for line in H.launches():
        name, grid, grid_run, block, smem, err = line.rsplit("|", 5)
        m = re.search(r"detail::(\w+)<(.*)>\(", name)
        assert m is not None, name
        args = [re.sub(r"\(uce_cuda::DType\)", "", a.strip()) for a in m.group(2).split(",")]
        out.append({"kernel": m.group(1), "args": args, "grid": int(grid),
                    "grid_run": int(grid_run), "block": int(block), "smem": int(smem),
                    "error": err})
    return out


def _vec_width(k):
    """Pixels per thread V of a launched kernel and whether its samples are resampled."""
    kernel, args = k["kernel"], k["args"]
    if kernel in ("ce_kernel", "backward_kernel"):  # <IT, kVec>: 16 bytes of pixels
        return 16 // _ELEM_BYTES[args[0]], False
    if kernel == "mc_register_kernel":           # <ST, CM, V, kVec, kInterp, Out>
        return int(args[2]), args[4] == "true"
    if kernel == "mc_chunked_kernel":            # <ST, V, kVec, kInterp, Out>
        return int(args[1]), args[3] == "true"
    raise AssertionError(f"unknown kernel {kernel}")


def _out(k):
    """What a Monte-Carlo kernel does with its statistics (its Out template argument):
    "Accumulate", "Reduce" or "FusedCe<IT>" (IT the logits' uce_cuda::DType)."""
    assert k["kernel"] in ("mc_register_kernel", "mc_chunked_kernel"), k
    return re.sub(r"^.*::", "", k["args"][-1]).replace(" ", "")


_DTYPE_CODE = {torch.float32: "0", torch.float16: "1", torch.bfloat16: "2"}


def _check_access_mode(k, N, streamed):
    """The kernel ran in vector mode exactly when N and every streamed tensor allow it:
    ``streamed`` is [(tensor or None, element bytes)]; every kernel's first bool template
    argument is its access mode."""
    V, interp = _vec_width(k)
    aligned = all(t is None or t.data_ptr() % min(V * size, 16) == 0 for t, size in streamed)
    want = V > 1 and not interp and N % V == 0 and aligned
    got = next(a for a in k["args"] if a in ("true", "false")) == "true"
    assert got == want, f"{k['kernel']}<{', '.join(k['args'])}>: vector mode {got}, want {want}"


def _elem(t):
    return t.element_size()


# -------------------------------------------------------------------------------- fused forward


def _with_offset(t, offset):
    """A contiguous copy of ``t`` whose data starts ``offset`` elements into its storage."""
    if offset == 0:
        return t.contiguous()
    flat = torch.empty(t.numel() + offset, dtype=t.dtype)
    view = flat[offset:].view(t.shape)
    view.copy_(t)
    return view


def _problem(batch, classes, pixels, beta, *, dtype=torch.float32, sample_dtype=None,
             ignore_index=-100, ignore_frac=0.2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, classes, pixels, generator=gen) * 2.0
    samples = logits + torch.randn(beta, batch, classes, pixels, generator=gen)
    target = torch.randint(0, classes, (batch, pixels), generator=gen)
    target[torch.rand(batch, pixels, generator=gen) < ignore_frac] = ignore_index
    return logits.to(dtype), target, samples.to(sample_dtype or dtype)


def _ood_mask(target, ignore_index, ood_index, ood_scale):
    """The OoD pixels (entropy maximisation): labelled ood_index, on only when ood_index is not
    ignore_index and ood_scale > 0; None when off."""
    if ood_index is None or ood_index == ignore_index or ood_scale == 0:
        return None
    return target == ood_index


def _expected(input, target, samples, sigma, weight, alpha, ignore_index, eps, correction,
              grad_loss, ood_index=None, ood_scale=0.0):
    """(loss, lse, pixel_weight, grad_input) of the reference on the same values; with OoD
    pixels (``_ood_mask``) their loss is ood_scale times the CE against the uniform distribution
    and their pixel weight ood_scale."""
    x = input.detach().clone().requires_grad_(True)
    if samples is not None:
        sigma = reference.mc_uncertainty(samples, correction)[0]
    pixel_weight = reference.uncertainty_weight(sigma, alpha)
    if alpha == 0:
        pixel_weight = torch.ones_like(pixel_weight)
    ood = _ood_mask(target, ignore_index, ood_index, ood_scale)
    loss = reference.weighted_cross_entropy(x, target, pixel_weight, weight=weight,
                                            ignore_index=ignore_index, label_smoothing=eps,
                                            ood=ood, ood_scale=ood_scale)
    (grad,) = torch.autograd.grad(loss, x, grad_loss)
    lse = torch.logsumexp(x.detach().float(), dim=1)
    pixel_weight = pixel_weight.float()
    if ood is not None:
        pixel_weight = torch.where(ood, torch.tensor(ood_scale, dtype=torch.float32),
                                   pixel_weight)
    return loss.detach(), lse, pixel_weight, grad


def _check_fused(input, target, samples=None, *, sigma=None, weight=None, alpha=3.0,
                 ignore_index=-100, eps=0.1, correction=1, scale=1.0, grad_loss=None,
                 check_labels=True, ood_index=None, ood_scale=0.0):
    """uce_forward and uce_backward against the reference, and the kernels' access modes.
    ood_index None: entropy maximisation off (the ops get ood_index = ignore_index).
    Returns the outputs (loss, norm, pixel_weight, grad) and the two launches."""
    _, C, N = input.shape
    if grad_loss is None:
        grad_loss = torch.rand(target.shape, generator=torch.Generator().manual_seed(1)) + 0.5
    ood_args = (ignore_index if ood_index is None else ood_index, ood_scale)
    loss, norm, pw = H.uce_forward(input, target, samples, sigma, weight, alpha, ignore_index,
                                   eps, correction, check_labels, *ood_args)
    (fwd,) = _launched()
    grad = H.uce_backward(grad_loss, input, target, norm, pw, weight, ignore_index, eps,
                          *ood_args)
    (bwd,) = _launched()

    if samples is None:
        assert fwd["kernel"] == "ce_kernel"
        _check_access_mode(fwd, N, [(input, _elem(input))])
    else:
        # The Monte-Carlo kernels of mc_accumulate / mc_reduce, with the CE as their epilogue.
        assert fwd["kernel"] == ("mc_register_kernel" if C <= 64 else "mc_chunked_kernel")
        assert fwd["args"][0] == _DTYPE_CODE[samples.dtype], fwd
        assert _out(fwd) == f"FusedCe<{_DTYPE_CODE[input.dtype]}>", fwd
        _check_access_mode(fwd, N, [(input, _elem(input)), (samples, _elem(samples))])
    assert bwd["kernel"] == "backward_kernel"
    _check_access_mode(bwd, N, [(input, _elem(input)), (grad, _elem(grad))])

    ref = _expected(input, target, samples, sigma, weight, alpha, ignore_index, eps, correction,
                    grad_loss, ood_index, ood_scale)
    # The pixels with a loss: a known class, or OoD while entropy maximisation is on.
    counted = (target != ignore_index) & (target >= 0) & (target < C)
    ood = _ood_mask(target, ignore_index, ood_index, ood_scale)
    if ood is not None:
        counted = counted | ood
        assert torch.equal(pw[ood], torch.full_like(pw[ood], ood_scale)), "OoD pixel weight"
    _close("loss", loss, ref[0], dtype=torch.float32, scale=5 * scale)
    _close("norm (log-sum-exp)", norm.sum(0), ref[1], dtype=torch.float32, scale=scale)
    assert torch.equal(norm[0], input.float().amax(1)), "norm[0] is the max logit"
    _close("pixel_weight", pw, ref[2], dtype=torch.float32, scale=5 * scale)
    _close("grad", grad, ref[3], scale=5 * scale)
    assert torch.count_nonzero(loss[~counted]) == 0
    assert torch.count_nonzero(grad.transpose(0, 1)[:, ~counted]) == 0
    return (loss, norm, pw, grad), (fwd, bwd)


# Class counts in every register bucket (1-4, 5-8, 9-16, 17-32, 33-64) and class-chunked (> 64).
CLASSES = [1, 3, 5, 8, 12, 19, 33, 64, 65, 150]
LAYOUTS = [  # (pixels, input offset, samples offset)
    (64, 0, 0),    # vector loads
    (64, 1, 1),    # both pointers misaligned by one element: scalar loads
    (64, 2, 2),    # 8-byte (fp32) / 4-byte (fp16) aligned: vector only where that suffices
    (64, 0, 1),    # logits aligned, samples not
    (37, 0, 0),    # N not a multiple of any vector width
    (1, 0, 0),     # no spatial dims: the classes of a pixel adjacent
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("classes", CLASSES)
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda v: f"N{v[0]}-off{v[1]}{v[2]}")
def test_fused_paths(dtype, classes, layout):
    pixels, input_offset, samples_offset = layout
    batch = 5 if pixels == 1 else 2
    input, target, samples = _problem(batch, classes, pixels, 3, dtype=dtype, seed=classes)
    input = _with_offset(input, input_offset)
    samples = _with_offset(samples, samples_offset)
    weight = torch.rand(classes) + 0.5
    _check_fused(input, target, samples, weight=weight)
    sigma = _with_offset(torch.rand(target.shape), input_offset)
    _check_fused(input, target, sigma=sigma, eps=0.0)


@pytest.mark.parametrize("sample_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("classes", [3, 19, 150])
def test_dtype_mixes(dtype, sample_dtype, classes):
    input, target, samples = _problem(2, classes, 48, 4, dtype=dtype, sample_dtype=sample_dtype)
    _check_fused(input, target, samples, alpha=10.0)


@pytest.mark.parametrize("classes", [65, 150, 1000])
@pytest.mark.parametrize("beta", [2, 23, 24])
def test_chunked_shared_memory_and_scratch(classes, beta):
    """2 * beta * 256 floats of per-block normalisers fit in 48 KiB - 256 up to beta = 23
    (dynamic shared memory, sized exactly); from 24 on they go to a global scratch slice per
    block."""
    input, target, samples = _problem(2, classes, 40, beta, seed=beta)
    _check_fused(input, target, samples, alpha=10.0, correction=0)
    H.uce_forward(input, target, samples, None, None, 10.0, -100, 0.0, 0, True, *NO_OOD)
    (k,) = _launched()
    assert k["smem"] == (2 * beta * 256 * 4 if beta <= 23 else 0), k


@pytest.mark.parametrize("reverse", [False, True], ids=["in-order", "reversed"])
def test_scratch_grid_capped_at_8_per_sm(reverse):
    """With 1 SM the scratch path runs 8 blocks over 10 tiles (grid-stride), each block with
    its own scratch slice; capping the blocks run further must not change a bit."""
    input, target, samples = _problem(3, 70, 777, 24, ignore_frac=0.1)
    H.configure(132, 0, False, False)
    want = H.uce_forward(input, target, samples, None, None, 10.0, -100, 0.1, 1, True, *NO_OOD)
    H.launches()
    for max_blocks in (0, 3, 1):
        H.configure(1, max_blocks, reverse, False)
        got, (k, _) = _check_fused(input, target, samples, alpha=10.0)
        assert (k["grid"], k["grid_run"]) == (8, max_blocks or 8) and k["smem"] == 0, k
        for a, b in zip(got[:3], want, strict=True):
            assert torch.equal(a, b)


def test_failed_device_query_falls_back_and_clears_the_error():
    """cudaDeviceGetAttribute failing (or reporting 0 SMs) gives the 128-SM plan; the error is
    cleared, so the launch check after the kernel does not report it."""
    input, target, samples = _problem(1, 66, 300, 30)
    for sms, fail in ((132, True), (0, False)):
        H.configure(sms, 0, False, fail)
        _, (k, _) = _check_fused(input, target, samples)
        assert k["grid"] == 2 and k["smem"] == 0, k  # 2 tiles < 8 * 128


@pytest.mark.parametrize("max_blocks", [1, 2])
@pytest.mark.parametrize("classes", [3, 19, 40, 150])
@pytest.mark.parametrize("with_samples", [True, False], ids=["samples", "sigma"])
def test_grid_stride_loops_with_capped_grids(max_blocks, classes, with_samples):
    """Fewer blocks than tiles, run last to first: every kernel loops over the rest, and the
    results are bit-identical to a full grid."""
    input, target, samples = _problem(3, classes, 1001, 2, seed=classes)
    sigma = None if with_samples else torch.rand(target.shape)
    samples = samples if with_samples else None
    full, launches = _check_fused(input, target, samples, sigma=sigma)
    assert all(k["grid"] > max_blocks for k in launches), launches
    H.configure(132, max_blocks, True, False)
    capped, launches = _check_fused(input, target, samples, sigma=sigma)
    assert all(k["grid_run"] == max_blocks for k in launches), launches
    for a, b in zip(capped, full, strict=True):
        assert torch.equal(a, b)


def _bits(t):
    """The float32 tensor's bit patterns: equal exactly when the values are, NaNs included."""
    return t.contiguous().view(torch.int32)


@pytest.mark.parametrize("sample_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("classes", [1, 3, 8, 12, 33, 64, 65, 150])
@pytest.mark.parametrize(("pixels", "offset"), [(64, 0), (37, 0), (64, 1)],
                         ids=["vector", "odd-N", "misaligned"])
def test_fused_sigma_is_mc_reduce_sigma(sample_dtype, classes, pixels, offset):
    """The fused forward's sigma comes from the kernels of mc_reduce: given mc_reduce's sigma
    of the same stack, the CE-only forward returns the fused forward's loss, norm and pixel
    weight bit for bit. With exact ties between the best classes (the first maximum wins), a
    NaN sample (every probability of its pixel NaN: pred 0, sigma NaN), both corrections, and
    on the chunked path a beta beyond its shared memory."""
    beta = 24 if classes == 150 else 5
    input, target, samples = _problem(2, classes, pixels, beta, sample_dtype=sample_dtype,
                                      seed=classes + pixels)
    if classes > 1:
        samples[:, :, 1] = samples[:, :, 0]       # classes 0 and 1 tie everywhere,
        samples[:, :, :2, :8] = 10.0              # as the best two in pixels 0 .. 7
        samples[1, 0, classes - 1, 20] = NAN      # pixel (0, 20): NaN probabilities
        target[0, 20] = 0                         # and a NaN loss
    samples = _with_offset(samples, offset)
    weight = torch.rand(classes) + 0.5
    for correction in (0, 1):
        fused = H.uce_forward(input, target, samples, None, weight, 10.0, -100, 0.1,
                              correction, True, *NO_OOD)
        (k,) = _launched()
        assert _out(k).startswith("FusedCe"), k
        sigma, pred, _, _, probs = H.mc_reduce(samples, None, None, None, 0, 1, pixels, 1,
                                               pixels, False, correction, True, False)
        (k,) = _launched()
        assert _out(k) == "Reduce", k
        given = H.uce_forward(input, target, None, sigma, weight, 10.0, -100, 0.1, correction,
                              True, *NO_OOD)
        assert [k["kernel"] for k in _launched()] == ["ce_kernel"]
        for name, a, b in zip(("loss", "norm", "pixel_weight"), fused, given, strict=True):
            assert torch.equal(_bits(a), _bits(b)), name
        if classes > 1:
            assert torch.equal(pred[:, :8], torch.zeros_like(pred[:, :8]))
            assert torch.equal(_bits(probs[:, 0]), _bits(probs[:, 1]))
            assert torch.isnan(probs[0, :, 20]).all() and pred[0, 20] == 0
            assert torch.isnan(sigma[0, 20]) and torch.isnan(fused[0][0, 20])
        ref = reference.mc_reduce(samples, None, None, None, 0, (1, pixels), (1, pixels), False,
                                  correction, True, False)
        stable = _stable(ref[4]) & ~torch.isnan(ref[4]).any(1)
        assert torch.equal(pred[stable], ref[1][stable]), "pred"
        _close("sigma (vs reference)", sigma[stable], ref[0][stable], scale=5)


# --------------------------------------------------------------- options, labels, special values


@pytest.mark.parametrize("classes", [5, 150])
@pytest.mark.parametrize("eps", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("with_samples", [True, False], ids=["samples", "sigma"])
def test_weights_and_label_smoothing(classes, eps, weighted, with_samples):
    input, target, samples = _problem(2, classes, 40, 3, dtype=torch.bfloat16, seed=7)
    weight = torch.rand(classes) + 0.1 if weighted else None
    if with_samples:
        _check_fused(input, target, samples, weight=weight, eps=eps)
    else:
        _check_fused(input, target, sigma=torch.rand(target.shape), weight=weight, eps=eps)


@pytest.mark.parametrize("classes", [4, 19, 150])
@pytest.mark.parametrize(("ignore_index", "ignore_frac"),
                         [(-100, 0.5), (255, 1.0), (0, 0.3)],
                         ids=["half-ignored", "all-ignored", "ignore-index-0"])
def test_ignore_index(classes, ignore_index, ignore_frac):
    input, target, samples = _problem(2, classes, 48, 3, ignore_index=ignore_index,
                                      ignore_frac=ignore_frac)
    (loss, _, _, grad), _ = _check_fused(input, target, samples, ignore_index=ignore_index)
    if ignore_frac == 1.0:
        assert torch.count_nonzero(loss) == 0 and torch.count_nonzero(grad) == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("upstream", [INF, -INF, NAN], ids=str)
def test_backward_upstream_gradients(dtype, upstream):
    """Expanded (zero-stride) and non-unit upstream gradients. A non-finite upstream gradient
    on the ignored pixels gives them exactly 0 for every class, as the reference (whose
    ignored pixels are a select of constants); every other pixel gets the reference's
    gradient, and no entry anywhere is non-finite."""
    input, target, samples = _problem(2, 19, 64, 3, dtype=dtype, ignore_index=255)
    weight = torch.rand(19) + 0.5
    _check_fused(input, target, samples, weight=weight, ignore_index=255,
                 grad_loss=torch.full((), 0.7).expand(target.shape))
    _check_fused(input, target, samples, weight=weight, ignore_index=255,
                 grad_loss=torch.randn(target.shape) * 3)
    ignored = target == 255
    assert 0 < ignored.sum() < ignored.numel()
    grad_loss = torch.rand(target.shape) + 0.5
    grad_loss[ignored] = upstream
    (_, _, _, grad), _ = _check_fused(input, target, samples, weight=weight, alpha=10.0,
                                      ignore_index=255, grad_loss=grad_loss)
    ref = _expected(input, target, samples, None, weight, 10.0, 255, 0.1, 1, grad_loss)[3]
    per_class = ignored.unsqueeze(1).expand_as(grad)
    assert torch.equal(ref[per_class], torch.zeros_like(ref[per_class])), "reference"
    assert torch.equal(grad[per_class], torch.zeros_like(grad[per_class]))
    assert torch.isfinite(ref).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("classes", [5, 40, 150])
def test_backward_is_shift_invariant(classes):
    """The backward forms exp((x - max) - log-sum) from norm: logits around 1e4 get the
    reference's gradient to float32 rounding (x - lse would carry ulp(1e4) ~ 1e-3 into every
    probability)."""
    input, target, samples = _problem(2, classes, 64, 3, seed=classes)
    _check_fused(input + 1e4, target, samples + 1e4, eps=0.1)


def _bad_labels(classes, pixels=1500):
    """A problem with invalid labels in several tiles: (input, target, samples, bad), the lowest
    flat pixel index b * N + n with an invalid label being (0, 1200), label -7."""
    input, target, samples = _problem(2, classes, pixels, 2, ignore_frac=0.1, seed=classes)
    target[1, 1400] = classes + 5
    target[1, 3] = classes
    target[0, 1200] = -7           # the lowest flat index b * N + n
    target[1, 0] = 2**40
    target[0, 1300] = -100         # ignore_index itself stays valid
    bad = (target != -100) & ((target < 0) | (target >= classes))
    assert bad.sum() == 4
    return input, target, samples, bad


@pytest.mark.parametrize("classes", [5, 150])
@pytest.mark.parametrize("with_samples", [True, False], ids=["samples", "sigma"])
@pytest.mark.parametrize("max_blocks", [0, 1], ids=["full-grid", "one-block"])
def test_invalid_labels_report_the_lowest_pixel(classes, with_samples, max_blocks):
    """check_labels=True: several invalid labels in several tiles, blocks run last to first;
    the error names the label of the lowest flat pixel index."""
    input, target, samples, _ = _bad_labels(classes)
    H.configure(132, max_blocks, True, False)
    args = (samples, None) if with_samples else (None, torch.rand(target.shape))
    pattern = rf"target contains label -7, outside \[0, {classes}\) and not ignore_index \(-100\)"
    with pytest.raises(ValueError, match=pattern):
        H.uce_forward(input, target, *args, None, 2.0, -100, 0.0, 1, True, *NO_OOD)
    target[0, 1200] = 0            # next: pixel (1, 0)
    with pytest.raises(ValueError, match=rf"target contains label {2**40}, outside"):
        H.uce_forward(input, target, *args, None, 2.0, -100, 0.0, 1, True, *NO_OOD)


@pytest.mark.parametrize("classes", [5, 19, 40, 150])
@pytest.mark.parametrize("with_samples", [True, False], ids=["samples", "sigma"])
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_unchecked_invalid_labels_are_ignored_pixels(classes, with_samples, eps):
    """check_labels=False: no error; an invalid label's pixel has loss 0 and gradient 0 for
    every class (never read out of bounds: ASan would report it), and every output equals the
    run with those labels replaced by ignore_index, bit for bit. The backward never checks:
    it does not raise for them either, whatever the forward did."""
    input, target, samples, bad = _bad_labels(classes)
    weight = torch.rand(classes) + 0.5
    sigma = None if with_samples else torch.rand(target.shape)
    samples = samples if with_samples else None
    grad_loss = torch.rand(target.shape) + 0.5
    got, _ = _check_fused(input, target, samples, sigma=sigma, weight=weight, eps=eps,
                          grad_loss=grad_loss, check_labels=False)
    loss, _, _, grad = got
    assert torch.count_nonzero(loss[bad]) == 0
    assert torch.count_nonzero(grad.transpose(0, 1)[:, bad]) == 0
    ignored = target.masked_fill(bad, -100)
    want, _ = _check_fused(input, ignored, samples, sigma=sigma, weight=weight, eps=eps,
                           grad_loss=grad_loss, check_labels=False)
    for name, a, b in zip(("loss", "norm", "pixel_weight", "grad"), got, want, strict=True):
        assert torch.equal(a, b), name
    # Checked on the clean labels, the forward agrees with the unchecked one too.
    checked = H.uce_forward(input, ignored, samples, sigma, weight, 3.0, -100, eps, 1, True,
                            *NO_OOD)
    for name, a, b in zip(("loss", "norm", "pixel_weight"), checked, want[:3], strict=True):
        assert torch.equal(a, b), name
    # The backward with the invalid labels, from the checked forward of the clean ones.
    grad = H.uce_backward(grad_loss, input, target, checked[1], checked[2], weight, -100, eps,
                          *NO_OOD)
    assert torch.equal(grad, want[3])


# ------------------------------------------------------------ entropy maximisation (OoD labels)

OOD = 254


def _with_ood(target, frac=0.25, seed=3):
    """``target`` with a random share ``frac`` of its pixels relabelled OOD."""
    gen = torch.Generator().manual_seed(seed)
    return target.masked_fill(torch.rand(target.shape, generator=gen) < frac, OOD)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("classes", [1, 5, 12, 19, 64, 65, 150])
@pytest.mark.parametrize("layout", [LAYOUTS[0], LAYOUTS[1], LAYOUTS[4]],
                         ids=lambda v: f"N{v[0]}-off{v[1]}{v[2]}")
def test_ood_paths(dtype, classes, layout):
    """Entropy maximisation on every register bucket and the class-chunked path (its global
    scratch too: beta 24 at 150 classes), in vector and scalar mode, fused (samples) and with a
    given sigma, with class weights and label smoothing: OoD pixels beside known and ignored
    ones against the reference, their saved pixel weight ood_scale; checked and unchecked
    labels give the same bits, and so does the CE-only forward given mc_reduce's sigma."""
    pixels, input_offset, samples_offset = layout
    beta = 24 if classes == 150 else 3
    input, target, samples = _problem(2, classes, pixels, beta, dtype=dtype, seed=classes + 1)
    target = _with_ood(target)
    assert (target == OOD).any() and (target == -100).any() and (target >= 0).any()
    input = _with_offset(input, input_offset)
    samples = _with_offset(samples, samples_offset)
    weight = torch.rand(classes) + 0.5
    ood = dict(ood_index=OOD, ood_scale=3.0)
    checked, _ = _check_fused(input, target, samples, weight=weight, eps=0.1, **ood)
    unchecked, _ = _check_fused(input, target, samples, weight=weight, eps=0.1,
                                check_labels=False, **ood)
    for name, a, b in zip(("loss", "norm", "pixel_weight", "grad"), checked, unchecked,
                          strict=True):
        assert torch.equal(a, b), name
    sigma = H.mc_reduce(samples, None, None, None, 0, 1, pixels, 1, pixels, False, 1, False,
                        False)[0]
    H.launches()
    given, _ = _check_fused(input, target, sigma=sigma, weight=weight, eps=0.1, **ood)
    for name, a, b in zip(("loss", "norm", "pixel_weight"), checked[:3], given[:3],
                          strict=True):
        assert torch.equal(_bits(a), _bits(b)), name
    sigma = _with_offset(torch.rand(target.shape), input_offset)
    _check_fused(input, target, sigma=sigma, eps=0.0, ood_index=OOD, ood_scale=9.0)


@pytest.mark.parametrize("eps", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("classes", [5, 150])
def test_ood_weights_and_label_smoothing(eps, weighted, classes):
    """OoD pixels with and without class weights, at every label smoothing (eps = 1 makes every
    pixel's loss the uniform CE), fused and with a given sigma, ignore_index 255."""
    input, target, samples = _problem(2, classes, 40, 3, dtype=torch.bfloat16, seed=7,
                                      ignore_index=255)
    target = _with_ood(target, 0.3)
    weight = torch.rand(classes) + 0.1 if weighted else None
    ood = dict(ignore_index=255, ood_index=OOD, ood_scale=0.5)
    _check_fused(input, target, samples, weight=weight, eps=eps, **ood)
    _check_fused(input, target, sigma=torch.rand(target.shape), weight=weight, eps=eps, **ood)


@pytest.mark.parametrize("classes", [3, 19, 150])
@pytest.mark.parametrize("with_samples", [True, False], ids=["samples", "sigma"])
@pytest.mark.parametrize("check_labels", [True, False], ids=["checked", "unchecked"])
def test_ood_scale_zero_is_ignore_index(classes, with_samples, check_labels):
    """ood_scale == 0: an OoD pixel is exactly an ignored one. Loss, norm, pixel weight and
    gradient equal, bit for bit, those of the run with its label replaced by ignore_index and
    entropy maximisation off; the checked forward raises nothing for it."""
    input, target, samples = _problem(2, classes, 64, 3, seed=classes)
    target = _with_ood(target)
    weight = torch.rand(classes) + 0.5
    sigma = None if with_samples else torch.rand(target.shape)
    samples = samples if with_samples else None
    got, _ = _check_fused(input, target, samples, sigma=sigma, weight=weight,
                          check_labels=check_labels, ood_index=OOD, ood_scale=0.0)
    ignored = target.masked_fill(target == OOD, -100)
    want, _ = _check_fused(input, ignored, samples, sigma=sigma, weight=weight,
                           check_labels=check_labels)
    for name, a, b in zip(("loss", "norm", "pixel_weight", "grad"), got, want, strict=True):
        assert torch.equal(_bits(a), _bits(b)), name


@pytest.mark.parametrize("classes", [5, 150])
@pytest.mark.parametrize("with_samples", [True, False], ids=["samples", "sigma"])
@pytest.mark.parametrize("max_blocks", [0, 1], ids=["full-grid", "one-block"])
def test_ood_labels_beside_bad_labels(classes, with_samples, max_blocks):
    """A label ood_index is never a bad one. Checked (blocks run last to first): the error names
    the lowest pixel with a bad label although OoD labels come before it, in the wording that
    names ood_index (the CPU kernels' text), also with ood_scale == 0. Unchecked: the bad
    labels' pixels are ignored ones (every output equal, bit for bit, to the run with them
    replaced by ignore_index) while the OoD pixels keep their loss."""
    input, target, samples, bad = _bad_labels(classes)
    target[0, :1200:7] = OOD       # before the first bad label, (0, 1200)
    target[1, 5] = OOD
    assert torch.equal(bad, (target != -100) & (target != OOD)
                       & ((target < 0) | (target >= classes)))
    sigma = torch.rand(target.shape)
    args = (samples, None) if with_samples else (None, sigma)
    H.configure(132, max_blocks, True, False)
    pattern = (rf"target contains label -7, outside \[0, {classes}\) and neither ignore_index "
               rf"\(-100\) nor ood_index \({OOD}\)")
    # The CPU kernels' text, from a target whose one bad label is that first one (which bad
    # label they name among several is not specified).
    single = target.masked_fill(bad, 0)
    single[0, 1200] = -7
    for scale in (3.0, 0.0):
        with pytest.raises(ValueError, match=pattern) as err:
            H.uce_forward(input, target, *args, None, 2.0, -100, 0.1, 1, True, OOD, scale)
        if "cpu" in uce_fast.available_backends():
            with pytest.raises(ValueError) as cpu_err:
                _cpu_forward(input, single, *args, None, 2.0, -100, 0.1, 1, ood=(OOD, scale))
            assert str(err.value) == str(cpu_err.value)
    H.configure(132, 0, False, False)
    H.launches()

    weight = torch.rand(classes) + 0.5
    grad_loss = torch.rand(target.shape) + 0.5
    common = dict(sigma=None if with_samples else sigma, weight=weight, eps=0.2,
                  grad_loss=grad_loss, ood_index=OOD, ood_scale=3.0)
    samples = samples if with_samples else None
    got, _ = _check_fused(input, target, samples, check_labels=False, **common)
    want, _ = _check_fused(input, target.masked_fill(bad, -100), samples, **common)
    for name, a, b in zip(("loss", "norm", "pixel_weight", "grad"), got, want, strict=True):
        assert torch.equal(a, b), name
    assert torch.count_nonzero(got[0][bad]) == 0
    assert (got[0][target == OOD] > 0).all()


def test_ood_argument_checks():
    """Both ops check ood_index and ood_scale as the CPU kernels do (uce_checks::check_ood),
    before any launch; ood_index == ignore_index is accepted inside [0, C) (off)."""
    input, target, samples = _problem(2, 5, 16, 2)
    loss, norm, pw = H.uce_forward(input, target, samples, None, None, 2.0, -100, 0.0, 1, True,
                                   *NO_OOD)
    H.launches()
    index_error = r"ood_index must be outside \[0, 5\) \(or equal ignore_index"
    scale_error = r"ood_scale must be a finite number >= 0"
    for ood_index, ood_scale, match in ((0, 1.0, index_error), (4, 0.0, index_error),
                                        (OOD, -1.0, scale_error), (OOD, INF, scale_error),
                                        (OOD, NAN, scale_error)):
        with pytest.raises(ValueError, match=match):
            H.uce_forward(input, target, samples, None, None, 2.0, -100, 0.0, 1, True,
                          ood_index, ood_scale)
        with pytest.raises(ValueError, match=match):
            H.uce_backward(loss, input, target, norm, pw, None, -100, 0.0, ood_index,
                           ood_scale)
    assert _launched() == []
    ignore_zero = target.masked_fill(target == -100, 0)
    _check_fused(input, ignore_zero, samples, ignore_index=0, ood_index=0, ood_scale=2.0)


@pytest.mark.parametrize("check_labels", [True, False])
def test_labels_of_empty_inputs(check_labels):
    """Nothing to launch (B * N == 0): no kernel runs, and no bad-pixel buffer is made."""
    input = torch.randn(0, 5, 7)
    target = torch.zeros(0, 7, dtype=torch.int64)
    samples = torch.randn(3, 0, 5, 7)
    loss, norm, pw = H.uce_forward(input, target, samples, None, None, 2.0, -100, 0.0, 1,
                                   check_labels, *NO_OOD)
    assert loss.shape == (0, 7) and norm.shape == (2, 0, 7) and pw.shape == (0, 7)
    grad = H.uce_backward(loss, input, target, norm, pw, None, -100, 0.0, *NO_OOD)
    assert grad.shape == input.shape
    assert _launched() == []


@pytest.mark.parametrize("classes", [4, 19, 150])
@pytest.mark.parametrize("fill", [-INF, INF, NAN], ids=str)
def test_non_finite_logits(classes, fill):
    """Non-finite samples and logits give the reference's NaN/inf pattern and values, and the
    CPU kernels' norm."""
    input, target, samples = _problem(1, classes, 8, 3, ignore_frac=0.0)
    samples[:, 0, :, 2] = fill          # a pixel whose every sample row is non-finite
    samples[1, 0, 0, 3] = fill          # one class of one sample
    input[0, 1, 5] = fill               # one logit
    input[0, :, 6] = fill               # every logit of a pixel
    if fill == -INF:                    # a -inf target logit: an infinite loss
        target[0, 5] = 0
    grad_loss = torch.rand(target.shape) + 0.5
    for eps in (0.0, 0.1):
        loss, norm, pw = H.uce_forward(input, target, samples, None, None, 2.0, -100, eps, 1,
                                       True, *NO_OOD)
        grad = H.uce_backward(grad_loss, input, target, norm, pw, None, -100, eps, *NO_OOD)
        ref = _expected(input, target, samples, None, None, 2.0, -100, eps, 1, grad_loss)
        _close("loss (non-finite)", loss, ref[0], scale=5)
        _close("pixel_weight (non-finite)", pw, ref[2], scale=5)
        _close("grad (non-finite)", grad, ref[3], scale=5)
        if "cpu" in uce_fast.available_backends():
            cpu = _cpu_forward(input, target, samples, None, None, 2.0, -100, eps, 1)
            _close("norm (non-finite, vs CPU kernels)", norm, cpu[1], scale=5)


# ------------------------------------------------------------------------ mc_accumulate / reduce


GEOMETRIES = [  # (in_h, in_w), (out_h, out_w), align_corners
    ((4, 8), (4, 8), False),     # read as is, N a multiple of 4 (vector loads)
    ((3, 7), (3, 7), False),     # read as is, odd N
    ((3, 5), (7, 11), False),    # odd upsampling ratios
    ((3, 5), (7, 11), True),
    ((8, 8), (5, 3), False),     # downsampling
    ((8, 8), (5, 3), True),
    ((4, 6), (4, 9), True),      # one dim kept
]


def _geo_id(g):
    (ih, iw), (oh, ow), ac = g
    return f"{ih}x{iw}-{oh}x{ow}" + ("-ac" if ac else "")


def _stack(S, B, C, plane, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(B, C, plane, generator=gen) * 3.0
    return (base + torch.randn(S, B, C, plane, generator=gen)).to(dtype)


def _taps(in_size, out_size, align_corners):
    """Source indices and weights along one dim, as uce::bilinear_scale / bilinear_source (the
    index and weight formula of F.interpolate), every float32 operation rounded on its own."""
    o = torch.arange(out_size, dtype=torch.float32)
    if in_size == out_size:
        i = torch.arange(out_size)
        return i, i, torch.ones(out_size), torch.zeros(out_size)
    f32 = lambda v: torch.tensor(float(v), dtype=torch.float32)  # noqa: E731
    if align_corners:
        scale = f32(in_size - 1) / f32(out_size - 1) if out_size > 1 else f32(0)
        src = scale * o
    else:
        src = (f32(in_size) / f32(out_size) * (o + 0.5) - 0.5).clamp_min(0)
    i0 = src.floor().long().clamp_max(in_size - 1)
    l1 = (src - i0.float()).clamp(0, 1)
    return i0, i0 + (i0 < in_size - 1).long(), 1 - l1, l1


def _upsample(stack, in_size, out_size, align_corners):
    """(S, B, C, in_h * in_w) samples resampled to (S, B, C, out_h * out_w) with the kernels'
    formula, ((x00 l0x + x01 l1x) l0y + (x10 l0x + x11 l1x) l1y) in float32 products and sums,
    rounded to the samples' dtype. The reference then sees the values the kernels see; that the
    formula is F.interpolate's is test_bilinear_formula_is_f_interpolate's."""
    if tuple(in_size) == tuple(out_size):
        return stack
    (ih, iw), (oh, ow) = in_size, out_size
    y0, y1, ly0, ly1 = _taps(ih, oh, align_corners)
    x0, x1, lx0, lx1 = _taps(iw, ow, align_corners)
    g = stack.float().view(*stack.shape[:3], ih, iw)
    at = lambda y, x: g[..., y, :][..., x]  # noqa: E731
    top = at(y0, x0) * lx0 + at(y0, x1) * lx1
    bot = at(y1, x0) * lx0 + at(y1, x1) * lx1
    val = top * ly0[:, None] + bot * ly1[:, None]
    return val.to(stack.dtype).reshape(*stack.shape[:3], oh * ow)


@pytest.mark.parametrize("geometry", GEOMETRIES[2:], ids=_geo_id)
def test_bilinear_formula_is_f_interpolate(geometry):
    (ih, iw), (oh, ow), ac = geometry
    stack = _stack(2, 2, 3, ih * iw, torch.float32)
    want = reference.resample(stack.view(2, 2, 3, ih, iw), (oh, ow), ac).reshape(2, 2, 3, -1)
    _close("bilinear formula vs F.interpolate", _upsample(stack, (ih, iw), (oh, ow), ac), want)


def _check_mc_launch(k, reduce, C, N, streamed):
    assert k["kernel"] == ("mc_register_kernel" if C <= 64 else "mc_chunked_kernel")
    assert _out(k) == ("Reduce" if reduce else "Accumulate"), k
    _check_access_mode(k, N, streamed)


def _stable(mean):
    """Pixels whose best two mean probabilities are further apart than float32 rounding of the
    statistics can move them."""
    top2 = mean.topk(min(2, mean.shape[1]), dim=1).values
    gap = top2[:, 0] - top2[:, -1] if top2.shape[1] > 1 else torch.ones_like(top2[:, 0])
    return gap > 1e-5


def _check_reduce(got, samples, state, count, geometry, want_probs=True, want_entropy=True):
    """mc_reduce's outputs against reference.mc_reduce of the same values (the samples resampled
    as the kernels do): pred where the best two mean probabilities are not within rounding of
    each other, sigma (the std of pred's probability) there too; the optional outputs empty
    unless asked for."""
    (ih, iw), (oh, ow), ac = geometry
    if samples is not None:
        samples = _upsample(samples, (ih, iw), (oh, ow), ac)
    ref = reference.mc_reduce(samples, *state, count, (oh, ow), (oh, ow), ac, 1, True, True)
    stable = _stable(ref[4])
    assert stable.float().mean() > 0.5, "test data has too many near-ties"
    assert torch.equal(got[1][stable], ref[1][stable]), "pred"
    _close("sigma", got[0][stable], ref[0][stable], scale=5)
    wanted = (want_entropy, want_entropy, want_probs)
    for name, a, b, want in zip(("entropy", "mutual_info", "mean_probs"), got[2:], ref[2:],
                                wanted, strict=True):
        if want:
            _close(name, a, b, scale=5)
        else:
            assert a.shape == (0,), name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("classes", [3, 8, 19, 40, 65, 150])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=_geo_id)
def test_mc_accumulate_then_reduce(dtype, classes, geometry):
    """Samples folded in three calls (count > 0 from the second), then mc_reduce of the state
    alone, of the state plus more samples, and of samples alone; every output flavour."""
    (ih, iw), (oh, ow), ac = geometry
    N, plane = oh * ow, ih * iw
    stack = _stack(7, 2, classes, plane, dtype, seed=classes)
    mean = torch.full((2, classes, N), NAN)  # count == 0: never read
    m2 = torch.full((2, classes, N), NAN)
    ent = torch.full((2, N), NAN)
    rmean, rm2, rent = torch.empty_like(mean), torch.empty_like(m2), torch.empty_like(ent)
    count = 0
    for part in (stack[:2], stack[2:5], stack[5:6]):
        H.mc_accumulate_(mean, m2, ent, part, count, ih, iw, oh, ow, ac)
        (k,) = _launched()
        _check_mc_launch(k, False, classes, N, [(part, _elem(part)), (mean, 4), (m2, 4)])
        reference.mc_accumulate_(rmean, rm2, rent, _upsample(part, (ih, iw), (oh, ow), ac),
                                 count, (oh, ow), (oh, ow), ac)
        count += part.shape[0]
    _close("state mean", mean, rmean, scale=5)
    _close("state m2", m2, rm2, scale=5)
    _close("state entropy", ent, rent, scale=5)

    calls = [  # (samples, state, count, want_probs, want_entropy)
        (None, True, count, True, True),
        (stack[6:], True, count, False, True),
        (stack[6:], True, count, True, False),
        (stack, False, 0, True, True),
        (stack[:2], False, 0, False, False),
    ]
    for samples, with_state, cnt, want_probs, want_entropy in calls:
        state = (mean, m2, ent) if with_state else (None, None, None)
        rstate = (rmean, rm2, rent) if with_state else (None, None, None)
        got = H.mc_reduce(samples, *state, cnt, ih, iw, oh, ow, ac, 1, want_probs, want_entropy)
        (k,) = _launched()
        probs = got[4] if want_probs else None
        _check_mc_launch(k, True, classes, N,
                         [(samples, _elem(samples) if samples is not None else 4),
                          (state[0], 4), (state[1], 4), (probs, 4)])
        _check_reduce(got, samples, rstate, cnt, geometry, want_probs, want_entropy)


_PLAIN, _RESAMPLED = ((4, 8), (4, 8), False), ((3, 5), (7, 11), True)


@pytest.mark.parametrize(("geometry", "S", "sms"), [
    (_PLAIN, 15, 132), (_PLAIN, 16, 132), (_PLAIN, 16, 1),                # 3 * S * 256 floats
    (_RESAMPLED, 31, 132), (_RESAMPLED, 32, 132), (_RESAMPLED, 32, 1),    # 3 * S * 128 floats
], ids=lambda v: str(v) if isinstance(v, int) else _geo_id(v))
def test_mc_chunked_shared_memory_and_scratch(geometry, S, sms):
    """The per-sample statistics of the class-chunked mc kernels: dynamic shared memory up to
    48 KiB - 256, a global scratch slice per block beyond (8 blocks per SM at most)."""
    (ih, iw), (oh, ow), ac = geometry
    N = oh * ow
    pixels = 128 if (ih, iw) != (oh, ow) else 256  # per tile
    B = -(-9 * pixels // N) if sms == 1 else 2  # 1 SM: 9 tiles for the 8 blocks of the grid
    stack = _stack(S, B, 66, ih * iw, torch.float16, seed=S)
    H.configure(sms, 0, False, False)
    got = H.mc_reduce(stack, None, None, None, 0, ih, iw, oh, ow, ac, 1, True, True)
    (k,) = _launched()
    fits = 3 * S * pixels * 4 <= 48 * 1024 - 256
    tiles = -(-B * N // pixels)
    assert k["smem"] == (3 * S * pixels * 4 if fits else 0), k
    assert k["grid"] == (tiles if fits else min(tiles, 8 * sms)), k
    _check_reduce(got, stack, (None, None, None), 0, geometry)


@pytest.mark.parametrize("classes", [3, 19, 150])
@pytest.mark.parametrize("offset", [0, 1])
def test_mc_state_offsets_and_capped_grid(classes, offset):
    """A state whose tensors start one element into their storage (scalar loads), and grids
    capped to one block run last to first (bit-identical results)."""
    B, N = 3, 700
    stack = _stack(4, B, classes, N, torch.float32, seed=3)
    mean, m2, ent = (_with_offset(torch.zeros(shape), offset)
                     for shape in ((B, classes, N), (B, classes, N), (B, N)))
    H.mc_accumulate_(mean, m2, ent, stack[:2], 0, 1, N, 1, N, False)
    H.mc_accumulate_(mean, m2, ent, stack[2:], 2, 1, N, 1, N, False)
    for k in _launched():
        _check_mc_launch(k, False, classes, N, [(stack, 4), (mean, 4), (m2, 4)])
    full = H.mc_reduce(stack[:1], mean, m2, ent, 4, 1, N, 1, N, False, 1, True, True)
    assert all(k["grid"] > 1 for k in _launched())
    H.configure(1, 1, True, False)
    state = [t.clone() for t in (mean, m2, ent)]
    H.mc_accumulate_(*state, stack[:1], 4, 1, N, 1, N, False)
    capped = H.mc_reduce(stack[:1], mean, m2, ent, 4, 1, N, 1, N, False, 1, True, True)
    assert all(k["grid_run"] == 1 for k in _launched())
    for a, b in zip(capped, full, strict=True):
        assert torch.equal(a, b)
    _check_reduce(full, torch.cat([stack, stack[:1]]), (None, None, None), 0,
                  ((1, N), (1, N), False))
    # The capped accumulate equals the full-grid state update.
    ref_state = [t.clone() for t in (mean, m2, ent)]
    H.configure(132, 0, False, False)
    H.mc_accumulate_(*ref_state, stack[:1], 4, 1, N, 1, N, False)
    for a, b in zip(state, ref_state, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("classes", [4, 150])
@pytest.mark.parametrize("fill", [-INF, INF, NAN], ids=str)
def test_mc_non_finite_samples(classes, fill):
    """Non-finite samples: the reference's NaN/inf pattern (a -inf class has probability 0)."""
    stack = _stack(3, 1, classes, 8, torch.float32)
    stack[:, 0, :, 2] = fill
    stack[1, 0, 0, 3] = fill
    stack[:, 0, :2, 5] = fill
    got = H.mc_reduce(stack, None, None, None, 0, 1, 8, 1, 8, False, 1, True, True)
    ref = reference.mc_reduce(stack, None, None, None, 0, (1, 8), (1, 8), False, 1, True, True)
    for name, a, b in zip(("sigma", "entropy", "mutual_info", "mean_probs"), got[:1] + got[2:],
                          ref[:1] + ref[2:], strict=True):
        _close(f"{name} (non-finite)", a, b, scale=5)
    finite = torch.isfinite(ref[4]).all(1)
    assert torch.equal(got[1][finite], ref[1][finite])


@pytest.mark.parametrize("classes", [5, 40, 150])
def test_mc_reduce_nan_mean_is_the_maximum(classes):
    """A state whose mean is NaN in one class only (a merged state can hold that; samples
    cannot, their NaN reaches every class of the pixel): pred is the first NaN class, as
    torch.argmax, whatever the finite means; sigma is that class's M2-based std."""
    B, N = 2, 40
    stack = _stack(3, B, classes, N, torch.float32, seed=classes)
    mean, m2, ent = (torch.zeros(shape) for shape in ((B, classes, N), (B, classes, N), (B, N)))
    H.mc_accumulate_(mean, m2, ent, stack, 0, 1, N, 1, N, False)
    first, second = classes // 2, classes - 1
    mean[0, first, 3] = NAN
    mean[0, second, 3] = NAN
    mean[1, second, 7] = NAN
    mean[0, 0, 9] = NAN                   # class 0 itself
    got = H.mc_reduce(None, mean, m2, ent, 3, 1, N, 1, N, False, 1, False, False)
    (k,) = _launched()[-1:]
    assert _out(k) == "Reduce", k
    ref = reference.mc_reduce(None, mean, m2, ent, 3, (1, N), (1, N), False, 1, False, False)
    assert (got[1][0, 3], got[1][1, 7], got[1][0, 9]) == (first, second, 0)
    assert torch.equal(got[1], ref[1])
    _close("sigma (NaN means)", got[0], ref[0], scale=5)
