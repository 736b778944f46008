"""What every kernel backend's ops share: fake (meta) kernels and the autograd formula.

The compiled ops (``uce_fast.ops``) and the Triton ops (``uce_fast.triton.ops``) have the same
argument contract (see ``uce_fast.ops``), so their fake kernels and their autograd glue are the
same code; only the backward op differs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def bad_label_message(label: int, num_classes: int, ignore_index: int, ood_index: int) -> str:
    """The ValueError text for a bad label, worded as the compiled ops word it;
    ``ood_index == ignore_index`` when entropy maximisation is off."""
    if ood_index != ignore_index:
        return (f"target contains label {label}, outside [0, {num_classes}) and neither "
                f"ignore_index ({ignore_index}) nor ood_index ({ood_index})")
    return (f"target contains label {label}, outside [0, {num_classes}) and not ignore_index "
            f"({ignore_index})")


def uce_forward_fake(input, target, samples, sigma, weight, alpha, ignore_index,
                     label_smoothing, correction, check_labels, ood_index, ood_scale):
    """(loss (B, N), norm (2, B, N), pixel_weight (B, N)), float32, for input (B, C, N)."""
    batch, _, pixels = input.shape
    loss = input.new_empty((batch, pixels), dtype=torch.float32)
    return loss, input.new_empty((2, batch, pixels), dtype=torch.float32), torch.empty_like(loss)


def uce_backward_fake(grad_loss, input, target, norm, pixel_weight, weight, ignore_index,
                      label_smoothing, ood_index, ood_scale):
    """grad_input: contiguous, shape and dtype of input."""
    return torch.empty_like(input, memory_format=torch.contiguous_format)


def mc_accumulate_fake(mean, m2, entropy, samples, count, in_h, in_w, out_h, out_w,
                       align_corners):
    """In place on ``mean``, ``m2``, ``entropy``; returns nothing."""
    return None


def mc_reduce_fake(samples, mean, m2, entropy, count, in_h, in_w, out_h, out_w, align_corners,
                   correction, want_probs, want_entropy):
    """(sigma f32, pred int64, entropy f32, mutual_info f32) (B, N) each, mean_probs f32
    (B, C, N); the entropy pair and mean_probs are empty (0,) unless asked for."""
    ref = samples if samples is not None else mean
    batch, classes = ref.shape[-3], ref.shape[-2]
    pixels = out_h * out_w
    sigma = ref.new_empty((batch, pixels), dtype=torch.float32)
    pred = ref.new_empty((batch, pixels), dtype=torch.int64)
    maps = (batch, pixels) if want_entropy else (0,)
    probs = (batch, classes, pixels) if want_probs else (0,)
    return (sigma, pred, ref.new_empty(maps, dtype=torch.float32),
            ref.new_empty(maps, dtype=torch.float32), ref.new_empty(probs, dtype=torch.float32))


def setup_context(ctx, inputs, output):
    """Saves what the U-CE backward reads: input, target, norm, pixel weight, class weight."""
    (input, target, _samples, _sigma, weight, _alpha, ignore_index, label_smoothing, _correction,
     _check_labels, ood_index, ood_scale) = inputs
    _, norm, pixel_weight = output
    ctx.save_for_backward(input, target, norm, pixel_weight, weight)
    ctx.ignore_index = ignore_index
    ctx.label_smoothing = label_smoothing
    ctx.ood_index = ood_index
    ctx.ood_scale = ood_scale


def uce_backward_formula(backward_op: Callable) -> Callable:
    """The ``register_autograd`` backward (with :func:`setup_context`) of a U-CE forward op whose
    gradient w.r.t. ``input`` is ``backward_op`` (it reads the saved per-pixel softmax
    normaliser and weight, never the stack)."""

    def backward(ctx, grad_loss, _grad_norm, _grad_pixel_weight):
        input, target, norm, pixel_weight, weight = ctx.saved_tensors
        grad_input = None
        if ctx.needs_input_grad[0]:
            grad_input = backward_op(grad_loss.float(), input, target, norm, pixel_weight, weight,
                                     ctx.ignore_index, ctx.label_smoothing, ctx.ood_index,
                                     ctx.ood_scale)
        return (grad_input,) + (None,) * 11

    return backward
