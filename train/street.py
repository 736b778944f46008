"""Street-scene-like synthetic images: a long-tailed class profile modelled on Cityscapes.

``render_street_scene(rng, size)`` draws one (size × 2·size) image with the 19 Cityscapes
evaluation classes (train-id order) and 255 = ignore, from a pinhole camera above a street:

* **Layout.** A horizon and vanishing point, a road between sidewalks (sometimes grass verges),
  rows of building blocks with window grids on both sides (gaps for side streets, sometimes a park
  with trees instead, sometimes a building closing the street), sky above. Everything is placed
  in metres on the ground plane and projected, so sizes shrink with depth and objects occlude
  each other far-to-near (painter's algorithm).
* **Long tail.** Large, frequent stuff (road, building, vegetation, sidewalk, sky, car) and a long
  tail of small, thin or rare things: poles with street lights, traffic signs and traffic
  lights, fences, walls, terrain, persons, riders on bicycles and motorcycles, parked bicycles and
  motorcycles, and — in a few images each, but large when present — trucks, buses and trams
  (Cityscapes' "train"). The generator's frequencies were set so that the pixel shares over many
  scenes follow ``CITYSCAPES_PIXEL_SHARES`` (see ``tests/test_train_street.py`` for the check).
* **Decidable from appearance.** Every class has its own colour, texture, shape or context:
  asphalt with lane markings vs paved sidewalks vs smooth grass vs leafy vegetation; facades with
  windows vs plain concrete walls vs see-through fence mesh; black traffic-light boxes with one
  lit lamp; red/blue/yellow signs; riders wear helmets and sit on a bicycle or motorcycle, persons
  stand on the ground; buses, trucks and trams differ in size, colour and windows. Nothing is
  labelled at random: by default there is no label noise.
* **Boundaries by coverage.** Each shape is rendered with its exact (axis-aligned rectangles and
  bands) or first-order (polygons, discs) pixel coverage, the image is the coverage-weighted
  blend, and the label of a pixel is the class with the largest visible coverage (the majority of
  its area, as a polygon annotation rasterised at that resolution would give). See-through
  structures (fence mesh, spoked wheels) are labelled over their whole outline and drawn
  partially transparent, as annotators label them.
* **Ignore regions (255)**, as Cityscapes' void labels: the ego vehicle's bonnet at the bottom,
  occasional rectification borders, tram rails (Cityscapes' "rail track") and street furniture
  such as bins, boxes and advertising columns ("static").
* **Label noise** only on request: ``label_noise=p`` relabels each object (one instance, all its
  pixels) with probability p as a uniformly drawn other class, from a generator of its own, so
  the image is the same with or without noise.
* **Hooks** for objects outside the scene model (``objects``, ``overlay`` and ``extra_labels``
  of ``render_street_scene``; :mod:`train.anomalies` draws the anomaly track's unknown objects
  and the OoD proxies with them); without them the scenes are exactly as before.

Deterministic per generator state; at ``size=128`` (128 × 256) a scene takes ~29 ms on one core of
a 2-core AVX-512 Xeon.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "CITYSCAPES_PIXEL_SHARES",
    "CITYSCAPES_VOID_SHARE",
    "EXTRA_CHANNEL",
    "STREET_CLASSES",
    "render_street_scene",
    "target_class_shares",
]

IGNORE = 255

STREET_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)

#: Percent of all finely annotated Cityscapes pixels per evaluated class (train-id order), from
#: Cordts et al., "The Cityscapes Dataset for Semantic Urban Scene Understanding", CVPR 2016,
#: Fig. 1 (pixels per class of the fine annotations), as tabulated in
#: github.com/m-birke/automotive-segmentation-datasets (cityscapes.md, "pixel-wise occ [%]").
CITYSCAPES_PIXEL_SHARES = (
    32.7, 5.3, 20.1, 0.59, 0.77, 1.1243, 0.1823, 0.5015, 14.3, 0.98, 3.5, 1.1, 0.1295, 6.0,
    0.2406, 0.2271, 0.1907, 0.0848, 0.4030,
)
#: Percent of all pixels with a void / ignored label in the same table (ego vehicle 4.6,
#: rectification border 1.4, out of roi 1.5, static 1.36, ground 1.29, parking 0.6, ...).
CITYSCAPES_VOID_SHARE = 100.0 - sum(CITYSCAPES_PIXEL_SHARES)


def target_class_shares() -> np.ndarray:
    """Cityscapes' shares of the non-ignored pixels (sums to 1), train-id order."""
    shares = np.asarray(CITYSCAPES_PIXEL_SHARES, dtype=np.float64)
    return shares / shares.sum()


(ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN, VEGETATION, TERRAIN, SKY, PERSON,
 RIDER, CAR, TRUCK, BUS, TRAIN, MOTORCYCLE, BICYCLE) = range(19)
_NUM = len(STREET_CLASSES)
_VOID = _NUM  # coverage channel of the ignore label
#: The first coverage channel of the extra labels of ``render_street_scene``.
EXTRA_CHANNEL = _VOID + 1


def _rgb(*c: float) -> np.ndarray:
    return np.array(c, dtype=np.float32)


_FACADES = [_rgb(.72, .66, .55), _rgb(.56, .56, .56), _rgb(.80, .78, .72), _rgb(.60, .36, .28),
            _rgb(.68, .62, .46), _rgb(.50, .53, .60), _rgb(.74, .70, .64), _rgb(.45, .42, .40)]
_CARS = [_rgb(.08, .08, .09), _rgb(.85, .85, .86), _rgb(.62, .63, .66), _rgb(.38, .39, .41),
         _rgb(.10, .15, .35), _rgb(.60, .08, .08), _rgb(.20, .30, .22), _rgb(.55, .50, .40)]
_CLOTHES = [_rgb(.12, .12, .14), _rgb(.25, .25, .28), _rgb(.20, .25, .45), _rgb(.45, .10, .12),
            _rgb(.55, .50, .40), _rgb(.80, .80, .78), _rgb(.15, .35, .25), _rgb(.70, .45, .15)]
_SKIN = [_rgb(.92, .76, .62), _rgb(.80, .62, .48), _rgb(.60, .42, .30), _rgb(.42, .28, .20)]
_HELMETS = [_rgb(.95, .95, .95), _rgb(.05, .05, .05), _rgb(.90, .15, .10), _rgb(.95, .80, .10)]
_BUSES = [(_rgb(.95, .78, .10), _rgb(.20, .20, .20)), (_rgb(.80, .12, .12), _rgb(.95, .95, .90)),
          (_rgb(.92, .92, .86), _rgb(.10, .35, .70))]
_TRAMS = [(_rgb(.93, .93, .90), _rgb(.85, .10, .10)), (_rgb(.85, .20, .18), _rgb(.95, .93, .85)),
          (_rgb(.92, .88, .70), _rgb(.15, .45, .25))]
_GLASS = _rgb(.13, .15, .19)


def _overlap(lo: np.ndarray, hi: np.ndarray, a: float, b: float) -> np.ndarray:
    """Length of [lo, hi] ∩ [a, b] (pixel spans against an interval): exact 1-D coverage."""
    return np.maximum(np.minimum(hi, b) - np.maximum(lo, a), 0.0)


def _band(s: np.ndarray, width: float) -> np.ndarray:
    """Coverage of a band of ``width`` centred at signed distance 0, for pixels at distance s."""
    half = width / 2
    return (np.minimum(s + 0.5, half) - np.maximum(s - 0.5, -half)).clip(0.0, 1.0)


def _stripes(u: np.ndarray, du: np.ndarray | float, duty: float) -> np.ndarray:
    """Box-filtered coverage of a periodic stripe pattern (stripes on [k, k + duty) in u) over
    a pixel footprint of ``du`` periods centred at u."""
    du = np.maximum(du, 1e-6)

    def integral(t: np.ndarray) -> np.ndarray:
        f = np.floor(t)
        return f * duty + np.minimum(t - f, duty)

    return ((integral(u + du / 2) - integral(u - du / 2)) / du).clip(0.0, 1.0)


class _Canvas:
    """Image and per-label visible coverage; shapes are painted far to near."""

    def __init__(self, h: int, w: int, rng: np.random.Generator, label_noise: float,
                 noise_rng: np.random.Generator | None, extra_labels: tuple[int, ...] = ()
                 ) -> None:
        self.h, self.w = h, w
        self.rng = rng
        self.ys = np.arange(h, dtype=np.float32) + 0.5  # pixel centres
        self.xs = np.arange(w, dtype=np.float32) + 0.5
        # pixel edges (rect's exact coverage)
        self._left, self._right = (self.xs - 0.5)[None, :], (self.xs + 0.5)[None, :]
        self._top, self._bottom = (self.ys - 0.5)[:, None], (self.ys + 0.5)[:, None]
        # Channel-first storage, so that per-pixel blends run along image rows rather than over
        # 3 colour or ~20 coverage channels at a time; ``image`` (h, w, 3) and ``cover``
        # (h, w, channels) are views of it in the usual layout.
        self.planes = np.zeros((3, h, w), dtype=np.float32)
        self.image = self.planes.transpose(1, 2, 0)
        # coverage channels: the 19 classes, void (_VOID), then one per extra label (objects
        # drawn by render_street_scene's hooks), channel _VOID + 1 + k for extra_labels[k]
        self.extra_labels = tuple(extra_labels)
        self._layers = np.zeros((_NUM + 1 + len(self.extra_labels), h, w), dtype=np.float32)
        # per channel, rows and columns (r0, r1, c0, c1) outside which its coverage is 0, or
        # None while it is 0 everywhere
        self._extent: list[tuple[int, int, int, int] | None] = [None] * len(self._layers)
        self.fine = rng.standard_normal((h, w), dtype=np.float32)
        coarse = rng.standard_normal((h // 8 + 2, w // 8 + 2), dtype=np.float32)
        self.smooth = _upsample(coarse, h, w)
        self.label_noise = label_noise
        self.noise_rng = noise_rng
        self._group: tuple | None = None

    @property
    def cover(self) -> np.ndarray:
        """(h, w, channels) view of the visible coverage. Whoever takes it may write to any
        channel, so paints scale every channel everywhere from then on."""
        self._extent = [(0, self.h, 0, self.w)] * len(self._layers)
        return self._layers.transpose(1, 2, 0)

    def instance(self, label: int) -> int:
        """The label of one object: ``label``, or with probability ``label_noise`` another."""
        if self.label_noise > 0 and label != _VOID and self.noise_rng.random() < self.label_noise:
            other = int(self.noise_rng.integers(0, _NUM - 1))
            return other + (other >= label)
        return label

    def box(self, x0: float, x1: float, y0: float, y1: float
            ) -> tuple[slice, slice, np.ndarray, np.ndarray] | None:
        """Pixel slices and centre coordinates (column, row) of a box, clipped; None if empty."""
        c0, c1 = max(0, math.floor(x0)), min(self.w, math.ceil(x1))
        r0, r1 = max(0, math.floor(y0)), min(self.h, math.ceil(y1))
        if c1 <= c0 or r1 <= r0:
            return None
        return (slice(r0, r1), slice(c0, c1), self.xs[None, c0:c1], self.ys[r0:r1, None])

    def begin(self, label: int, x0: float, x1: float, y0: float, y1: float) -> bool:
        """Start one object of several parts inside the box: the parts' paints (all with
        ``label``) are composited into a local layer (over operator) that ``end`` paints once.
        Parts outside the box are clipped. Returns False (and groups nothing) if the box is
        off the canvas."""
        b = self.box(x0 - 1, x1 + 1, y0 - 1, y1 + 1)
        if b is None:
            self._group = None
            return False
        rows, cols = b[0], b[1]
        shape = (rows.stop - rows.start, cols.stop - cols.start)
        layer = np.zeros((5, *shape), np.float32)  # coverage, alpha, premultiplied colour
        self._group = (label, rows, cols, layer[0], layer[1], layer[2:])
        return True

    def end(self) -> None:
        """Paint the object started by ``begin``."""
        group, self._group = self._group, None
        if group is None:
            return
        label, rows, cols, cover, alpha, premultiplied = group
        colour = premultiplied / np.maximum(alpha, 1e-6)
        opacity = alpha / np.maximum(cover, 1e-6)
        self.paint(label, cover, rows, cols, colour.transpose(1, 2, 0), opacity)

    def paint(self, label: int, cover: np.ndarray, rows: slice, cols: slice,
              colour: np.ndarray, opacity: np.ndarray | float | None = None) -> None:
        """Blend ``colour`` with ``cover`` (times ``opacity`` for see-through structures) and
        add ``cover`` to ``label``'s visible coverage (others scaled by 1 - cover)."""
        if not cover.any():
            return
        alpha = cover if opacity is None else cover * opacity
        # colour as (3, rows, cols) planes: a view, the same values
        colour = np.asarray(colour)
        colour = colour[:, None, None] if colour.ndim == 1 else colour.transpose(2, 0, 1)
        if self._group is not None:
            self._composite(label, cover, alpha, rows, cols, colour)
            return
        region = self.planes[:, rows, cols]
        region += alpha * (colour - region)
        r0, r1, c0, c1 = rows.start, rows.stop, cols.start, cols.stop
        keep = 1.0 - cover
        if keep.shape != (r1 - r0, c1 - c0):
            keep = np.broadcast_to(keep, (r1 - r0, c1 - c0))
        layers, extent = self._layers, self._extent
        # A channel's coverage outside its extent is 0 and stays 0 (0 · keep = 0): in boxes
        # large enough for it to pay, only the part inside each extent is scaled.
        if (r1 - r0) * (c1 - c0) < 256:
            region = layers[:, rows, cols]
            region *= keep
        else:
            for k, e in enumerate(extent):
                if e is not None and e[0] < r1 and r0 < e[1] and e[2] < c1 and c0 < e[3]:
                    a0, a1 = (r0 if r0 > e[0] else e[0]), (r1 if r1 < e[1] else e[1])
                    b0, b1 = (c0 if c0 > e[2] else e[2]), (c1 if c1 < e[3] else e[3])
                    layer = layers[k, a0:a1, b0:b1]
                    layer *= keep[a0 - r0:a1 - r0, b0 - c0:b1 - c0]
        layers[label, rows, cols] += cover
        e = extent[label]
        extent[label] = (r0, r1, c0, c1) if e is None else (
            min(r0, e[0]), max(r1, e[1]), min(c0, e[2]), max(c1, e[3]))

    def _composite(self, label: int, cover: np.ndarray, alpha: np.ndarray, rows: slice,
                   cols: slice, colour: np.ndarray) -> None:
        """``paint`` inside ``begin`` / ``end``: over the group's layer, clipped to its box."""
        glabel, grows, gcols, gcover, galpha, gpre = self._group
        assert label == glabel, "one label per object"
        r0, r1 = max(rows.start, grows.start), min(rows.stop, grows.stop)
        c0, c1 = max(cols.start, gcols.start), min(cols.stop, gcols.stop)
        if r1 <= r0 or c1 <= c0:
            return
        shape = (rows.stop - rows.start, cols.stop - cols.start)
        sr, sc = slice(r0 - rows.start, r1 - rows.start), slice(c0 - cols.start, c1 - cols.start)
        dr, dc = slice(r0 - grows.start, r1 - grows.start), slice(c0 - gcols.start,
                                                                   c1 - gcols.start)
        # the part's arrays cut to the group's box; only those not of the part's shape are
        # broadcast first (a scalar opacity and a single colour need no cut at all)
        cov = (cover if cover.shape == shape else np.broadcast_to(cover, shape))[sr, sc]
        if alpha.ndim:
            alpha = (alpha if alpha.shape == shape else np.broadcast_to(alpha, shape))[sr, sc]
        if colour.shape[1:] != (1, 1):
            colour = (colour if colour.shape[1:] == shape else
                      np.broadcast_to(colour, (3, *shape)))[:, sr, sc]
        gc = gcover[dr, dc]
        gc += cov * (1.0 - gc)
        ga = galpha[dr, dc]
        ga += alpha * (1.0 - ga)
        pre = gpre[:, dr, dc]
        pre += alpha * (colour - pre)

    def rect(self, label: int, x0: float, x1: float, y0: float, y1: float, colour,
             opacity: float | None = None, shade=None) -> None:
        """Axis-aligned rectangle with exact coverage; ``shade(X, Y)`` multiplies the colour."""
        b = self.box(x0, x1, y0, y1)
        if b is None:
            return
        rows, cols, xc, yc = b
        cover = (_overlap(self._left[:, cols], self._right[:, cols], x0, x1)
                 * _overlap(self._top[rows], self._bottom[rows], y0, y1))
        self.paint(label, cover, rows, cols, _colour(colour, shade, xc, yc), opacity)

    def polygon(self, label: int, pts: list[tuple[float, float]], colour, shade=None,
                opacity=None) -> None:
        """Convex polygon; coverage clip(signed distance + 1/2) (exact along straight edges)."""
        xs_, ys_ = [p[0] for p in pts], [p[1] for p in pts]
        b = self.box(min(xs_), max(xs_), min(ys_), max(ys_))
        if b is None:
            return
        rows, cols, xc, yc = b
        area = sum(x0 * y1 - x1 * y0
                   for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1], strict=True))
        if abs(area) < 1e-9:
            return
        sign = 1.0 if area > 0 else -1.0
        edges = []  # (px, py, nx, ny): a point and the inward unit normal of each edge
        for (px, py), (qx, qy) in zip(pts, pts[1:] + pts[:1], strict=True):
            ex, ey = qx - px, qy - py
            norm = math.hypot(ex, ey)
            if norm >= 1e-9:
                edges.append((px, py, -ey * sign / norm, ex * sign / norm))
        px, py, nx, ny = np.array(edges, dtype=np.float32).T[..., None, None]
        # the signed distances to all edges, (edges, rows, cols), and their minimum in edge
        # order
        dist = ((xc - px) * nx + (yc - py) * ny).min(axis=0)
        cover = (dist + 0.5).clip(0.0, 1.0)
        op = opacity(xc, yc) if callable(opacity) else opacity
        self.paint(label, cover, rows, cols, _colour(colour, shade, xc, yc), op)

    def ellipse(self, label: int, cx: float, cy: float, rx: float, ry: float, colour,
                shade=None, wobble: tuple[float, float, float] | None = None,
                opacity=None) -> None:
        """Ellipse (optionally with a wavy outline: amplitude, frequency, phase)."""
        pad = 1.0 + (rx + ry) * (wobble[0] if wobble else 0.0)
        b = self.box(cx - rx - pad, cx + rx + pad, cy - ry - pad, cy + ry + pad)
        if b is None or rx <= 0 or ry <= 0:
            return
        rows, cols, xc, yc = b
        u, v = (xc - np.float32(cx)) / np.float32(rx), (yc - np.float32(cy)) / np.float32(ry)
        r = np.sqrt(u * u + v * v)
        edge = 1.0
        if wobble is not None:
            amp, freq, phase = wobble
            edge = 1.0 + amp * np.sin(freq * np.arctan2(v, u) + phase)
        cover = ((edge - r) * np.float32(min(rx, ry)) + 0.5).clip(0.0, 1.0)
        op = opacity(xc, yc) if callable(opacity) else opacity
        self.paint(label, cover, rows, cols, _colour(colour, shade, xc, yc), op)

    def segment(self, label: int, x0: float, y0: float, x1: float, y1: float, width: float,
                colour) -> None:
        """A straight line of ``width`` pixels (thin structures: frames, arms, pantographs)."""
        pad = width / 2 + 1
        b = self.box(min(x0, x1) - pad, max(x0, x1) + pad, min(y0, y1) - pad, max(y0, y1) + pad)
        if b is None:
            return
        rows, cols, xc, yc = b
        ex, ey = x1 - x0, y1 - y0
        length2 = ex * ex + ey * ey
        t = (((xc - x0) * ex + (yc - y0) * ey) / max(length2, 1e-9)).clip(0.0, 1.0)
        d = np.sqrt((xc - (x0 + t * ex)) ** 2 + (yc - (y0 + t * ey)) ** 2)
        self.paint(label, _band(d, max(width, 1e-3)), rows, cols, _colour(colour, None, xc, yc))

    def ring(self, label: int, cx: float, cy: float, radius: float, width: float,
             colour, hub_colour=None, inner_opacity: float = 0.15) -> None:
        """A spoked wheel: labelled over its whole disc, drawn as a tyre ring of ``width`` with
        a mostly see-through inside."""
        b = self.box(cx - radius - 1, cx + radius + 1, cy - radius - 1, cy + radius + 1)
        if b is None:
            return
        rows, cols, xc, yc = b
        r = np.sqrt((xc - np.float32(cx)) ** 2 + (yc - np.float32(cy)) ** 2)
        disc = (radius + 0.5 - r).clip(0.0, 1.0)
        tyre = _band(r - (radius - width / 2), max(width, 1e-3))
        opacity = np.maximum(tyre / np.maximum(disc, 1e-6), inner_opacity).clip(0, 1)
        colour = _colour(colour, None, xc, yc)
        self.paint(label, disc, rows, cols, colour, opacity)
        if hub_colour is not None:
            self.ellipse(label, cx, cy, max(radius * 0.18, 0.3), max(radius * 0.18, 0.3),
                         hub_colour)

    def labels(self) -> np.ndarray:
        """(h, w) uint8: the channel of largest visible coverage; void as ``IGNORE``, extra
        channel k as ``extra_labels[k]``."""
        label = _argmax(self._layers)
        if self.extra_labels:
            table = np.arange(256, dtype=np.uint8)
            table[_VOID] = IGNORE
            table[_VOID + 1:_VOID + 1 + len(self.extra_labels)] = self.extra_labels
            return table[label]
        label[label == _VOID] = IGNORE
        return label


def _colour(colour, shade, xc: np.ndarray, yc: np.ndarray) -> np.ndarray:
    """``colour`` (3,), times ``shade(xc, yc)`` if that is a (h, w) factor, or replaced by it
    if that is an (h, w, 3) image."""
    colour = np.asarray(colour, dtype=np.float32)
    if shade is None:
        return colour
    value = shade(xc, yc)
    if value.ndim == 3:
        return value
    # (3, h, w) planes, as paint blends them, seen as (h, w, 3)
    return (colour[:, None, None] * value).transpose(1, 2, 0)


def _argmax(layers: np.ndarray) -> np.ndarray:
    """``layers.argmax(axis=0)`` as uint8 (the first channel of largest value), computed plane by
    plane: the maximum, then the lowest channel that attains it."""
    top = layers.max(axis=0)
    if np.isnan(top).any():  # argmax takes the first NaN as the maximum
        return layers.argmax(axis=0).astype(np.uint8)
    label = np.full(top.shape, len(layers) - 1, dtype=np.uint8)
    hit = np.empty(top.shape, dtype=bool)
    step = np.empty(top.shape, dtype=np.uint8)
    for k in range(len(layers) - 2, -1, -1):  # label = k where layer k attains the maximum
        np.equal(layers[k], top, out=hit)
        np.subtract(label, k, out=step)
        step *= hit
        label -= step
    return label


def _upsample(a: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear upsampling of a coarse noise grid to (h, w)."""
    gy = np.linspace(0, a.shape[0] - 1.001, h, dtype=np.float32)
    gx = np.linspace(0, a.shape[1] - 1.001, w, dtype=np.float32)
    y0, x0 = gy.astype(np.int64), gx.astype(np.int64)
    fy, fx = (gy - y0)[:, None], gx - x0
    # along x on the coarse rows first, then pick the rows: the same terms per pixel
    across = a[:, x0] * (1 - fx) + a[:, x0 + 1] * fx
    out = across[y0] * (1 - fy)
    out += across[y0 + 1] * fy
    return out.astype(np.float32)


class _Camera:
    """Pinhole camera ``hc`` metres above flat ground: horizon row ``yh``, vanishing column
    ``xv``, focal length ``f`` pixels. World: X lateral (right +), Z depth, V height."""

    def __init__(self, yh: float, xv: float, f: float, hc: float) -> None:
        self.yh, self.xv, self.f, self.hc = yh, xv, f, hc

    def x(self, X: float, Z: float) -> float:
        return self.xv + self.f * X / Z

    def y(self, V: float, Z: float) -> float:
        return self.yh + self.f * (self.hc - V) / Z

    def ppm(self, Z: float) -> float:
        """Pixels per metre at depth Z."""
        return self.f / Z

    def quad_x(self, X: float, Z0: float, Z1: float, V0: float, V1: float
               ) -> list[tuple[float, float]]:
        """A vertical rectangle in the plane X = const from depth Z0 to Z1, heights V0..V1."""
        return [(self.x(X, Z0), self.y(V0, Z0)), (self.x(X, Z1), self.y(V0, Z1)),
                (self.x(X, Z1), self.y(V1, Z1)), (self.x(X, Z0), self.y(V1, Z0))]

    def ground(self, X0: float, X1: float, Z0: float, Z1: float) -> list[tuple[float, float]]:
        """A ground rectangle X0..X1 × Z0..Z1."""
        return [(self.x(X0, Z0), self.y(0, Z0)), (self.x(X1, Z0), self.y(0, Z0)),
                (self.x(X1, Z1), self.y(0, Z1)), (self.x(X0, Z1), self.y(0, Z1))]


_Z_NEAR = 0.6  # metres: everything nearer is clipped (below the image or beside it)
_Z_FAR = 2000.0


def render_street_scene(rng: np.random.Generator, size: int, label_noise: float = 0.0,
                        noise_rng: np.random.Generator | None = None, *,
                        objects=None, overlay=None, extra_labels: tuple[int, ...] = ()
                        ) -> tuple[np.ndarray, np.ndarray]:
    """One street scene: (size, 2·size, 3) uint8 image and (size, 2·size) uint8 label map.

    ``label_noise`` > 0 relabels whole objects at random (``noise_rng`` draws which; the image
    does not depend on it).

    Hooks for objects that are not part of the scene model (see :mod:`train.anomalies`), both
    called as ``hook(street, canvas)`` with the ``_Street`` (camera ``street.cam``, road edges
    ``street.road``, kerbs, facades, ``street.add``) and the ``_Canvas``; they must draw their
    random numbers from generators of their own, so that the scene itself does not change:

    * ``objects`` runs after the scene's things are placed and before they are painted: it
      registers ``street.add(depth, draw)`` items, painted far to near with the scene's own
      (so they occlude and are occluded by depth), before the ego vehicle and borders;
    * ``overlay`` paints on top of everything, ego vehicle and borders included, before the
      global brightness jitter and pixel noise.

    ``extra_labels``: label values of extra coverage channels ``EXTRA_CHANNEL + k`` (``k`` in
    ``range(len(extra_labels))``) that the hooks paint with; a pixel whose largest coverage is
    in channel ``EXTRA_CHANNEL + k`` is labelled ``extra_labels[k]``. Without hooks and extra
    labels the scene is exactly the one rendered without these arguments.
    """
    if label_noise > 0 and noise_rng is None:
        raise ValueError("label_noise needs noise_rng")
    h, w = size, 2 * size
    cv = _Canvas(h, w, rng, label_noise, noise_rng, extra_labels)
    cam = _Camera(yh=h * rng.uniform(0.33, 0.43), xv=w * rng.uniform(0.42, 0.58),
                  f=w * rng.uniform(1.0, 1.25), hc=rng.uniform(1.25, 1.6))
    scene = _Street(cv, cam, rng)
    scene.draw(objects, overlay)
    # brightness, colour balance, pixel noise and quantisation, on the colour planes
    planes = cv.planes * rng.uniform(0.8, 1.15)
    planes *= rng.uniform(0.94, 1.06, 3).astype(np.float32)[:, None, None]
    planes += 0.02 * rng.standard_normal((h, w, 3), dtype=np.float32).transpose(2, 0, 1)
    np.clip(planes, 0.0, 1.0, out=planes)
    planes *= 255.0
    planes += 0.5
    return planes.transpose(1, 2, 0).astype(np.uint8, order="C"), cv.labels()


class _Street:
    """The scene's layout in metres and the drawing of every element, far to near."""

    def __init__(self, cv: _Canvas, cam: _Camera, rng: np.random.Generator) -> None:
        self.cv, self.cam, self.rng = cv, cam, rng
        u = rng.uniform
        self.road = (-u(2.5, 9.0), u(2.0, 6.0))  # road edges (X), camera inside the road
        self.verge = [u(0.8, 2.0) if rng.random() < 0.15 else 0.0 for _ in range(2)]
        self.walk = [u(3.0, 5.5) for _ in range(2)]
        edge = [abs(self.road[0]), self.road[1]]
        self.kerb = [edge[s] + self.verge[s] for s in range(2)]  # sidewalk starts (|X|)
        self.facade = [self.kerb[s] + self.walk[s] for s in range(2)]  # facade plane (|X|)
        self.park = [rng.random() < 0.12 for _ in range(2)]
        self.z_end = u(70, 220)
        self.items: list[tuple[float, object]] = []  # (depth, draw callable), drawn far first

    # ----------------------------------------------------------------------------- helpers
    def side_x(self, side: int, dist: float) -> float:
        """X of a point ``dist`` metres from the street axis on ``side`` (0 left, 1 right)."""
        return -dist if side == 0 else dist

    def add(self, z: float, fn) -> None:
        self.items.append((z, fn))

    # ------------------------------------------------------------------------------ scene
    def draw(self, objects=None, overlay=None) -> None:
        """The whole scene; ``objects`` and ``overlay``: see ``render_street_scene``."""
        self.draw_sky()
        self.draw_ground()
        for side in range(2):
            self.draw_side(side)
        if self.rng.random() < 0.65:
            self.draw_end_building()
        self.place_things()
        if objects is not None:
            objects(self, self.cv)
        for _, fn in sorted(self.items, key=lambda item: -item[0]):
            fn()
        self.draw_ego_and_border()
        if overlay is not None:
            overlay(self, self.cv)

    def draw_sky(self) -> None:
        cv, rng = self.cv, self.rng
        clear, overcast = rng.random(), rng.uniform(0.0, 1.0)
        top = (1 - overcast) * _rgb(.35, .55, .88) + overcast * _rgb(.70, .73, .78)
        low = (1 - overcast) * _rgb(.75, .85, .96) + overcast * _rgb(.88, .90, .92)
        t = np.clip(cv.ys / max(self.cam.yh, 1.0), 0, 1)[:, None]
        sky = top[:, None, None] * (1 - t) + low[:, None, None] * t
        sky = sky * (1 + 0.04 * clear * cv.smooth)
        cv.paint(SKY, np.ones((cv.h, cv.w), np.float32), slice(0, cv.h), slice(0, cv.w),
                 sky.transpose(1, 2, 0))

    def ground_uv(self, xc: np.ndarray, yc: np.ndarray) -> tuple[np.ndarray, np.ndarray,
                                                                np.ndarray]:
        """Ground coordinates (X, Z) under pixels below the horizon and metres per pixel."""
        cam = self.cam
        dy = np.maximum(yc - cam.yh, 0.05)
        Z = cam.f * cam.hc / dy
        X = (xc - cam.xv) * Z / cam.f
        return X, Z, Z / cam.f

    def draw_ground(self) -> None:
        cv, cam, rng = self.cv, self.cam, self.rng
        far, near = _Z_FAR, _Z_NEAR
        paving = _rgb(.60, .57, .55) if rng.random() < 0.6 else _rgb(.62, .50, .47)
        paving = paving * rng.uniform(0.85, 1.1)
        tile = rng.uniform(0.3, 0.6)

        def walk_shade(xc, yc):
            X, Z, mpp = self.ground_uv(xc, yc)
            lines = np.maximum(_stripes(X / tile, mpp / tile, 0.08),
                               _stripes(Z / tile, mpp * Z / cam.hc / tile, 0.08))
            return (1 - 0.25 * lines) * (1 + 0.05 * self.noise(xc, yc))

        grass = _rgb(.50, .62, .30) * rng.uniform(0.85, 1.1)

        def grass_shade(xc, yc):
            return 1 + 0.05 * self.noise(xc, yc) + 0.10 * self.smooth(xc, yc)

        # everything below the horizon is paved first; then parks, grass verges, the road
        cv.rect(cv.instance(SIDEWALK), 0, cv.w, cam.yh, cv.h, paving, shade=walk_shade)
        for side in range(2):
            def sx(d: float, s: int = side) -> float:
                return self.side_x(s, d)
            if self.park[side]:
                x0, x1 = sorted((sx(self.facade[side]), sx(400.0)))
                cv.polygon(cv.instance(TERRAIN), cam.ground(x0, x1, near, far), grass,
                           grass_shade)
            if self.verge[side] > 0:
                x0, x1 = sorted((sx(self.kerb[side] - self.verge[side]), sx(self.kerb[side])))
                cv.polygon(cv.instance(TERRAIN), cam.ground(x0, x1, near, far), grass,
                           grass_shade)
        asphalt = _rgb(.33, .33, .35) * rng.uniform(0.75, 1.15)
        white = _rgb(.85, .85, .82)
        lane = rng.uniform(3.0, 3.6)
        first = -rng.uniform(1.3, 2.0)  # the lane line left of the camera
        lines = [first + k * lane for k in range(-4, 5)
                 if self.road[0] + 0.6 < first + k * lane < self.road[1] - 0.6]
        dash, period = rng.uniform(2, 4), rng.uniform(8, 12)
        offset = rng.uniform(0, period)
        edges = [self.road[0] + 0.3, self.road[1] - 0.3] if rng.random() < 0.7 else []
        zebra = rng.uniform(8, 30) if rng.random() < 0.2 else None

        def road_texture(xc, yc):
            # asphalt with dashed lane lines, solid edge lines and sometimes a zebra crossing,
            # box-filtered in ground coordinates (all labelled road, as in Cityscapes)
            X, Z, mpp = self.ground_uv(xc, yc)
            mpp_z = mpp * Z / cam.hc  # metres per pixel along the depth
            mark = np.zeros(np.broadcast_shapes(X.shape, Z.shape), dtype=np.float32)
            dashes = _stripes((Z - offset) / period, mpp_z / period, dash / period) * (Z < 70)
            for x_line in lines:
                mark = np.maximum(mark, _band((X - x_line) / mpp, 0.15 / mpp) * dashes)
            for x_line in edges:
                mark = np.maximum(mark, _band((X - x_line) / mpp, 0.14 / mpp) * (Z < 150))
            if zebra is not None:
                crossing = (zebra < Z) & (zebra + 3.5 > Z)
                mark = np.maximum(mark, _stripes(X, mpp, 0.5) * crossing)
            base = asphalt * (1 + 0.06 * self.noise(xc, yc) + 0.06 * self.smooth(xc, yc)
                              )[..., None]
            return base + mark[..., None] * (white - base)

        road = cv.instance(ROAD)
        cv.polygon(road, cam.ground(self.road[0], self.road[1], near, far), asphalt,
                   road_texture)
        self.road_label = road
        for side in range(2):  # parking bays along the kerb: ignored, as Cityscapes' "parking"
            if rng.random() < 0.3:
                z0 = rng.uniform(3, 30)
                edge = self.road[side]
                x0, x1 = sorted((edge, edge - 2.2 if side else edge + 2.2))
                cobble = _rgb(.45, .42, .40) * rng.uniform(0.85, 1.15)
                cv.polygon(_VOID, cam.ground(x0, x1, z0, z0 + rng.uniform(10, 40)), cobble,
                           lambda xc, yc: 1 + 0.12 * self.noise(xc, yc))
        if rng.random() < 0.07:  # tram rails: ignored, as Cityscapes' "rail track"
            xr = rng.uniform(self.road[0] + 1.5, self.road[1] - 1.5)
            for X in (xr - 0.72, xr + 0.72):
                cv.polygon(_VOID, cam.ground(X - 0.05, X + 0.05, 1.0, 400.0), _rgb(.5, .5, .52))
            self.rails = xr
        else:
            self.rails = None

    def noise(self, xc: np.ndarray, yc: np.ndarray) -> np.ndarray:
        """The canvas' per-pixel noise under pixel centres (xc, yc)."""
        r0, c0 = int(yc[0, 0]), int(xc[0, 0])
        return self.cv.fine[r0:r0 + yc.shape[0], c0:c0 + xc.shape[1]]

    def smooth(self, xc: np.ndarray, yc: np.ndarray) -> np.ndarray:
        r0, c0 = int(yc[0, 0]), int(xc[0, 0])
        return self.cv.smooth[r0:r0 + yc.shape[0], c0:c0 + xc.shape[1]]

    # -------------------------------------------------------------------- street sides
    def draw_side(self, side: int) -> None:
        rng = self.rng
        u = rng.uniform
        X = self.side_x(side, self.facade[side])
        if self.park[side]:
            z = u(3, 8)
            while z < self.z_end:
                self.tree(X + self.side_x(side, u(0.5, 6)), z, big=True)
                z += u(4, 10)
            return
        z = u(0.8, 6)
        nearer = 0.0
        while z < self.z_end:
            if rng.random() < 0.12 and z > 8:  # gap: a side street
                length = u(10, 18)
                self.side_street(side, z, z + length)
                z += length
                nearer = 0.0
                continue
            length = u(8, 35)
            height = u(7, 27)
            self.building(side, z, min(z + length, self.z_end), height, nearer=nearer)
            z += length
            nearer = height
        if rng.random() < 0.5:  # a low wall in front of the facades
            z0 = u(3, 40)
            self.wall(side, self.facade[side] - 0.3, z0, z0 + u(6, 30), u(0.8, 2.5))
        if rng.random() < 0.6:
            z0 = u(3, 40)
            self.fence(side, self.facade[side] - 0.3, z0, z0 + u(6, 40), u(1.2, 2.5))
        if rng.random() < 0.25:
            z0 = u(3, 40)
            self.hedge(side, self.facade[side] - 0.6, z0, z0 + u(5, 25), u(0.6, 1.5))

    def side_street(self, side: int, z0: float, z1: float) -> None:
        cv, cam = self.cv, self.cam
        x0, x1 = sorted((self.side_x(side, abs(self.road[side]) - 0.01),
                         self.side_x(side, 300.0)))
        cv.polygon(self.road_label, cam.ground(x0, x1, z0, z1),
                   _rgb(.33, .33, .35) * self.rng.uniform(0.8, 1.1))
        # the buildings of the next street, seen through the gap
        self.add(z1 + 40, lambda: self.building(side, z0 - 8, z1 + 8, self.rng.uniform(8, 25),
                                                offset=self.rng.uniform(15, 40), direct=True))
        if self.rng.random() < 0.9:  # a traffic light at the corner
            zl = z0 + self.rng.uniform(-2, 1)
            Xl = self.side_x(side, self.kerb[side] + 0.4)
            self.add(zl, lambda: self.traffic_light_pole(Xl, zl, side))

    def building(self, side: int, z0: float, z1: float, height: float, offset: float = 0.0,
                 direct: bool = False, nearer: float = 0.0) -> None:
        """A block's facade from depth z0 to z1 and, above the ``nearer`` block's height, its
        front face towards the camera."""
        if not direct:
            self.add(z1 + 0.5, lambda: self.building(side, z0, z1, height, offset, True,
                                                     nearer))
            return
        cv, cam, rng = self.cv, self.cam, self.rng
        Xf = self.side_x(side, self.facade[side] + offset)
        z0 = max(z0, _Z_NEAR)
        colour = _FACADES[int(rng.integers(len(_FACADES)))] * rng.uniform(0.85, 1.1)
        floor_h, bay = rng.uniform(2.8, 3.6), rng.uniform(2.5, 4.0)
        win_h, win_w = rng.uniform(0.45, 0.65), rng.uniform(0.35, 0.6)
        shop = rng.random() < 0.5
        label = cv.instance(BUILDING)

        def shade(xc, yc):
            dx = np.abs(xc - cam.xv) + 1e-3
            Z = np.clip(cam.f * abs(Xf) / dx, z0, z1 + 1)
            up = cam.hc - (yc - cam.yh) * Z / cam.f
            mpp_z = Z * Z / (cam.f * abs(Xf))
            mpp_v = Z / cam.f
            win = (_stripes(up / floor_h - 0.3, mpp_v / floor_h, win_h)
                   * _stripes((Z - z0) / bay - 0.2, mpp_z / bay, win_w))
            if shop:
                win = np.where(up < 3.0, _stripes((Z - z0) / bay, mpp_z / bay, 0.8)
                               * (up > 0.4), win)
            win *= (up < height - 0.6)
            return (1 - 0.75 * win) * (1 + 0.04 * self.noise(xc, yc))

        cv.polygon(label, cam.quad_x(Xf, z0, z1, 0.0, height), colour, shade)
        if height > nearer:  # the front face shows above a lower neighbour or at a gap
            x_in, x_out = cam.x(Xf, z0), cam.x(self.side_x(side, abs(Xf) + 12.0), z0)
            cv.rect(label, min(x_in, x_out), max(x_in, x_out), cam.y(height, z0),
                    cam.y(nearer, z0), colour * 0.85)

    def draw_end_building(self) -> None:
        z = self.z_end
        cam, cv, rng = self.cam, self.cv, self.rng
        height = rng.uniform(8, 25)
        colour = _FACADES[int(rng.integers(len(_FACADES)))] * rng.uniform(0.85, 1.1)
        label = cv.instance(BUILDING)
        Xl, Xr = -self.facade[0], self.facade[1]

        def draw() -> None:
            cv.rect(label, cam.x(Xl, z), cam.x(Xr, z), cam.y(height, z), cam.y(0, z), colour)
        self.add(z + 1, draw)

    def wall(self, side: int, dist: float, z0: float, z1: float, height: float) -> None:
        cv, cam, rng = self.cv, self.cam, self.rng
        colour = _rgb(.62, .62, .64) if rng.random() < 0.5 else _rgb(.52, .49, .53)
        colour = colour * rng.uniform(0.85, 1.1)
        X = self.side_x(side, dist)
        seam = rng.uniform(0.4, 0.8)

        def shade(xc, yc):
            Z = cam.f * abs(X) / (np.abs(xc - cam.xv) + 1e-3)
            up = cam.hc - (yc - cam.yh) * Z / cam.f
            lines = _stripes(up / seam, Z / cam.f / seam, 0.08)
            return (1 - 0.2 * lines) * (1 + 0.03 * self.noise(xc, yc)
                                        + 0.08 * self.smooth(xc, yc))

        label = cv.instance(WALL)
        self.add(z1, lambda: cv.polygon(label, cam.quad_x(X, z0, z1, 0, height), colour, shade))

    def fence(self, side: int, dist: float, z0: float, z1: float, height: float) -> None:
        cv, cam, rng = self.cv, self.cam, self.rng
        colour = [_rgb(.35, .38, .35), _rgb(.45, .32, .22), _rgb(.55, .56, .58)][
            int(rng.integers(3))]
        X = self.side_x(side, dist)
        mesh = rng.uniform(0.08, 0.2)
        label = cv.instance(FENCE)

        def opacity(xc, yc):
            Z = cam.f * abs(X) / (np.abs(xc - cam.xv) + 1e-3)
            up = cam.hc - (yc - cam.yh) * Z / cam.f
            mpp_z = Z * Z / (cam.f * abs(X))
            grid = np.maximum(_stripes(up / mesh, Z / cam.f / mesh, 0.25),
                              _stripes(Z / mesh, mpp_z / mesh, 0.25))
            posts = _stripes((Z - z0) / 2.5 + 0.02, mpp_z / 2.5, 0.04)
            return np.maximum(np.maximum(grid, posts), 0.35)

        self.add(z1, lambda: cv.polygon(label, cam.quad_x(X, z0, z1, 0, height), colour,
                                        opacity=opacity))

    def hedge(self, side: int, dist: float, z0: float, z1: float, height: float) -> None:
        cv, cam = self.cv, self.cam
        X = self.side_x(side, dist)
        colour = _rgb(.20, .36, .12) * self.rng.uniform(0.8, 1.15)
        label = cv.instance(VEGETATION)
        self.add(z1, lambda: cv.polygon(label, cam.quad_x(X, z0, z1, 0, height), colour,
                                        self.leaves))

    def leaves(self, xc: np.ndarray, yc: np.ndarray) -> np.ndarray:
        return np.clip(1 + 0.35 * self.noise(xc, yc) + 0.25 * self.smooth(xc, yc), 0.3, 2.0)

    # ------------------------------------------------------------------------------ things
    def place_things(self) -> None:
        rng = self.rng
        u = rng.uniform
        for side in range(2):
            kerb = self.kerb[side]
            # street trees near the kerb
            if rng.random() < 0.75:
                z = u(2, 12)
                spacing = u(7, 16)
                dist = kerb + u(0.6, 1.4)
                while z < min(self.z_end, 120):
                    if rng.random() < 0.85:
                        self.tree(self.side_x(side, dist), z)
                    z += spacing * u(0.8, 1.2)
            # street lights
            z = u(3, 20)
            spacing = u(26, 45)
            while z < min(self.z_end, 150):
                self.street_light(side, z)
                z += spacing
            for _ in range(int(rng.poisson(1.7))):  # sign poles
                self.sign_pole(side, u(3, 60))
            for _ in range(int(rng.poisson(4.0))):  # pedestrians
                dist = u(kerb + 0.3, self.facade[side] - 0.3)
                self.person(self.side_x(side, dist), u(4, 60))
            for _ in range(int(rng.poisson(1.5))):  # street furniture: ignored
                dist = u(kerb + 0.3, self.facade[side] - 0.3)
                self.furniture(self.side_x(side, dist), u(4, 50))
            if rng.random() < 0.22:  # parked bicycles
                z = u(4, 30)
                for _ in range(int(rng.integers(1, 5))):
                    self.bicycle(self.side_x(side, kerb + u(0.4, 1.2)), z, rider=False)
                    z += u(0.6, 1.0)
            if rng.random() < 0.04:  # parked motorcycle
                self.motorcycle(self.side_x(side, kerb + u(0.4, 1.0)), u(4, 30), rider=False)
            # parked cars along the kerb
            if rng.random() < 0.4:
                z = u(5, 15)
                while z < 70:
                    length = u(3.8, 4.8)
                    if rng.random() < 0.8:
                        X = self.side_x(side, abs(self.road[side]) - u(1.0, 1.2))
                        self.vehicle("car", X, z, length)
                    z += length + u(0.5, 4.0)
        lo, hi = self.road
        for _ in range(int(rng.poisson(0.9))):  # cars in the lanes
            self.vehicle("car", u(lo + 1.2, hi - 1.2), u(9, 60), u(3.8, 4.8))
        for _ in range(int(rng.poisson(0.8))):  # pedestrians crossing
            self.person(u(lo, hi), u(6, 40))
        if rng.random() < 0.28:
            self.bicycle(u(lo + 0.6, hi - 0.6), u(6, 35), rider=True)
        if rng.random() < 0.06:
            self.motorcycle(u(lo + 0.8, hi - 0.8), u(6, 40), rider=True)
        if rng.random() < 0.04:
            self.vehicle("truck", u(lo + 1.5, hi - 1.5), u(8, 40), u(7, 11))
        if rng.random() < 0.035:
            self.vehicle("bus", u(lo + 1.5, hi - 1.5), u(8, 40), u(11, 13))
        if self.rails is not None and rng.random() < 0.45:  # a tram on its rails
            self.vehicle("train", self.rails, u(8, 40), u(25, 32))
        if rng.random() < 0.5:  # traffic lights on an arm over the road
            self.overhead_light(u(12, 45))
        for side in range(2):  # traffic lights at the kerb
            for _ in range(int(rng.poisson(0.6))):
                zl = u(6, 40)
                Xl = self.side_x(side, self.kerb[side] + u(0.3, 0.6))
                self.add(zl, lambda Xl=Xl, zl=zl, side=side: self.traffic_light_pole(Xl, zl,
                                                                                     side))

    def tree(self, X: float, z: float, big: bool = False) -> None:
        cv, cam, rng = self.cv, self.cam, self.rng
        u = rng.uniform
        trunk_h = u(1.8, 3.0)
        crown_w = u(3.0, 5.5) * (1.8 if big else 1.0)
        crown_h = u(3.0, 5.5) * (1.8 if big else 1.0)
        colour = _rgb(.20, .38, .13) * u(0.75, 1.2)
        bark = _rgb(.30, .24, .18) * u(0.8, 1.2)
        wobble = (u(0.05, 0.15), float(rng.integers(5, 11)), u(0, 2 * np.pi))
        label = cv.instance(VEGETATION)

        def draw() -> None:
            p = cam.ppm(z)
            x = cam.x(X, z)
            reach = 0.5 * (1 + wobble[0]) * p
            if not cv.begin(label, x - crown_w * reach, x + crown_w * reach,
                            cam.y(trunk_h + crown_h * (1 + wobble[0]), z), cam.y(0, z)):
                return
            cv.rect(label, x - 0.16 * p, x + 0.16 * p, cam.y(trunk_h + 0.5, z), cam.y(0, z),
                    bark)
            cy = cam.y(trunk_h + crown_h / 2, z)
            cv.ellipse(label, x, cy, crown_w / 2 * p, crown_h / 2 * p, colour, self.leaves,
                       wobble)
            cv.end()
        self.add(z, draw)

    def pole(self, label: int, X: float, z: float, height: float, width: float,
             colour) -> None:
        cam, cv = self.cam, self.cv
        p = cam.ppm(z)
        x = cam.x(X, z)
        cv.rect(label, x - width / 2 * p, x + width / 2 * p, cam.y(height, z), cam.y(0, z),
                colour)

    def street_light(self, side: int, z: float) -> None:
        cv, cam, rng = self.cv, self.cam, self.rng
        X = self.side_x(side, self.kerb[side] + rng.uniform(0.3, 0.7))
        height = rng.uniform(5.5, 9)
        colour = _rgb(.5, .52, .55) * rng.uniform(0.6, 1.2)
        arm = rng.uniform(0.8, 2.0)
        label = cv.instance(POLE)

        def draw() -> None:
            self.pole(label, X, z, height, rng.uniform(0.12, 0.18), colour)
            x1 = cam.x(X + (arm if side == 0 else -arm), z)
            cv.segment(label, cam.x(X, z), cam.y(height, z), x1, cam.y(height + 0.2, z),
                       0.08 * cam.ppm(z), colour)
            cv.rect(label, x1 - 0.3 * cam.ppm(z), x1 + 0.3 * cam.ppm(z),
                    cam.y(height + 0.25, z), cam.y(height + 0.05, z), colour * 0.8)
        self.add(z, draw)

    def sign_pole(self, side: int, z: float) -> None:
        cv, cam, rng = self.cv, self.cam, self.rng
        X = self.side_x(side, self.kerb[side] + rng.uniform(0.2, 0.6))
        height = rng.uniform(2.4, 3.4)
        pole = cv.instance(POLE)
        signs = [(cv.instance(SIGN), int(rng.integers(6)), rng.uniform(0.55, 0.8))
                 for _ in range(int(rng.integers(1, 3)))]

        def draw() -> None:
            self.pole(pole, X, z, height, 0.08, _rgb(.55, .56, .58))
            top = height
            for label, kind, s in signs:
                self.sign(label, kind, cam.x(X, z), cam.y(top - s / 2, z), s * cam.ppm(z))
                top -= s + 0.1
        self.add(z, draw)

    def sign(self, label: int, kind: int, x: float, y: float, s: float) -> None:
        cv = self.cv
        red, white, blue = _rgb(.80, .10, .10), _rgb(.92, .92, .92), _rgb(.10, .30, .75)
        yellow = _rgb(.95, .80, .10)
        r = s / 2
        if not cv.begin(label, x - r, x + r, y - r, y + r):
            return
        if kind == 0:  # prohibition: red ring, white inside
            cv.ellipse(label, x, y, r, r, red)
            cv.ellipse(label, x, y, 0.72 * r, 0.72 * r, white)
        elif kind == 1:  # mandatory: blue disc
            cv.ellipse(label, x, y, r, r, blue)
            cv.rect(label, x - 0.12 * r, x + 0.12 * r, y - 0.5 * r, y + 0.5 * r, white)
        elif kind == 2:  # warning: red triangle
            cv.polygon(label, [(x, y - r), (x + r, y + 0.75 * r), (x - r, y + 0.75 * r)], red)
            cv.polygon(label, [(x, y - 0.45 * r), (x + 0.55 * r, y + 0.5 * r),
                               (x - 0.55 * r, y + 0.5 * r)], white)
        elif kind == 3:  # information: blue square
            cv.rect(label, x - r, x + r, y - r, y + r, blue)
            cv.rect(label, x - 0.5 * r, x + 0.5 * r, y - 0.2 * r, y + 0.6 * r, white)
        elif kind == 4:  # priority road: yellow diamond
            cv.polygon(label, [(x, y - r), (x + r, y), (x, y + r), (x - r, y)], white)
            cv.polygon(label, [(x, y - 0.65 * r), (x + 0.65 * r, y), (x, y + 0.65 * r),
                               (x - 0.65 * r, y)], yellow)
        else:  # stop: red octagon
            k = 0.41 * r
            cv.polygon(label, [(x - k, y - r), (x + k, y - r), (x + r, y - k), (x + r, y + k),
                               (x + k, y + r), (x - k, y + r), (x - r, y + k), (x - r, y - k)],
                       red)
        cv.end()

    def traffic_light(self, label: int, x: float, y_top: float, p: float) -> None:
        """A 3-lamp light of 0.35 × 0.95 m (pixels per metre ``p``), one lamp lit."""
        cv, rng = self.cv, self.rng
        w, h = 0.35 * p, 0.95 * p
        lit = int(rng.integers(3))
        if not cv.begin(label, x - w / 2, x + w / 2, y_top, y_top + h):
            return
        cv.rect(label, x - w / 2, x + w / 2, y_top, y_top + h, _rgb(.08, .08, .09))
        colours = (_rgb(1.0, .15, .1), _rgb(1.0, .7, .0), _rgb(.2, 1.0, .45))
        for k in range(3):
            c = colours[k] if k == lit else colours[k] * 0.25
            cv.ellipse(label, x, y_top + (0.18 + 0.3 * k) * p, 0.1 * p, 0.1 * p, c)
        cv.end()

    def traffic_light_pole(self, X: float, z: float, side: int) -> None:
        cam, cv = self.cam, self.cv
        height = self.rng.uniform(2.8, 3.6)
        pole, light = cv.instance(POLE), cv.instance(LIGHT)
        self.pole(pole, X, z, height, 0.12, _rgb(.45, .46, .48))
        self.traffic_light(light, cam.x(X, z), cam.y(height + 0.95, z), cam.ppm(z))

    def overhead_light(self, z: float) -> None:
        cv, cam, rng = self.cv, self.cam, self.rng
        side = int(rng.integers(2))
        X = self.side_x(side, self.kerb[side] + 0.4)
        height = rng.uniform(5.5, 6.5)
        X1 = rng.uniform(self.road[0] + 1, self.road[1] - 1)
        pole, light = cv.instance(POLE), cv.instance(LIGHT)
        colour = _rgb(.45, .46, .48)

        def draw() -> None:
            self.pole(pole, X, z, height, 0.2, colour)
            cv.segment(pole, cam.x(X, z), cam.y(height - 0.1, z), cam.x(X1, z),
                       cam.y(height - 0.1, z), 0.12 * cam.ppm(z), colour)
            self.traffic_light(light, cam.x(X1, z), cam.y(height - 0.15, z), cam.ppm(z))
        self.add(z, draw)

    def furniture(self, X: float, z: float) -> None:
        cv, cam, rng = self.cv, self.cam, self.rng
        kind = int(rng.integers(3))
        w, hgt = [(0.6, 1.0), (0.8, 1.4), (1.2, 2.8)][kind]
        colour = [_rgb(.25, .35, .25), _rgb(.50, .50, .45), _rgb(.75, .65, .40)][kind]
        colour = colour * rng.uniform(0.7, 1.2)

        def draw() -> None:
            p, x = cam.ppm(z), cam.x(X, z)
            cv.rect(_VOID, x - w / 2 * p, x + w / 2 * p, cam.y(hgt, z), cam.y(0, z), colour,
                    shade=lambda xc, yc: 1 + 0.1 * self.smooth(xc, yc))
        self.add(z, draw)

    def body(self, label: int, X: float, z: float, height: float, colour, *, seated: bool,
             facing: int = 1) -> None:
        """A person of ``height`` metres standing at (X, z), or seated (legs bent forward,
        towards ``facing``) with a helmet when ``seated`` (a rider; ``height`` is then the
        seat's height and the caller places the vehicle)."""
        cv, cam, rng = self.cv, self.cam, self.rng
        p, x = cam.ppm(z), cam.x(X, z)

        def y(v):
            return cam.y(v, z)

        skin = _SKIN[int(rng.integers(len(_SKIN)))]
        legs = _CLOTHES[int(rng.integers(3))] * rng.uniform(0.8, 1.2)
        if seated:  # hips at the seat (V = base), thighs forward, shins down
            base = height
            f = facing * p
            if not cv.begin(label, x - 0.6 * p, x + 0.6 * p, y(base + 0.95), y(base - 0.6)):
                return
            cv.segment(label, x, y(base), x + 0.35 * f, y(base - 0.05), 0.14 * p, legs)
            cv.segment(label, x + 0.35 * f, y(base - 0.05), x + 0.3 * f, y(base - 0.5),
                       0.12 * p, legs)
            cv.segment(label, x, y(base), x + 0.12 * f, y(base + 0.55), 0.36 * p, colour)
            cv.segment(label, x + 0.12 * f, y(base + 0.5), x + 0.45 * f, y(base + 0.3),
                       0.09 * p, colour)
            cv.ellipse(label, x + 0.16 * f, y(base + 0.75), 0.12 * p, 0.12 * p, skin)
            cv.ellipse(label, x + 0.16 * f, y(base + 0.81), 0.15 * p, 0.1 * p,
                       _HELMETS[int(rng.integers(len(_HELMETS)))])
            cv.end()
            return
        if not cv.begin(label, x - 0.3 * p, x + 0.3 * p, y(height), y(0)):
            return
        gap = 0.03 * p
        leg_top = y(0.47 * height)
        cv.rect(label, x - 0.17 * p, x - gap, leg_top, y(0), legs)
        cv.rect(label, x + gap, x + 0.17 * p, leg_top, y(0), legs)
        cv.rect(label, x - 0.22 * p, x + 0.22 * p, y(0.82 * height), y(0.45 * height), colour)
        cv.rect(label, x - 0.29 * p, x - 0.21 * p, y(0.8 * height), y(0.5 * height),
                colour * 0.85)
        cv.rect(label, x + 0.21 * p, x + 0.29 * p, y(0.8 * height), y(0.5 * height),
                colour * 0.85)
        cv.ellipse(label, x, y(0.9 * height), 0.1 * p, 0.12 * p, skin)
        cv.end()

    def person(self, X: float, z: float) -> None:
        label = self.cv.instance(PERSON)
        height = self.rng.uniform(1.55, 1.95)
        colour = _CLOTHES[int(self.rng.integers(len(_CLOTHES)))] * self.rng.uniform(0.8, 1.2)
        self.add(z, lambda: self.body(label, X, z, height, colour, seated=False))

    def bicycle(self, X: float, z: float, rider: bool) -> None:
        cv, cam, rng = self.cv, self.cam, self.rng
        label = cv.instance(BICYCLE)
        frame = _CLOTHES[int(rng.integers(len(_CLOTHES)))] * 1.2
        facing = 1 if rng.random() < 0.5 else -1
        rider_label = cv.instance(RIDER) if rider else None
        clothes = _CLOTHES[int(rng.integers(len(_CLOTHES)))]

        def draw() -> None:
            p, x0 = cam.ppm(z), cam.x(X, z)

            def pt(a, v):
                return x0 + facing * a * p, cam.y(v, z)

            tyre = _rgb(.06, .06, .06)
            if cv.begin(label, x0 - 0.9 * p, x0 + 0.9 * p, cam.y(1.1, z), cam.y(0, z)):
                self.bicycle_parts(label, pt, p, tyre, frame)
                cv.end()
            if rider_label is not None:
                self.body(rider_label, X - facing * 0.12, z, 0.9, clothes, seated=True,
                          facing=facing)
        self.add(z, draw)

    def bicycle_parts(self, label: int, pt, p: float, tyre, frame) -> None:
        """Spoked wheels, a thin frame, handlebar (``pt(a, v)``: pixel position of a point a
        metres along the bicycle and v metres up)."""
        cv = self.cv
        for a in (-0.53, 0.53):
            cv.ring(label, *pt(a, 0.34), 0.34 * p, 0.06 * p, tyre)
        t = 0.04 * p
        rear, crank, seat, head, front = (pt(-0.53, .34), pt(0, .3), pt(-.12, .85),
                                          pt(.42, .85), pt(.53, .34))
        for a, b in ((rear, crank), (crank, seat), (rear, seat), (seat, head),
                     (crank, head), (head, front)):
            cv.segment(label, *a, *b, t, frame)
        cv.segment(label, *head, *pt(.38, 1.02), t, frame)
        cv.segment(label, *pt(.3, 1.02), *pt(.48, 1.02), t, tyre)

    def motorcycle(self, X: float, z: float, rider: bool) -> None:
        cv, cam, rng = self.cv, self.cam, self.rng
        label = cv.instance(MOTORCYCLE)
        paint = [_rgb(.75, .1, .1), _rgb(.1, .1, .1), _rgb(.1, .25, .6), _rgb(.9, .55, .05)][
            int(rng.integers(4))]
        facing = 1 if rng.random() < 0.5 else -1
        rider_label = cv.instance(RIDER) if rider else None
        clothes = _CLOTHES[int(rng.integers(3))]

        def draw() -> None:
            p, x0 = cam.ppm(z), cam.x(X, z)

            def pt(a, v):
                return x0 + facing * a * p, cam.y(v, z)

            if not cv.begin(label, x0 - 1.05 * p, x0 + 1.05 * p, cam.y(1.2, z), cam.y(0, z)):
                return
            for a in (-0.7, 0.7):
                cv.ellipse(label, *pt(a, 0.32), 0.32 * p, 0.32 * p, _rgb(.05, .05, .05))
                cv.ellipse(label, *pt(a, 0.32), 0.14 * p, 0.14 * p, _rgb(.6, .6, .62))
            cv.polygon(label, [pt(-0.6, 0.45), pt(0.5, 0.45), pt(0.6, 0.85), pt(0.1, 1.0),
                               pt(-0.65, 0.85)], paint)
            cv.segment(label, *pt(0.55, 0.8), *pt(0.7, 0.32), 0.06 * p, _rgb(.6, .6, .62))
            cv.segment(label, *pt(0.45, 1.15), *pt(0.6, 0.8), 0.05 * p, _rgb(.2, .2, .2))
            cv.end()
            if rider_label is not None:
                self.body(rider_label, X - facing * 0.1, z, 0.95, clothes, seated=True,
                          facing=facing)
        self.add(z, draw)

    def vehicle(self, kind: str, X: float, z0: float, length: float) -> None:
        """A car, truck, bus or tram: a box seen from behind or from the front (its end face,
        with windows, lamps and the dark underbody), and the side towards the camera."""
        cv, cam, rng = self.cv, self.cam, self.rng
        label = cv.instance({"car": CAR, "truck": TRUCK, "bus": BUS, "train": TRAIN}[kind])
        front = rng.random() < 0.35
        if kind == "car":
            width, body_h = rng.uniform(1.7, 1.95), rng.uniform(0.85, 1.0)
            top = rng.uniform(1.4, 1.6)
            colour = _CARS[int(rng.integers(len(_CARS)))] * rng.uniform(0.85, 1.1)
            trim = colour * 0.9
        elif kind == "truck":
            width, body_h, top = 2.5, rng.uniform(3.2, 3.8), 0.0
            colour = [_rgb(.90, .90, .90), _rgb(.70, .72, .75), _rgb(.25, .35, .55)][
                int(rng.integers(3))]
            trim = _CARS[int(rng.integers(len(_CARS)))]
        elif kind == "bus":
            width, body_h, top = 2.55, rng.uniform(3.0, 3.2), 0.0
            colour, trim = _BUSES[int(rng.integers(len(_BUSES)))]
        else:
            width, body_h, top = 2.4, rng.uniform(3.3, 3.5), 0.0
            colour, trim = _TRAMS[int(rng.integers(len(_TRAMS)))]
        z1 = z0 + length
        half = width / 2
        Xs = X - half if X - half > 0 else (X + half if X + half < 0 else None)
        clear = 0.3 if kind == "car" else 0.45
        dark = _rgb(.05, .05, .05)
        lamp = _rgb(.95, .95, .85) if front else _rgb(.85, .05, .05)

        def side_shade(xc, yc):  # window band along the side of buses and trams
            if kind not in ("bus", "train"):
                return 1 + 0.05 * self.smooth(xc, yc)
            Z = cam.f * abs(Xs) / (np.abs(xc - cam.xv) + 1e-3)
            up = cam.hc - (yc - cam.yh) * Z / cam.f
            win = ((up > 1.2) & (up < 2.6)) * _stripes(Z / 1.6, Z * Z / (cam.f * abs(Xs)) / 1.6,
                                                     0.85)
            stripe = (up > 0.8) & (up < 1.05)
            return np.where(win > 0, 1 - 0.8 * win, np.where(stripe, 0.6, 1.0))

        def end_texture(x0: float, x1: float):
            def texture(xc, yc):
                t = (xc - x0) / max(x1 - x0, 1e-3)  # across the width, 0..1
                up = cam.hc - (yc - cam.yh) * z0 / cam.f
                shape = (*np.broadcast_shapes(t.shape, up.shape), 3)
                out = np.broadcast_to(colour * (1 + 0.05 * self.smooth(xc, yc))[..., None],
                                      shape).copy()
                if kind == "car":
                    lamps = (up > 0.65) & (up < 0.82) & ((t < 0.16) | (t > 0.84))
                    plate = (up > 0.4) & (up < 0.55) & (t > 0.38) & (t < 0.62)
                    out[np.broadcast_to(lamps, shape[:2])] = lamp
                    out[np.broadcast_to(plate, shape[:2])] = _rgb(.9, .9, .85)
                else:
                    glass_top = body_h - (0.25 if front else 0.6)
                    glass_bottom = 1.1 if front else 2.0
                    if kind == "truck" and not front:  # cargo doors: a seam, no window
                        seam = (np.abs(t - 0.5) < 0.02) & (up > clear)
                        out[np.broadcast_to(seam, shape[:2])] *= 0.6
                    else:
                        glass = (up > glass_bottom) & (up < glass_top) & (t > 0.05) & (t < 0.95)
                        out[np.broadcast_to(glass, shape[:2])] = _GLASS
                    band = (up > 0.75) & (up < 0.9)
                    out[np.broadcast_to(band, shape[:2])] = trim
                    lights = (up > 0.5) & (up < 0.7) & ((t < 0.1) | (t > 0.9))
                    out[np.broadcast_to(lights, shape[:2])] = lamp
                    if kind == "bus" and front:  # destination display
                        display = (up > body_h - 0.25) & (up < body_h - 0.06) & (t > 0.15) & (
                            t < 0.85)
                        out[np.broadcast_to(display, shape[:2])] = _rgb(1.0, .6, .1)
                under = (up < clear) & (t > 0.02) & (t < 0.98)
                out[np.broadcast_to(under, shape[:2])] = dark
                return out
            return texture

        def draw() -> None:
            x0, x1 = cam.x(X - half, z0), cam.x(X + half, z0)
            if Xs is not None:
                cv.polygon(label, cam.quad_x(Xs, z0, z1, clear, body_h), colour, side_shade)
                if kind == "car":  # the cabin's side windows
                    a, b = (0.25, 0.8) if not front else (0.2, 0.75)
                    za, zb = z0 + a * length, z0 + b * length
                    zc, zd = z0 + (b - 0.08) * length, z0 + (a + 0.1) * length
                    cv.polygon(label, [(cam.x(Xs, za), cam.y(body_h, za)),
                                       (cam.x(Xs, zb), cam.y(body_h, zb)),
                                       (cam.x(Xs, zc), cam.y(top, zc)),
                                       (cam.x(Xs, zd), cam.y(top, zd))], _GLASS)
                if kind == "truck":  # the cab, at the far (front) or near end
                    zc0, zc1 = (z1 - 2.2, z1) if not front else (z0, z0 + 2.2)
                    cv.polygon(label, cam.quad_x(Xs, zc0, zc1, clear, body_h - 0.6), trim)
                if kind == "train":  # pantograph
                    zm = z0 + length / 2
                    cv.segment(label, cam.x(X, zm), cam.y(body_h, zm), cam.x(X, zm + 1.5),
                               cam.y(body_h + 1.0, zm + 1.5), 0.05 * cam.ppm(zm),
                               _rgb(.2, .2, .2))
                r = 0.33 if kind == "car" else 0.5
                for a in (0.18, 0.82):  # wheels on the side
                    zw = z0 + a * length
                    cv.ellipse(label, cam.x(Xs, zw), cam.y(r, zw),
                               max(cam.f * abs(Xs) * r / (zw * zw), 0.3), r * cam.ppm(zw), dark)
            cv.rect(label, x0, x1, cam.y(body_h, z0), cam.y(0, z0), colour,
                    shade=end_texture(x0, x1))
            if kind == "car":  # the cabin: rear or front window in a frame
                zc = z0 + 0.4
                inset = 0.12 * cam.ppm(zc)
                xa, xb = cam.x(X - half, zc) + inset, cam.x(X + half, zc) - inset

                def cabin(xc, yc):
                    t = (xc - xa) / max(xb - xa, 1e-3)
                    up = cam.hc - (yc - cam.yh) * zc / cam.f
                    glass = (t > 0.08) & (t < 0.92) & (up < top - 0.06) & (up > body_h + 0.05)
                    return np.where(glass[..., None], _GLASS, trim)

                cv.rect(label, xa, xb, cam.y(top, zc), cam.y(body_h, zc), trim, shade=cabin)
        self.add(z0, draw)

    def draw_ego_and_border(self) -> None:
        cv, rng = self.cv, self.rng
        h, w = cv.h, cv.w
        if rng.random() < 0.9:  # the ego vehicle's bonnet, ignored as in Cityscapes
            hh = h * rng.uniform(0.07, 0.14)
            bulge = rng.uniform(0.3, 0.7)
            b = cv.box(0, w, h - hh - 2, h)
            rows, cols, xc, yc = b
            t = (xc - w / 2) / (w / 2)
            top = h - hh * (1 - bulge * t * t)
            cover = np.clip(yc - top + 0.5, 0.0, 1.0)
            paint = _CARS[int(rng.integers(len(_CARS)))] * 0.8
            shine = 1 + 0.5 * np.exp(-((yc - top - 0.3 * hh) / (0.15 * hh + 0.5)) ** 2)
            cv.paint(_VOID, cover, rows, cols, paint * shine[..., None])
        if rng.random() < 0.5:  # rectification border: black margins
            black = _rgb(0, 0, 0)
            left, right = rng.uniform(0, 4), rng.uniform(0, 4)
            cv.rect(_VOID, 0, left, 0, h, black)
            cv.rect(_VOID, w - right, w, 0, h, black)
            cv.rect(_VOID, 0, w, h - rng.uniform(0, 2.5), h, black)
