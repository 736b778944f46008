"""PNG panels like the paper's Figure 3: image | label | prediction | error | uncertainty; and
anomaly panels: image | anomaly label | anomaly mask | score, one row per score."""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import Tensor

from train.anomaly_metrics import ANOMALY, VOID
from train.data import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD

__all__ = ["CITYSCAPES_PALETTE", "SYNTHETIC_PALETTE", "colorize", "heatmap", "save_anomaly_panel",
           "save_panel"]

CITYSCAPES_PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32),
)
SYNTHETIC_PALETTE = (
    (70, 130, 180), (128, 64, 128), (220, 20, 60), (255, 120, 0), (107, 142, 35), (0, 0, 142),
    (250, 220, 30),
)
# "inferno"-like colour map anchors, dark (low) to bright (high).
_HEAT = np.array([
    (0, 0, 4), (40, 11, 84), (101, 21, 110), (159, 42, 99), (212, 72, 66), (245, 125, 21),
    (250, 193, 39), (252, 255, 164),
], dtype=np.float32)
#: Uncertainty mapped to the brightest colour (sigma rarely exceeds it; larger values clip).
SIGMA_VMAX = 0.3


def colorize(label: np.ndarray, palette: tuple[tuple[int, int, int], ...]) -> np.ndarray:
    """(H, W) class map -> (H, W, 3) uint8; ignored (255) and unknown ids are black."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[: len(palette)] = np.array(palette, dtype=np.uint8)
    return lut[np.clip(label, 0, 255).astype(np.uint8)]


def heatmap(values: np.ndarray, vmax: float) -> np.ndarray:
    """(H, W) values in [0, vmax] -> (H, W, 3) uint8 heat map (clipped)."""
    t = np.clip(values / max(vmax, 1e-12), 0.0, 1.0) * (len(_HEAT) - 1)
    lo = np.floor(t).astype(np.int64).clip(0, len(_HEAT) - 2)
    frac = (t - lo)[..., None]
    return (_HEAT[lo] * (1 - frac) + _HEAT[lo + 1] * frac + 0.5).astype(np.uint8)


def _image_to_uint8(image: Tensor, normalized: bool) -> np.ndarray:
    img = image.detach().float().cpu()
    if normalized:
        img = img * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(
            3, 1, 1)
    return (img.clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


def save_panel(path: str | os.PathLike[str], image: Tensor, label: Tensor, pred: Tensor,
               uncertainty: Tensor, palette: tuple[tuple[int, int, int], ...], *,
               normalized: bool = False, uncertainty_name: str = "sigma",
               vmax: float = SIGMA_VMAX, max_tile_width: int = 512) -> None:
    """Write image | label | prediction | error (white = wrong, grey = ignored) | uncertainty."""
    lab = label.detach().cpu().numpy()
    prd = pred.detach().cpu().numpy()
    error = np.where(prd != lab, 255, 0).astype(np.uint8)
    error[lab == IGNORE_INDEX] = 96
    row = [
        ("image", _image_to_uint8(image, normalized)),
        ("label", colorize(lab, palette)),
        ("prediction", colorize(prd, palette)),
        ("error", np.repeat(error[..., None], 3, axis=2)),
        (f"{uncertainty_name} (0..{vmax:g})",
         heatmap(uncertainty.detach().float().cpu().numpy(), vmax)),
    ]
    _write_grid(path, [row], max_tile_width)


def save_anomaly_panel(path: str | os.PathLike[str], image: Tensor, label: Tensor,
                       scores: dict[str, Tensor], thresholds: dict[str, float | None],
                       titles: dict[str, str] | None = None, *, normalized: bool = False,
                       max_tile_width: int = 512) -> None:
    """Write one row per anomaly score: image | anomaly label (white = anomaly, grey = void) |
    anomaly mask (the score at or above its threshold; void grey) | score (heat map from the
    image's smallest to its largest score). ``label`` (H, W): 1 anomaly, 0 known, 255 void;
    ``scores`` name -> (H, W); ``thresholds`` name -> the score's threshold (None: no mask)."""
    lab = label.detach().cpu().numpy()
    void = lab == VOID
    truth = np.where(lab == ANOMALY, 255, 0).astype(np.uint8)
    truth[void] = 96
    img = _image_to_uint8(image, normalized)
    rows = []
    for name, score in scores.items():
        values = score.detach().float().cpu().numpy()
        threshold = thresholds.get(name)
        mask = np.zeros_like(truth) if threshold is None else \
            np.where(values >= threshold, 255, 0).astype(np.uint8)
        mask[void] = 96
        lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
        title = (titles or {}).get(name, name)
        rows.append([
            (title, img),
            ("anomaly label", np.repeat(truth[..., None], 3, axis=2)),
            ("mask" if threshold is None else f"mask (>= {threshold:.3g})",
             np.repeat(mask[..., None], 3, axis=2)),
            (f"score ({lo:.3g}..{hi:.3g})", heatmap(values - lo, hi - lo)),
        ])
    _write_grid(path, rows, max_tile_width)


def _write_grid(path: str | os.PathLike[str], rows: list[list[tuple[str, np.ndarray]]],
                max_tile_width: int) -> None:
    """Rows of equally sized titled tiles as one PNG, written atomically."""
    from PIL import Image, ImageDraw

    h, w = rows[0][0][1].shape[:2]
    # large images shrink to max_tile_width; small ones grow (integer factor) to about 256 px
    scale = max_tile_width / w if w > max_tile_width else float(max(1, 256 // w))
    tw, th = max(1, round(w * scale)), max(1, round(h * scale))
    gap, title = 4, 14
    columns = max(len(row) for row in rows)
    canvas = Image.new("RGB", (columns * tw + (columns - 1) * gap,
                               len(rows) * (th + title + gap) - gap), "white")
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        y = r * (th + title + gap)
        for i, (name, arr) in enumerate(row):
            tile = Image.fromarray(arr)
            if scale != 1.0:
                resample = Image.BILINEAR if i == 0 else Image.NEAREST
                tile = tile.resize((tw, th), resample)
            x = i * (tw + gap)
            canvas.paste(tile, (x, y + title))
            draw.text((x + 2, y + 1), name, fill="black")
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    tmp = f"{os.fspath(path)}.tmp.png"
    canvas.save(tmp)
    os.replace(tmp, path)
