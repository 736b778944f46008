"""Training-harness engine: MC sampling keeps BatchNorm statistics, the parity check, evaluation."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import uce_fast  # noqa: E402
from train.engine import (  # noqa: E402
    ANOMALY_SCORES,
    SampleLevers,
    anomaly_score_ranges,
    anomaly_scores,
    compute_loss,
    draw_mc_samples,
    evaluate,
    evaluate_anomalies,
    init_batchnorm_statistics,
    mc_dropout_mode,
    parity_check,
)
from train.models import build_model  # noqa: E402


def _model(dropout: float = 0.3) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(5, "resnet18", dropout=dropout, width=8, decoder_channels=16,
                        skip_channels=8, atrous_rates=(1, 2, 3))
    with torch.no_grad():  # non-trivial running statistics
        model.train()
        model(torch.randn(2, 3, 32, 32))
    return model


def _bn_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()
            if "running" in k or "num_batches_tracked" in k}


def test_sample_passes_leave_batchnorm_statistics_unchanged():
    model = _model()
    model.train()
    before = _bn_buffers(model)
    x = torch.randn(2, 3, 32, 32)
    acc, samples = draw_mc_samples(model, x, 4, keep_stack=True)
    assert samples.shape == (4, 2, 5, 32, 32) and not samples.requires_grad
    assert acc.count == 4 and acc.shape == (2, 5, 32, 32)
    torch.testing.assert_close(acc.sigma(), uce_fast.predictive_uncertainty(samples))
    after = _bn_buffers(model)
    assert before.keys() == after.keys() and len(before) > 0
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert not torch.allclose(samples[0], samples[1])  # dropout is active
    assert model.training and all(m.training for m in model.modules())  # modes restored


def test_bn_update_in_samples_option_changes_statistics():
    model = _model()
    before = _bn_buffers(model)
    draw_mc_samples(model, torch.randn(2, 3, 32, 32), 3, bn="update")
    after = _bn_buffers(model)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any(k.endswith("running_mean") for k in changed)
    assert int(after["encoder.bn1.num_batches_tracked"]) == int(
        before["encoder.bn1.num_batches_tracked"]) + 3


def test_batch_statistics_mode_matches_the_training_pass_without_updating():
    model = _model()
    before = _bn_buffers(model)
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(5)
    _, samples = draw_mc_samples(model, x, 2, bn="batch", keep_stack=True)
    assert all(torch.equal(v, _bn_buffers(model)[k]) for k, v in before.items())
    assert all(m.track_running_stats for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    torch.manual_seed(5)
    with torch.no_grad():
        train_pass = model.train()(x)  # same dropout masks, batch statistics
    torch.testing.assert_close(samples[0], train_pass)
    with pytest.raises(ValueError, match="bn must be one of"):
        draw_mc_samples(model, x, 2, bn="frozen")


def test_low_resolution_sample_passes_equal_the_upsampled_ones():
    """Sampling before the head's ×4 upsampling, upsampled inside the accumulator's kernels,
    gives the statistics of the model's own full-resolution passes."""
    model = _model()
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(3)
    low, low_stack = draw_mc_samples(model, x, 3, size=(32, 32), keep_stack=True)
    torch.manual_seed(3)
    full, full_stack = draw_mc_samples(model, x, 3, keep_stack=True)
    assert low_stack.shape == (3, 2, 5, 8, 8) and low.shape == full.shape == (2, 5, 32, 32)
    torch.testing.assert_close(
        nn.functional.interpolate(low_stack.flatten(0, 1), size=(32, 32), mode="bilinear",
                                  align_corners=True), full_stack.flatten(0, 1))
    torch.testing.assert_close(low.sigma(), full.sigma(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(low.stats().mean_probs, full.stats().mean_probs)


def test_mc_mode_uses_running_statistics_and_restores_eval_mode():
    model = _model(dropout=0.0)
    model.eval()
    bn = model.encoder.bn1
    with mc_dropout_mode(model):
        assert not bn.training and model.encoder.dropout.training
        assert model.decoder.aspp[0].project[-1].training  # the ASPP Dropout(0.5) too
    assert not model.training and not any(m.training for m in model.modules())
    # BatchNorm in eval mode: the encoder (dropout 0) is deterministic during sampling
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), mc_dropout_mode(model):
        a, b = model.encoder(x)[1], model.encoder(x)[1]
        ref = model.encoder.eval()(x)[1]
    assert torch.equal(a, b) and torch.equal(a, ref)


def test_init_batchnorm_statistics_sets_only_fresh_layers_exactly():
    torch.manual_seed(0)
    model = build_model(5, "resnet18", dropout=0.3, width=8, decoder_channels=16,
                        skip_channels=8, atrous_rates=(1, 2, 3))
    model.eval()
    kept = model.decoder.block1[1]
    with torch.no_grad():
        kept.running_mean.fill_(0.5)  # e.g. pretrained statistics
    batches = [torch.randn(2, 3, 32, 32) for _ in range(3)]
    layers, used = init_batchnorm_statistics(model, batches)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert used == 3 and layers == len(bns) - 1
    assert torch.equal(kept.running_mean, torch.full_like(kept.running_mean, 0.5))
    assert int(kept.num_batches_tracked) == 0
    assert all(m.momentum == 0.1 for m in bns) and not model.training
    # the first BatchNorm sees conv1's output: its mean is the exact average over the batches
    with torch.no_grad():
        expected = torch.stack([model.encoder.conv1(x).mean((0, 2, 3)) for x in batches]).mean(0)
    torch.testing.assert_close(model.encoder.bn1.running_mean, expected)
    assert int(model.encoder.bn1.num_batches_tracked) == 3
    assert init_batchnorm_statistics(model, batches) == (0, 0)  # nothing fresh any more


def _uce_case(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 6, 7, generator=g).to(dtype).requires_grad_(True)
    samples = (logits.detach().float() + 0.5 * torch.randn(4, 2, 5, 6, 7, generator=g)).to(dtype)
    target = torch.randint(0, 5, (2, 6, 7), generator=g)
    target[0, 0] = 255
    return logits, samples, target


@pytest.mark.parametrize("backend", uce_fast.available_backends())
def test_parity_check_passes_for_every_backend(backend):
    logits, samples, target = _uce_case()
    loss = uce_fast.uce_loss(logits, target, samples, alpha=10.0, ignore_index=255,
                             backend=backend)
    loss.backward()
    result = parity_check(loss, logits, logits.grad, target, samples, alpha=10.0,
                          ignore_index=255)
    assert result.ok and result.loss_rel < 1e-5 and result.grad_rel < 1e-5
    assert result.tol == 1e-4


@pytest.mark.parametrize("backend", [b for b in uce_fast.available_backends() if b != "torch"])
def test_parity_check_accepts_float32_near_ties(backend):
    """Near-uniform logits and samples (0.01·randn, B=4, C=19, 256², β=10): float32 decides the
    argmax differently from float64 at a few pixels; the check passes and counts them."""
    g = torch.Generator().manual_seed(0)
    logits = (0.01 * torch.randn(4, 19, 256, 256, generator=g)).requires_grad_(True)
    samples = 0.01 * torch.randn(10, 4, 19, 256, 256, generator=g)
    target = torch.randint(0, 19, (4, 256, 256), generator=g)
    loss = uce_fast.uce_loss(logits, target, samples, alpha=10.0, ignore_index=255,
                             backend=backend)
    loss.backward()
    result = parity_check(loss, logits, logits.grad, target, samples, alpha=10.0,
                          ignore_index=255)
    assert result.ok and result.grad_rel < 1e-5, result.describe()
    assert result.ties >= result.flips > 0
    assert f"{result.flips} decided for another class" in result.describe()


def test_parity_check_with_grad_scale_and_low_precision():
    logits, samples, target = _uce_case(torch.bfloat16)
    loss = uce_fast.uce_loss(logits, target, samples, alpha=10.0, ignore_index=255)
    (loss * 1024.0).backward()
    result = parity_check(loss, logits, logits.grad, target, samples, alpha=10.0,
                          ignore_index=255, grad_scale=1024.0)
    assert result.ok and result.tol == 1e-2 and result.dtype == "bfloat16"


def test_parity_check_detects_differences():
    logits, samples, target = _uce_case()
    loss = uce_fast.uce_loss(logits, target, samples, alpha=10.0, ignore_index=255)
    loss.backward()
    grad = logits.grad.clone()
    grad.view(-1)[7] += 1e-3 * grad.abs().max()
    bad_grad = parity_check(loss, logits, grad, target, samples, alpha=10.0, ignore_index=255)
    assert not bad_grad.ok and bad_grad.grad_rel == pytest.approx(1e-3, rel=1e-2)
    bad_loss = parity_check(loss * (1 + 1e-3), logits, logits.grad, target, samples,
                            alpha=10.0, ignore_index=255)
    assert not bad_loss.ok and "tolerance 0.0001" in bad_loss.describe()
    assert parity_check(loss * (1 + 1e-3), logits, logits.grad, target, samples, alpha=10.0,
                        ignore_index=255, tol=1e-2).ok


def test_evaluate_is_reproducible_and_isolated_from_training_rng():
    model = _model()
    model.train()
    data = [(torch.randn(2, 3, 32, 32), torch.randint(0, 5, (2, 32, 32))) for _ in range(2)]
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = evaluate(model, data, 5, device=torch.device("cpu"), mc_samples=3, seed=7)
    assert torch.equal(torch.get_rng_state(), state)  # training RNG untouched
    b = evaluate(model, data, 5, device=torch.device("cpu"), mc_samples=3, seed=7)
    assert a == b and a["mUnc"] is not None and 0 <= a["mIoU"] <= 1
    assert model.training
    c = evaluate(model, data, 5, device=torch.device("cpu"), mc_samples=0)
    assert c["mUnc"] is None and model.training


@pytest.mark.parametrize("bn", ["running", "batch"])
@pytest.mark.parametrize("low_res", [False, True], ids=["full-res", "low-res"])
def test_shared_prefix_gives_the_same_samples(bn, low_res):
    """Same RNG, same samples: the prefix holds no dropout, so sharing it draws the same masks;
    in "batch" mode the training forward's prefix output is reused."""
    model = _model().train()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        parts = model(x, parts=True)
    size = (32, 32) if low_res else None
    stacks = []
    for levers in (SampleLevers(), SampleLevers(shared_prefix=True)):
        torch.manual_seed(7)
        _, stack = draw_mc_samples(model, x, 3, bn=bn, size=size, keep_stack=True,
                                   levers=levers, parts=parts)
        stacks.append(stack)
    torch.testing.assert_close(stacks[0], stacks[1], rtol=1e-5, atol=1e-6)
    assert stacks[0].shape == ((3, 2, 5, 8, 8) if low_res else (3, 2, 5, 32, 32))


@pytest.mark.parametrize(("bn", "per_forward"), [("batch", 1), ("batch", 2), ("update", 1)])
def test_training_pass_is_the_first_sample(bn, per_forward):
    model = _model().train()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        parts = model(x, parts=True)
    levers = SampleLevers(shared_prefix=bn == "batch", train_pass_sample=True,
                          per_forward=per_forward)
    acc, stack = draw_mc_samples(model, x, 5, bn=bn, keep_stack=True, levers=levers,
                                 parts=parts)
    assert acc.count == 5 and stack.shape == (5, 2, 5, 32, 32)
    assert torch.equal(stack[0], parts.logits)
    assert not torch.allclose(stack[1], stack[2])  # fresh dropout masks per pass
    torch.testing.assert_close(acc.sigma(), uce_fast.predictive_uncertainty(stack))


def test_levers_that_change_the_distribution_are_refused():
    model = _model().train()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        parts = model(x, parts=True)
    with pytest.raises(ValueError, match="the training pass is no MC sample"):
        draw_mc_samples(model, x, 3, bn="running", parts=parts,
                        levers=SampleLevers(train_pass_sample=True))
    with pytest.raises(ValueError, match="samples-per-forward > 1 with --sample-bn update"):
        draw_mc_samples(model, x, 3, bn="update", levers=SampleLevers(per_forward=2))


@pytest.mark.parametrize("backend", uce_fast.available_backends())
def test_parity_check_with_entropy_maximisation(backend):
    logits, samples, target = _uce_case()
    target = target.clone()
    target[:, ::3, ::2] = 254
    options = dict(alpha=10.0, ignore_index=255, ood_index=254, ood_weight=0.9)
    loss = uce_fast.uce_loss(logits, target, samples, backend=backend, **options)
    loss.backward()
    result = parity_check(loss, logits, logits.grad, target, samples, **options)
    assert result.ok and result.grad_rel < 1e-5, result.describe()
    # Without the term the same gradient is far off.
    without = parity_check(loss, logits, logits.grad, target, samples, alpha=10.0,
                           ignore_index=255)
    assert not without.ok


def test_compute_loss_with_and_without_entropy_maximisation():
    logits, samples, target = _uce_case()
    target = target.clone()
    target[:, ::4] = 254
    plain = target.masked_fill(target == 254, 255)
    ce = compute_loss("ce", None, logits, plain, None, 255)
    torch.testing.assert_close(ce, torch.nn.functional.cross_entropy(logits, plain,
                                                                     ignore_index=255))
    em = compute_loss("ce", None, logits, target, None, 255, ood_index=254, ood_weight=0.5)
    torch.testing.assert_close(em, uce_fast.uce_loss(logits, target, alpha=0.0, ignore_index=255,
                                                     ood_index=254, ood_weight=0.5))
    assert not torch.allclose(em, ce)
    criterion = uce_fast.UCELoss(alpha=10.0, ignore_index=255, ood_index=254, ood_weight=0.5)
    uce = compute_loss("uce", criterion, logits, target, samples, 255, alpha=4.0,
                       ood_index=254, ood_weight=0.5)
    torch.testing.assert_close(uce, uce_fast.uce_loss(logits, target, samples, alpha=4.0,
                                                      ignore_index=255, ood_index=254,
                                                      ood_weight=0.5))
    # The first step of an α warm-up (α = 0, no samples drawn): CE with the OoD term.
    first = compute_loss("uce", criterion, logits, target, None, 255, alpha=0.0, ood_index=254,
                         ood_weight=0.5)
    torch.testing.assert_close(first, em)
    with pytest.raises(ValueError, match="needs the MC samples"):
        compute_loss("uce", criterion, logits, target, None, 255, alpha=1.0, ood_index=254)


def test_anomaly_scores_are_the_definitions():
    model = _model()
    model.train()
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(3)
    scores = anomaly_scores(model, x, mc_samples=4)
    assert set(scores) == set(ANOMALY_SCORES) and model.training
    model.eval()
    with torch.no_grad():
        probs = torch.softmax(model(x), dim=1)
    model.train()
    torch.testing.assert_close(scores["msp"], 1 - probs.max(dim=1).values)
    torch.testing.assert_close(scores["entropy"], -(probs * probs.log()).sum(dim=1))
    torch.manual_seed(3)
    _, stack = draw_mc_samples(model, x, 4, keep_stack=True,
                               levers=SampleLevers(shared_prefix=True))
    mean = torch.softmax(stack, dim=2).mean(dim=0)
    torch.testing.assert_close(scores["mc_msp"], 1 - mean.max(dim=1).values)
    torch.testing.assert_close(scores["mc_entropy"], -(mean * mean.log()).sum(dim=1))
    torch.testing.assert_close(scores["mc_sigma"], uce_fast.predictive_uncertainty(stack))
    assert set(anomaly_scores(model, x)) == {"msp", "entropy"}
    ranges = anomaly_score_ranges(5, mc=True)
    for name, value in scores.items():
        lo, hi = ranges[name]
        assert lo <= float(value.min()) and float(value.max()) <= hi, name


def test_evaluate_anomalies_is_reproducible_and_keeps_panels():
    model = _model()
    model.train()
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(3):
        gt = torch.zeros(2, 32, 32, dtype=torch.long)
        gt[:, 8:16, 8:20] = 1
        gt[:, :2] = 255
        data.append((torch.randn(2, 3, 32, 32, generator=g), gt))
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a, panels = evaluate_anomalies(model, data, 5, device=torch.device("cpu"), mc_samples=3,
                                   seed=7, keep=3)
    assert torch.equal(torch.get_rng_state(), state)
    b, _ = evaluate_anomalies(model, data, 5, device=torch.device("cpu"), mc_samples=3, seed=7)
    assert a == b and set(a) == set(ANOMALY_SCORES)
    for metrics in a.values():
        assert 0 <= metrics["AP"] <= 1 and 0 <= metrics["AUROC"] <= 1
        assert metrics["pixels_anomaly"] == 6 * 8 * 12
        assert metrics["pixels_known"] == 6 * (30 * 32 - 8 * 12)
    assert len(panels) == 3 and set(panels[0][2]) == set(ANOMALY_SCORES)
    assert torch.equal(panels[2][1], data[1][1][0])
    one_pass, _ = evaluate_anomalies(model, data, 5, device=torch.device("cpu"))
    assert set(one_pass) == {"msp", "entropy"} and one_pass["msp"] == a["msp"]
