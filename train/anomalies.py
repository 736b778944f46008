"""Unknown objects in street scenes: an anomaly-segmentation track, and OoD proxies for training.

Both draw objects of kinds that no ordinary street scene (:mod:`train.street`) contains, through
the hooks of ``render_street_scene``, with generators of their own (the scene is unchanged
wherever they are not drawn), in an extra coverage channel labelled ``OOD_LABEL`` (254).

**Anomaly track** (``ANOMALY_KINDS``; ``render_anomaly_scene``), modelled on RoadAnomaly21 /
RoadObstacle21 / Fishyscapes: 1-3 objects (probabilities 0.5, 0.3, 0.2) per scene,

* animals (side-on to three-quarter views, legs, neck, head, ears, tail; sizes in metres as
  length × shoulder height): ``dog`` 0.5-0.9 × 0.35-0.7, ``deer`` 1.2-1.6 × 0.8-1.05 (some
  with antlers), ``cow`` 1.9-2.4 × 1.3-1.5 (white with dark patches, or brown), ``horse``
  2.0-2.4 × 1.45-1.7 (mane, long tail) and a large bird, ``goose`` 0.6-0.9 high;
* lost cargo: ``cardboard box`` (1-3 taped boxes of 0.3-0.8 m, some stacked), ``crate``
  (0.5-1.1 m, slatted, some open), ``pallet`` (1.2 × 0.8 × 0.144 m, stacks of 1-4), ``barrel``
  (0.58 m across, 0.88 m high, upright or lying, hoops), ``tyres`` (stacks of 1-4 car tyres),
  ``sack`` (0.6-1.0 m long, lumpy);
* debris: ``rock`` (0.25-1.0 m boulders), ``plank`` (1-3 boards of 1-2.5 m, some broken),
  ``rubble`` (6-14 bricks, chunks and stones scattered over 0.6-1.5 m).

Kinds are drawn as groups (animals 35%, cargo 40%, debris 25%), uniformly within a group. Each
object stands on the road (80%: between the road edges, clear of them) or on a sidewalk (20%:
between kerb and facade) at a depth drawn log-uniformly from the nearest ground visible above
the ego vehicle's bonnet (about 4-12 m, by camera) to 40 m, with a random heading, projected by
the scene's camera (so its pixel size follows from its size in metres and its depth) and
registered at its depth, so it occludes farther things and is occluded by nearer ones (cars,
persons, the bonnet). A scene whose objects win fewer than ``min_pixels`` pixels (hidden, or
too small) is re-drawn with new placements from the same object stream, the first object then
placed just beyond the bonnet in the camera's lane; so every scene shows an anomaly.

**Colours.** Unknown by shape and context, not by colour: every object's colours are taken
from the palettes that known classes already use (facade colours, car and bus paints, clothes,
skin tones, helmet and sign colours, asphalt and paving greys, wall and pole greys, vegetation
and grass greens, bark and fence browns), jittered as the scene jitters them, and shaded with
the scene's own per-pixel noise and smooth fields, then through the same global brightness
jitter and pixel noise as the rest of the image.

**Labels** (``anomaly_mask``): 1 where an object's coverage wins the pixel, 0 for every known
class, 255 where the scene is void (ego vehicle, borders, parking bays, rails, street
furniture), as the benchmarks.

**OoD proxies** (``PROXY_KINDS``; ``proxy_overlay``), as the COCO objects that Chan, Rottmann &
Gottschalk (ICCV 2021) paste into Cityscapes training images for entropy maximisation, and of
kinds disjoint from the anomaly track's: 1-3 flat 2-D silhouettes with simple shading (chairs,
tables, sofas, suitcases, handbags, umbrellas, balls, bottles, fridges, washing machines,
teddy bears, kites, floor lamps), pasted like cut-outs at random positions (wholly inside the
image, anywhere in it) and heights of 8-40% of the image height (log-uniform), as the top layer
(over everything, ego vehicle included) but before the global brightness jitter and pixel
noise, labelled ``OOD_LABEL``. Colours from the same known palettes.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from train.street import (
    _BUSES,
    _CARS,
    _CLOTHES,
    _FACADES,
    _GLASS,
    _HELMETS,
    _SKIN,
    _TRAMS,
    EXTRA_CHANNEL,
    IGNORE,
    _rgb,
    render_street_scene,
)

__all__ = [
    "ANOMALY",
    "ANOMALY_GROUPS",
    "ANOMALY_KINDS",
    "KNOWN",
    "KNOWN_PALETTES",
    "OOD_LABEL",
    "PROXY_KINDS",
    "Placement",
    "anomaly_mask",
    "anomaly_objects",
    "connected_components",
    "min_anomaly_pixels",
    "proxy_overlay",
    "render_anomaly_scene",
]

#: Label of OoD pixels in the 19-class label maps: the pasted proxies of training images (and
#: the unknown objects of anomaly scenes before ``anomaly_mask``). Not a class, not ``IGNORE``.
OOD_LABEL = 254
#: Values of anomaly masks: an anomaly pixel, a pixel of a known class (void stays ``IGNORE``).
ANOMALY, KNOWN = 1, 0

ANOMALY_GROUPS: dict[str, tuple[str, ...]] = {
    "animal": ("dog", "deer", "cow", "horse", "goose"),
    "cargo": ("cardboard box", "crate", "pallet", "barrel", "tyres", "sack"),
    "debris": ("rock", "plank", "rubble"),
}
_GROUP_P = {"animal": 0.35, "cargo": 0.40, "debris": 0.25}
ANOMALY_KINDS: tuple[str, ...] = tuple(k for g in ANOMALY_GROUPS.values() for k in g)
PROXY_KINDS: tuple[str, ...] = (
    "chair", "table", "sofa", "suitcase", "handbag", "umbrella", "ball", "bottle", "fridge",
    "washing machine", "teddy bear", "kite", "lamp",
)

_SIGN = [_rgb(.80, .10, .10), _rgb(.92, .92, .92), _rgb(.10, .30, .75), _rgb(.95, .80, .10)]
#: The colours known classes are drawn with in ``train.street`` (before its jitter), by source.
KNOWN_PALETTES: dict[str, list[np.ndarray]] = {
    "facade": list(_FACADES),
    "car": list(_CARS),
    "clothes": list(_CLOTHES),
    "skin": list(_SKIN),
    "helmet": list(_HELMETS),
    "vehicle": [c for pair in (*_BUSES, *_TRAMS) for c in pair]
    + [_rgb(.75, .1, .1), _rgb(.1, .25, .6), _rgb(.9, .55, .05)],  # motorcycle paints
    "sign": _SIGN,
    "asphalt": [_rgb(.33, .33, .35)],
    "paving": [_rgb(.60, .57, .55), _rgb(.62, .50, .47), _rgb(.45, .42, .40)],
    "wall": [_rgb(.62, .62, .64), _rgb(.52, .49, .53)],
    "metal": [_rgb(.5, .52, .55), _rgb(.45, .46, .48), _rgb(.55, .56, .58), _rgb(.6, .6, .62)],
    "wood": [_rgb(.30, .24, .18), _rgb(.45, .32, .22), _rgb(.75, .65, .40), _rgb(.72, .66, .55),
             _rgb(.68, .62, .46)],
    "green": [_rgb(.20, .38, .13), _rgb(.20, .36, .12), _rgb(.50, .62, .30), _rgb(.35, .38, .35),
              _rgb(.25, .35, .25)],
    "dark": [_rgb(.05, .05, .05), _rgb(.06, .06, .06), _rgb(.08, .08, .09), _rgb(.12, .12, .14)],
}
_ALL_KNOWN = [c for cs in KNOWN_PALETTES.values() for c in cs]
# Animal coats: the browns, blacks, whites and greys among the known colours.
_BROWNS = [_SKIN[1], _SKIN[2], _SKIN[3], _FACADES[3], _CLOTHES[7], _CLOTHES[4],
           KNOWN_PALETTES["wood"][1]]
_BLACKS = [_CARS[0], _CLOTHES[0], _CLOTHES[1]]
_WHITES = [_CARS[1], _CLOTHES[5], _FACADES[2], _SIGN[1]]
_GREYS = [_CARS[2], _CARS[3], _FACADES[1], _FACADES[7]]
_STONES = [*KNOWN_PALETTES["asphalt"], *KNOWN_PALETTES["paving"], *KNOWN_PALETTES["wall"],
           *KNOWN_PALETTES["metal"][:2], _FACADES[1], _FACADES[7]]
_CARDBOARD = [_FACADES[4], _FACADES[0], _CARS[7], KNOWN_PALETTES["wood"][2], _FACADES[6]]


def _pick(rng: np.random.Generator, colours: Sequence[np.ndarray], lo: float = 0.85,
          hi: float = 1.1) -> np.ndarray:
    """One of ``colours`` times a brightness jitter, as the scene jitters its colours."""
    return colours[int(rng.integers(len(colours)))] * np.float32(rng.uniform(lo, hi))


# --------------------------------------------------------------------------------------------
# Drawing in the scene: 3-D parts projected by the scene's camera


class _Pen:
    """Draws parts of one object into the canvas' coverage channel ``channel``; positions in
    metres in an object frame at ground point (X, Z) with heading ``yaw`` (radians from the
    +X axis towards +Z): ``a`` along the heading, ``b`` to its left, ``v`` up."""

    def __init__(self, street, cv, channel: int, X: float, Z: float, yaw: float) -> None:
        self.st, self.cv, self.cam, self.ch = street, cv, street.cam, channel
        self.X, self.Z = X, Z
        self.c, self.s = math.cos(yaw), math.sin(yaw)

    def world(self, a: float, b: float) -> tuple[float, float]:
        return self.X + a * self.c - b * self.s, self.Z + a * self.s + b * self.c

    def pt(self, a: float, b: float, v: float) -> tuple[float, float]:
        X, Z = self.world(a, b)
        return self.cam.x(X, Z), self.cam.y(v, Z)

    def depth(self, a: float, b: float) -> float:
        return self.world(a, b)[1]

    def ppm(self, a: float = 0.0, b: float = 0.0) -> float:
        return self.cam.ppm(self.depth(a, b))

    def begin(self, radius: float, height: float) -> bool:
        """Start the object's group over the projection of its bounding box (a square of
        ``radius`` around the ground point, ``height`` high)."""
        xs, ys = [], []
        for dx in (-radius, radius):
            for dz in (-radius, radius):
                z = max(self.Z + dz, 0.3)
                for v in (0.0, height):
                    xs.append(self.cam.x(self.X + dx, z))
                    ys.append(self.cam.y(v, z))
        return self.cv.begin(self.ch, min(xs), max(xs), min(ys), max(ys))

    def texture(self, noise: float = 0.05, smooth: float = 0.06, top: float | None = None,
                bottom: float | None = None, light: float = 0.2):
        """A shade function: the scene's per-pixel noise and smooth fields, and, given the rows
        ``top``..``bottom`` of a part, lighter at its top (by ``light``)."""
        st = self.st

        def shade(xc: np.ndarray, yc: np.ndarray) -> np.ndarray:
            value = 1 + noise * st.noise(xc, yc) + smooth * st.smooth(xc, yc)
            if top is not None and bottom is not None:
                t = np.clip((yc - top) / max(bottom - top, 1e-3), 0.0, 1.0)
                value = value * (1 + light / 2 - light * t)
            return value
        return shade

    # ---- parts
    def quad(self, pts3: Sequence[tuple[float, float, float]], colour, shade=None) -> None:
        """A planar convex polygon given by object-frame points (a, b, v)."""
        self.cv.polygon(self.ch, [self.pt(*p) for p in pts3], colour,
                        shade or self.texture())

    def segment(self, p: tuple[float, float, float], q: tuple[float, float, float], width: float,
                colour) -> None:
        """A limb or stick of ``width`` metres from p to q (object-frame points)."""
        wpx = width * self.ppm((p[0] + q[0]) / 2, (p[1] + q[1]) / 2)
        self.cv.segment(self.ch, *self.pt(*p), *self.pt(*q), max(wpx, 0.3), colour)

    def blob(self, centre: tuple[float, float, float], ha: float, hb: float, hv: float, colour,
             shade=None, wobble: tuple[float, float, float] | None = None,
             light: float = 0.25) -> None:
        """An ellipsoid of half-axes (ha along the heading, hb across, hv up), drawn as the
        ellipse of its projected extents."""
        a, b, v = centre
        x, y = self.pt(a, b, v)
        dxa = (self.pt(a + ha, b, v)[0] - self.pt(a - ha, b, v)[0]) / 2
        dxb = (self.pt(a, b + hb, v)[0] - self.pt(a, b - hb, v)[0]) / 2
        rx = math.hypot(dxa, dxb)
        ry = hv * self.ppm(a, b)
        if rx <= 0.05 or ry <= 0.05:
            return
        shade = shade or self.texture(top=y - ry, bottom=y + ry, light=light)
        self.cv.ellipse(self.ch, x, y, rx, ry, colour, shade, wobble)

    def box(self, a: float, b: float, yaw: float, W: float, D: float, H: float, colour,
            v0: float = 0.0, decorate: Callable | None = None) -> None:
        """A cuboid W (along ``yaw`` relative to the heading) × D × H metres on (a, b) at height
        v0: its faces turned towards the camera, lit from above and the front-left.
        ``decorate(face, corner)`` may add parts on each visible face (``face`` in "+a", "-a",
        "+b", "-b", "top"; ``corner(i, j, v)`` the object-frame point at box coordinates
        i ∈ [-1, 1] along W, j along D and height v)."""
        cy, sy = math.cos(yaw), math.sin(yaw)

        def corner(i: float, j: float, v: float) -> tuple[float, float, float]:
            return (a + i * W / 2 * cy - j * D / 2 * sy, b + i * W / 2 * sy + j * D / 2 * cy, v)

        X0, Z0 = self.world(a, b)
        top = v0 + H
        faces = []
        for name, (i, j) in (("+a", (1, 0)), ("-a", (-1, 0)), ("+b", (0, 1)), ("-b", (0, -1))):
            ca, cb, _ = corner(i, j, 0)
            Xf, Zf = self.world(ca, cb)
            nx, nz = Xf - X0, Zf - Z0  # outward normal (unnormalised)
            if nx * -Xf + nz * -Zf <= 0:
                continue
            norm = math.hypot(nx, nz) or 1.0
            light = 0.80 + 0.15 * (-0.6 * nx - 0.8 * nz) / norm
            if i:
                pts = [corner(i, -1, v0), corner(i, 1, v0), corner(i, 1, top), corner(i, -1, top)]
            else:
                pts = [corner(-1, j, v0), corner(1, j, v0), corner(1, j, top), corner(-1, j, top)]
            faces.append((name, pts, light))
        if top < self.cam.hc:
            faces.append(("top", [corner(-1, -1, top), corner(1, -1, top), corner(1, 1, top),
                                  corner(-1, 1, top)], 1.06))
        for name, pts, light in faces:
            self.quad(pts, colour * np.float32(light))
            if decorate is not None:
                decorate(name, corner, light)

    def hull(self, pts3: Sequence[tuple[float, float, float]], colour, shade=None) -> None:
        """The convex hull of the projections of object-frame points (a solid's outline)."""
        pts = sorted(set(self.pt(*p) for p in pts3))
        if len(pts) < 3:
            return

        def half(points):
            out: list[tuple[float, float]] = []
            for q in points:
                while len(out) >= 2 and ((out[-1][0] - out[-2][0]) * (q[1] - out[-2][1])
                                         - (out[-1][1] - out[-2][1]) * (q[0] - out[-2][0])
                                         ) <= 0:
                    out.pop()
                out.append(q)
            return out[:-1]

        outline = half(pts) + half(pts[::-1])
        if len(outline) >= 3:
            self.cv.polygon(self.ch, outline, colour, shade or self.texture())

    def disc(self, a: float, r: float, v: float, n: int = 16) -> list[tuple[float, float, float]]:
        """Points of a circle of radius r in the plane across the heading at ``a``, centred at
        height v."""
        return [(a, r * math.cos(t), v + r * math.sin(t))
                for t in np.linspace(0, 2 * math.pi, n, endpoint=False).tolist()]

    def cylinder(self, a: float, b: float, r: float, H: float, colour, v0: float = 0.0,
                 top_colour=None, bands: Sequence[tuple[float, float]] = (),
                 bulge: float = 0.0) -> None:
        """An upright cylinder of radius r on (a, b) from v0 to v0 + H: rim ellipse, body with
        round shading (and, with ``bulge``, lighter at mid-height, as a tyre's sidewall),
        darker ``bands`` (v_lo, v_hi), the top seen from above."""
        cam = self.cam
        X, Z = self.world(a, b)
        x = cam.x(X, Z)
        rx = r * cam.f / Z
        yb, yt = cam.y(v0, Z), cam.y(v0 + H, Z)
        ry_b = r * cam.f * max(cam.hc - v0, 0.0) / (Z * Z)
        ry_t = r * cam.f * max(cam.hc - v0 - H, 0.0) / (Z * Z)
        tex = self.texture()

        def round_shade(xc, yc):
            t = np.clip((xc - x) / max(rx, 1e-3), -1.0, 1.0)
            value = tex(xc, yc) * (0.72 + 0.38 * np.sqrt(np.clip(1 - (t + 0.3) ** 2 / 1.69, 0,
                                                                 1)))
            if bulge:
                s = np.clip((yb - yc) / max(yb - yt, 1e-3), 0.0, 1.0)
                value = value * (1 + bulge * np.sin(np.pi * s) - bulge / 2)
            return value

        if ry_b > 0.05:
            self.cv.ellipse(self.ch, x, yb, rx, ry_b, colour, round_shade)
        self.cv.rect(self.ch, x - rx, x + rx, yt, yb, colour, shade=round_shade)
        for lo, hi in bands:
            self.cv.rect(self.ch, x - rx, x + rx, cam.y(v0 + hi, Z), cam.y(v0 + lo, Z),
                         colour * np.float32(0.6), shade=round_shade)
        if ry_t > 0.05:
            self.cv.ellipse(self.ch, x, yt, rx, ry_t,
                            colour * np.float32(1.08) if top_colour is None else top_colour,
                            tex)


@dataclass
class _Object:
    """An object ready to place: ``radius`` (m) of its footprint, ``height`` (m) and
    ``draw(pen)`` painting it at the pen's frame."""

    kind: str
    radius: float
    height: float
    draw: Callable[[_Pen], None]
    side_on: bool = False  # animals: headings mostly across the line of sight


def _parts_by_depth(pen: _Pen, parts: list[tuple[float, float, Callable[[], None]]]) -> None:
    """Draw (a, b, fn) parts far to near (ties in list order)."""
    order = sorted(range(len(parts)), key=lambda k: (-pen.depth(parts[k][0], parts[k][1]), k))
    for k in order:
        parts[k][2]()


# ---- animals


def _quadruped(kind: str, rng: np.random.Generator) -> _Object:
    u = rng.uniform
    if kind == "dog":
        L, Hs = u(0.5, 0.9), u(0.35, 0.7)
        Hb, Wb, leg = 0.38 * Hs, 0.3 * Hs, 0.06 + 0.06 * Hs
        neck, neck_up, head = 0.45 * Hs, u(0.4, 1.0), (0.42 * Hs, 0.26 * Hs)
        ears, tail = 0.12 * Hs, (0.5 * Hs, u(0.2, 1.1))
        coat = _pick(rng, [*_BROWNS, *_BLACKS, *_WHITES, *_GREYS])
    elif kind == "deer":
        L, Hs = u(1.2, 1.6), u(0.8, 1.05)
        Hb, Wb, leg = 0.42 * Hs, 0.3 * Hs, 0.055
        neck, neck_up, head = 0.55 * Hs, u(0.7, 1.2), (0.32 * Hs, 0.16 * Hs)
        ears, tail = 0.12, (0.12, u(-0.5, 0.3))
        coat = _pick(rng, [_SKIN[1], _SKIN[2], _CLOTHES[7], _FACADES[3], _CLOTHES[4]])
    elif kind == "cow":
        L, Hs = u(1.9, 2.4), u(1.3, 1.5)
        Hb, Wb, leg = 0.5 * Hs, 0.45 * Hs, 0.14
        neck, neck_up, head = 0.3 * Hs, u(-0.7, 0.3), (0.5, 0.28)
        ears, tail = 0.1, (0.8, -1.35)
        coat = _pick(rng, _WHITES if rng.random() < 0.6 else [_FACADES[3], _SKIN[3], _SKIN[2]])
    else:  # horse
        L, Hs = u(2.0, 2.4), u(1.45, 1.7)
        Hb, Wb, leg = 0.42 * Hs, 0.35 * Hs, 0.1
        neck, neck_up, head = 0.55 * Hs, u(0.5, 1.0), (0.6, 0.25)
        ears, tail = 0.12, (0.85, -1.1)
        coat = _pick(rng, [_SKIN[2], _SKIN[3], _FACADES[3], _CARS[0], _WHITES[0], _GREYS[0]])
    dark = coat * np.float32(0.78)
    patches = []
    if kind == "cow" and coat.mean() > 0.5:
        for _ in range(int(rng.integers(2, 5))):
            ang, dist = u(0, 2 * math.pi), u(0.0, 0.5)
            patches.append((dist * math.cos(ang), dist * math.sin(ang), u(0.2, 0.35),
                            _pick(rng, _BLACKS)))
    mane = _pick(rng, _BLACKS) if kind == "horse" else None
    antlers = kind == "deer" and rng.random() < 0.45
    stride = u(-0.12, 0.12) * L
    vb = Hs - Hb / 2  # body centre height
    head_pitch = u(-0.3, 0.2)

    def draw(pen: _Pen) -> None:
        parts: list[tuple[float, float, Callable[[], None]]] = []
        for fa, sgn in ((0.36, 1), (-0.36, -1)):
            for b in (-0.28 * Wb, 0.28 * Wb):
                a = fa * L
                foot = a + sgn * stride * (1 if b > 0 else -1)
                knee = (a + foot) / 2 + 0.03 * L * sgn
                far = pen.depth(a, b) > pen.depth(a, -b)
                colour = dark if far else coat

                def leg_fn(a=a, b=b, foot=foot, knee=knee, colour=colour) -> None:
                    kv = 0.45 * (Hs - Hb)
                    pen.segment((a, b, vb), (knee, b, kv), leg * 1.15, colour)
                    pen.segment((knee, b, kv), (foot, b, 0.0), leg * 0.85, colour)
                parts.append((a, b * 1.8, leg_fn))

        def body_fn() -> None:
            y_top = pen.pt(0, 0, Hs)[1]
            shade = pen.texture(top=y_top, bottom=pen.pt(0, 0, vb - Hb / 2)[1], light=0.3)
            pen.blob((0, 0, vb), L / 2, Wb / 2, Hb / 2, coat, shade)
            for pa, pv, pr, pc in patches:
                pen.blob((pa * L / 2, 0, vb + pv * Hb / 2), pr * L / 2, 0.95 * Wb / 2,
                         pr * Hb / 2, pc)
        parts.append((0.0, 0.0, body_fn))
        a0, v0 = 0.42 * L, Hs - 0.2 * Hb
        a1, v1 = a0 + neck * math.cos(neck_up), v0 + neck * math.sin(neck_up)
        hl, hh = head
        ah, vh = a1 + hl / 2 * math.cos(head_pitch), v1 + hl / 2 * math.sin(head_pitch)

        def head_fn() -> None:
            pen.segment((a0, 0, v0), (a1, 0, v1), 0.9 * hh + 0.3 * Hb, coat)
            if mane is not None:
                pen.segment((a0 - 0.1, 0, v0 + 0.25 * Hb), (a1 - 0.05, 0, v1 + 0.08), 0.08, mane)
            pen.blob((ah, 0, vh), hl / 2, hh / 2.2, hh / 2, coat)
            pen.blob((ah + hl * 0.42, 0, vh - hh * 0.1), hl * 0.12, hh / 3, hh / 3,
                     coat * np.float32(0.55))  # nose
            for b in (-hh / 3, hh / 3):
                pen.quad([(a1 - 0.02, b, v1 + hh * 0.3), (a1 + ears * 0.6, b, v1 + hh * 0.3),
                          (a1 - ears * 0.2, b, v1 + hh * 0.3 + ears)], dark)
            if antlers:
                base = (a1, 0, v1 + hh * 0.4)
                for b in (-0.06, 0.06):
                    tip = (a1 - 0.12, b, v1 + hh * 0.4 + 0.45)
                    pen.segment(base, tip, 0.03, antler)
                    pen.segment((a1 - 0.05, b, v1 + 0.35), (a1 + 0.1, b, v1 + 0.6), 0.025,
                                antler)
        parts.append((a1, 0.0, head_fn))
        tl, tang = tail

        def tail_fn() -> None:
            p = (-L / 2 + 0.03, 0, Hs - 0.15 * Hb)
            q = (p[0] - tl * math.cos(tang) * 0.6, 0, p[2] + tl * math.sin(tang))
            pen.segment(p, q, 0.05 + 0.05 * (kind == "horse"), mane if mane is not None else
                        dark)
        parts.append((-L / 2, 0.0, tail_fn))
        if pen.begin(reach, Hs + neck + hh + (0.6 if antlers else 0.0)):
            _parts_by_depth(pen, parts)
            pen.cv.end()

    antler = _pick(rng, KNOWN_PALETTES["wood"][:2])
    reach = max(0.42 * L + neck + head[0], L / 2 + tail[0], Wb / 2) + 0.2
    return _Object(kind, max(L, Wb) / 2, Hs + neck, draw, side_on=True)


def _goose(rng: np.random.Generator) -> _Object:
    u = rng.uniform
    s = u(0.6, 0.9) / 0.8  # scale: 0.8 m high at s = 1
    plumage = _pick(rng, [*_WHITES, *_GREYS])
    wing = plumage * np.float32(0.82)
    beak = _pick(rng, [_CLOTHES[7], KNOWN_PALETTES["vehicle"][-1], _SIGN[3]])
    neck_lean = u(-0.1, 0.15)

    def draw(pen: _Pen) -> None:
        parts = []
        for b in (-0.06 * s, 0.06 * s):
            parts.append((0.0, b * 2, lambda b=b: pen.segment((0.0, b, 0.25 * s),
                                                              (0.03 * s, b, 0.0), 0.025 * s,
                                                              beak)))

        def body_fn() -> None:
            pen.blob((0, 0, 0.32 * s), 0.3 * s, 0.16 * s, 0.14 * s, plumage)
            pen.quad([(-0.26 * s, 0, 0.38 * s), (-0.4 * s, 0, 0.45 * s),
                      (-0.3 * s, 0, 0.28 * s)], plumage)
            pen.blob((-0.04 * s, 0, 0.35 * s), 0.2 * s, 0.17 * s, 0.08 * s, wing)
            top = (0.3 * s + neck_lean * s, 0, 0.74 * s)
            pen.segment((0.2 * s, 0, 0.36 * s), top, 0.07 * s, plumage)
            pen.blob((top[0] + 0.02 * s, 0, top[2] + 0.02 * s), 0.06 * s, 0.04 * s, 0.045 * s,
                     plumage)
            pen.segment((top[0] + 0.06 * s, 0, top[2] + 0.01 * s),
                        (top[0] + 0.15 * s, 0, top[2] - 0.01 * s), 0.035 * s, beak)
        parts.append((0.0, 0.0, body_fn))
        if pen.begin(0.5 * s, 0.85 * s):
            _parts_by_depth(pen, parts)
            pen.cv.end()

    return _Object("goose", 0.35 * s, 0.8 * s, draw, side_on=True)


# ---- cargo


def _cardboard(rng: np.random.Generator) -> _Object:
    u = rng.uniform
    boxes = []  # (a, b, v, W, D, H, yaw, colour, tape, stack)
    n = int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2]))
    a = b = v = 0.0
    stack = 0
    for k in range(n):
        W, D, H = u(0.3, 0.8), u(0.3, 0.6), u(0.25, 0.6)
        if k:
            if rng.random() < 0.5 and boxes[-1][3] + 0.1 > W:  # stacked on the previous one
                a, b, v = boxes[-1][0] + u(-0.08, 0.08), boxes[-1][1] + u(-0.08, 0.08), \
                    boxes[-1][2] + boxes[-1][5]
            else:
                a, b, v = a + u(-0.9, 0.9), b + u(-0.6, 0.6), 0.0
                stack += 1
        boxes.append((a, b, v, W, D, H, u(0, math.pi / 2), _pick(rng, _CARDBOARD),
                      _pick(rng, [_CLOTHES[5], _FACADES[2], _CARS[7]]), stack))

    def draw(pen: _Pen) -> None:
        parts = []
        for a, b, v, W, D, H, yaw, colour, tape, _ in boxes:
            def tape_on(face, corner, light, H=H, v=v, tape=tape, D=D):
                t = min(0.06 / max(D, 1e-3), 0.4)  # half tape width as a share of D
                if face == "top":
                    pen.quad([corner(-1, -t, v + H), corner(1, -t, v + H), corner(1, t, v + H),
                              corner(-1, t, v + H)], tape * np.float32(light))
                elif face in ("+a", "-a"):
                    i = 1 if face == "+a" else -1
                    pen.quad([corner(i, -t, v + 0.7 * H), corner(i, t, v + 0.7 * H),
                              corner(i, t, v + H), corner(i, -t, v + H)],
                             tape * np.float32(light))

            parts.append(lambda a=a, b=b, v=v, W=W, D=D, H=H, yaw=yaw, c=colour,
                         f=tape_on: pen.box(a, b, yaw, W, D, H, c, v, f))
        # stacks far to near (by their bottom box), each bottom-up
        bottoms = {p[9]: p for p in reversed(boxes)}
        order = sorted(range(len(boxes)), key=lambda k: (
            -pen.depth(bottoms[boxes[k][9]][0], bottoms[boxes[k][9]][1]), boxes[k][2]))
        radius = max(math.hypot(p[0], p[1]) for p in boxes) + 0.6
        if pen.begin(radius, max(p[2] + p[5] for p in boxes) + 0.1):
            for k in order:
                parts[k]()
            pen.cv.end()

    return _Object("cardboard box", max(math.hypot(p[0], p[1]) for p in boxes) + 0.4,
                   max(p[2] + p[5] for p in boxes), draw)


def _crate(rng: np.random.Generator) -> _Object:
    u = rng.uniform
    W, D, H = u(0.6, 1.1), u(0.5, 0.8), u(0.4, 0.8)
    yaw = u(0, math.pi / 2)
    wood = _pick(rng, KNOWN_PALETTES["wood"])
    slats = int(rng.integers(3, 6))
    open_top = rng.random() < 0.5

    def draw(pen: _Pen) -> None:
        def decorate(face, corner, light) -> None:
            gap = wood * np.float32(0.45 * light)
            if face == "top":
                if open_top:
                    pen.quad([corner(-0.85, -0.8, H), corner(0.85, -0.8, H),
                              corner(0.85, 0.8, H), corner(-0.85, 0.8, H)],
                             wood * np.float32(0.35))
                return
            for k in range(1, slats):
                v = H * k / slats
                if face in ("+a", "-a"):
                    i = 1 if face == "+a" else -1
                    pen.quad([corner(i, -1, v - 0.012), corner(i, 1, v - 0.012),
                              corner(i, 1, v + 0.012), corner(i, -1, v + 0.012)], gap)
                else:
                    j = 1 if face == "+b" else -1
                    pen.quad([corner(-1, j, v - 0.012), corner(1, j, v - 0.012),
                              corner(1, j, v + 0.012), corner(-1, j, v + 0.012)], gap)

        if pen.begin(max(W, D) / 2 + 0.3, H + 0.1):
            pen.box(0, 0, yaw, W, D, H, wood, 0.0, decorate)
            pen.cv.end()

    return _Object("crate", max(W, D) / 2, H, draw)


def _pallet(rng: np.random.Generator) -> _Object:
    u = rng.uniform
    W, D, h1 = 1.2, 0.8, 0.144
    n = int(rng.choice([1, 2, 3, 4], p=[0.3, 0.3, 0.2, 0.2]))
    yaw = u(0, math.pi)
    wood = _pick(rng, KNOWN_PALETTES["wood"][1:])
    H = n * h1

    def draw(pen: _Pen) -> None:
        dark = wood * np.float32(0.3)

        def decorate(face, corner, light) -> None:
            if face == "top":
                for k in range(1, 5):  # gaps between the five top boards
                    j = -1 + 2 * k / 5
                    pen.quad([corner(-1, j - 0.03, H), corner(1, j - 0.03, H),
                              corner(1, j + 0.03, H), corner(-1, j + 0.03, H)], dark)
                return
            length = W if face in ("+b", "-b") else D
            block = 0.145 / length * 2  # block width in box coordinates (-1..1)
            for k in range(n):
                v0, v1 = k * h1 + 0.022, k * h1 + 0.122
                for lo, hi in ((-1 + block, -block / 2), (block / 2, 1 - block)):
                    if face in ("+b", "-b"):
                        j = 1 if face == "+b" else -1
                        pen.quad([corner(lo, j, v0), corner(hi, j, v0), corner(hi, j, v1),
                                  corner(lo, j, v1)], dark)
                    else:
                        i = 1 if face == "+a" else -1
                        pen.quad([corner(i, lo, v0), corner(i, hi, v0), corner(i, hi, v1),
                                  corner(i, lo, v1)], dark)

        if pen.begin(0.8, H + 0.1):
            pen.box(0, 0, yaw, W, D, H, wood, 0.0, decorate)
            pen.cv.end()

    return _Object("pallet", 0.72, H, draw)


def _barrel(rng: np.random.Generator) -> _Object:
    r, H = 0.29, 0.88
    paint = _pick(rng, [*_CARS[:6], *_SIGN, *KNOWN_PALETTES["vehicle"][:2], _CLOTHES[6]])
    lying = rng.random() < 0.3
    bands = [(0.28, 0.31), (0.57, 0.6)]

    def draw(pen: _Pen) -> None:
        if not pen.begin(0.6, H if not lying else 2 * r + 0.05):
            return
        if not lying:
            pen.cylinder(0, 0, r, H, paint, bands=[(lo * H, hi * H) for lo, hi in bands],
                         top_colour=paint * np.float32(1.1))
        else:  # axis along the heading: the side, hoops, and the end towards the camera
            y0, y1 = pen.pt(0, 0, 2 * r)[1], pen.pt(0, 0, 0)[1]
            shade = pen.texture(top=y0, bottom=y1, light=0.5)
            pen.hull(pen.disc(-H / 2, r, r) + pen.disc(H / 2, r, r), paint, shade)
            for lo, hi in bands:
                for t0, t1 in ((lo, hi), (1 - hi, 1 - lo)):
                    a0, a1 = -H / 2 + t0 * H, -H / 2 + t1 * H
                    pen.hull(pen.disc(a0, r, r) + pen.disc(a1, r, r), paint * np.float32(0.6),
                             shade)
            end = H / 2 if pen.depth(H / 2, 0) < pen.depth(-H / 2, 0) else -H / 2
            pen.hull(pen.disc(end, r, r), paint * np.float32(0.85))
            pen.hull(pen.disc(end, 0.85 * r, r), paint * np.float32(0.75))
        pen.cv.end()

    return _Object("barrel", 0.45 if lying else r, H if not lying else 2 * r, draw)


def _tyres(rng: np.random.Generator) -> _Object:
    r, t = rng.uniform(0.3, 0.35), rng.uniform(0.19, 0.24)
    n = int(rng.choice([1, 2, 3, 4], p=[0.2, 0.3, 0.3, 0.2]))
    rubber = _pick(rng, KNOWN_PALETTES["dark"][1:], 0.9, 1.3)

    def draw(pen: _Pen) -> None:
        if not pen.begin(r + 0.1, n * t + 0.05):
            return
        for k in range(n):
            pen.cylinder(0, 0, r, t, rubber, v0=k * t, bulge=1.3,
                         top_colour=rubber * np.float32(2.2))
        cam = pen.cam
        X, Z = pen.world(0, 0)
        ry = 0.55 * r * cam.f * max(cam.hc - n * t, 0.0) / (Z * Z)
        if ry > 0.05:  # the hole of the top tyre
            pen.cv.ellipse(pen.ch, cam.x(X, Z), cam.y(n * t, Z), 0.55 * r * cam.f / Z, ry,
                           KNOWN_PALETTES["dark"][0] * np.float32(0.6))
        pen.cv.end()

    return _Object("tyres", r, n * t, draw)


def _sack(rng: np.random.Generator) -> _Object:
    u = rng.uniform
    L, Wd, H = u(0.6, 1.0), u(0.35, 0.5), u(0.2, 0.32)
    cloth = _pick(rng, [*_CARDBOARD[:3], _CLOTHES[5], _CLOTHES[6], _CARS[6], _FACADES[1]])
    wobble = (u(0.04, 0.09), float(rng.integers(3, 7)), u(0, 2 * math.pi))

    def draw(pen: _Pen) -> None:
        if pen.begin(L / 2 + 0.3, H + 0.1):
            pen.blob((0, 0, H / 2), L / 2, Wd / 2, H / 2, cloth, wobble=wobble, light=0.35)
            pen.blob((L / 2, 0, H * 0.55), 0.06, 0.06, 0.07, cloth * np.float32(0.8))
            pen.cv.end()

    return _Object("sack", L / 2, H, draw)


# ---- debris


def _rock(rng: np.random.Generator) -> _Object:
    u = rng.uniform
    R = u(0.25, 1.0) / 2
    Hr = R * u(0.55, 0.9)
    stone = _pick(rng, _STONES)
    wobble = (u(0.04, 0.1), float(rng.integers(2, 5)), u(0, 2 * math.pi))
    small = [(u(-1.5, 1.5) * R, u(-1.5, 1.5) * R, u(0.15, 0.35) * R) for _ in
             range(int(rng.integers(0, 3)))]

    def draw(pen: _Pen) -> None:
        if not pen.begin(2.2 * R + 0.2, 2 * Hr):
            return
        parts = [(a, b, lambda a=a, b=b, s=s: pen.blob((a, b, 0.7 * s), s, s, 0.8 * s,
                                                       stone * np.float32(0.9),
                                                       wobble=wobble))
                 for a, b, s in small]
        y0, y1 = pen.pt(0, 0, 1.85 * Hr)[1], pen.pt(0, 0, 0)[1]
        parts.append((0.0, 0.0, lambda: pen.blob((0, 0, 0.85 * Hr), R, R, Hr, stone,
                                                 pen.texture(0.12, 0.08, y0, y1, 0.5),
                                                 wobble)))
        _parts_by_depth(pen, parts)
        pen.cv.end()

    return _Object("rock", R, 1.7 * Hr, draw)


def _plank(rng: np.random.Generator) -> _Object:
    u = rng.uniform
    boards = []
    for _ in range(int(rng.choice([1, 2, 3], p=[0.45, 0.35, 0.2]))):
        L, Wd, T = u(1.0, 2.5), u(0.15, 0.3), u(0.025, 0.05)
        a, b, yaw = u(-0.6, 0.6), u(-0.6, 0.6), u(0, math.pi)
        wood = _pick(rng, KNOWN_PALETTES["wood"])
        if rng.random() < 0.35:  # broken in two, the pieces apart
            cut = u(0.3, 0.7) * L
            boards.append((a - (L - cut) / 2 * math.cos(yaw), b - (L - cut) / 2 * math.sin(yaw),
                           yaw, cut, Wd, T, wood))
            yaw2 = yaw + u(-0.5, 0.5)
            boards.append((a + cut / 2 * math.cos(yaw) + 0.15, b + cut / 2 * math.sin(yaw),
                           yaw2, L - cut, Wd, T, wood))
        else:
            boards.append((a, b, yaw, L, Wd, T, wood))
    stack_v = [0.0] * len(boards)
    for k in range(1, len(boards)):  # later boards lie on earlier ones where they cross
        stack_v[k] = stack_v[k - 1] + boards[k - 1][5] if rng.random() < 0.5 else 0.0
    extent = max(math.hypot(p[0], p[1]) + p[3] / 2 for p in boards)

    def draw(pen: _Pen) -> None:
        if not pen.begin(extent + 0.2, 0.3):
            return
        for (a, b, yaw, L, Wd, T, wood), v in zip(boards, stack_v, strict=True):
            pen.box(a, b, yaw, L, Wd, T, wood, v)
        pen.cv.end()

    return _Object("plank", extent, 0.15, draw)


def _rubble(rng: np.random.Generator) -> _Object:
    u = rng.uniform
    spread = u(0.6, 1.5)
    pieces = []
    for _ in range(int(rng.integers(6, 15))):
        a, b = u(-spread, spread), u(-spread, spread) * 0.7
        if rng.random() < 0.5:  # bricks and chunks of concrete
            colour = _pick(rng, [_FACADES[3], *_STONES[:5]])
            pieces.append((a, b, ("box", u(0.1, 0.35), u(0.08, 0.2), u(0.06, 0.15),
                                  u(0, math.pi), colour)))
        else:
            colour = _pick(rng, _STONES)
            pieces.append((a, b, ("stone", u(0.05, 0.18), colour,
                                  (u(0.05, 0.15), float(rng.integers(3, 7)),
                                   u(0, 2 * math.pi)))))

    def draw(pen: _Pen) -> None:
        if not pen.begin(spread + 0.4, 0.4):
            return
        parts = []
        for a, b, spec in pieces:
            if spec[0] == "box":
                _, W, D, H, yaw, colour = spec
                parts.append((a, b, lambda a=a, b=b, W=W, D=D, H=H, yaw=yaw, c=colour:
                              pen.box(a, b, yaw, W, D, H, c)))
            else:
                _, s, colour, wob = spec
                parts.append((a, b, lambda a=a, b=b, s=s, c=colour, wob=wob:
                              pen.blob((a, b, 0.6 * s), s, s, 0.75 * s, c,
                                       pen.texture(0.12, 0.05), wob)))
        _parts_by_depth(pen, parts)
        pen.cv.end()

    return _Object("rubble", spread, 0.3, draw)


_ANOMALY_MAKERS: dict[str, Callable[[np.random.Generator], _Object]] = {
    "dog": lambda rng: _quadruped("dog", rng),
    "deer": lambda rng: _quadruped("deer", rng),
    "cow": lambda rng: _quadruped("cow", rng),
    "horse": lambda rng: _quadruped("horse", rng),
    "goose": _goose,
    "cardboard box": _cardboard,
    "crate": _crate,
    "pallet": _pallet,
    "barrel": _barrel,
    "tyres": _tyres,
    "sack": _sack,
    "rock": _rock,
    "plank": _plank,
    "rubble": _rubble,
}
assert tuple(_ANOMALY_MAKERS) == ANOMALY_KINDS


# --------------------------------------------------------------------------------------------
# Placement and the anomaly track


@dataclass(frozen=True)
class Placement:
    """Where an anomaly object was put: its kind, ground point (X lateral, z depth, metres),
    heading (radians) and surface ("road" or "sidewalk")."""

    kind: str
    X: float
    z: float
    yaw: float
    surface: str


_Z_MAX = 40.0


def _nearest_depth(street) -> float:
    """Depth of the ground seen at 85% of the image height (just above the ego vehicle's
    bonnet, which covers at most the bottom 14%)."""
    cam, h = street.cam, street.cv.h
    return cam.f * cam.hc / max(0.85 * h - cam.yh, 1.0)


def anomaly_objects(rng: np.random.Generator, *, count: int | None = None,
                    kinds: Sequence[str] | None = None, near: bool = False,
                    placed: list[Placement] | None = None, channel: int = EXTRA_CHANNEL):
    """The ``objects`` hook of ``render_street_scene`` that places 1-3 anomaly objects (or
    ``count``; of ``kinds`` in turn if given, else drawn by group) in coverage channel
    ``channel``. ``near``: the first object in the camera's lane just beyond the bonnet.
    ``placed`` (a list) receives the placements. All random numbers come from ``rng``."""
    if kinds is not None and not set(kinds) <= set(ANOMALY_KINDS):
        raise ValueError(f"unknown anomaly kinds {sorted(set(kinds) - set(ANOMALY_KINDS))}")

    def hook(street, cv) -> None:
        n = count if count is not None else int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2]))
        groups = list(ANOMALY_GROUPS)
        z_lo = _nearest_depth(street)
        for k in range(n):
            if kinds is not None:
                kind = kinds[k % len(kinds)]
            else:
                group = groups[int(rng.choice(len(groups), p=[_GROUP_P[g] for g in groups]))]
                kind = ANOMALY_GROUPS[group][int(rng.integers(len(ANOMALY_GROUPS[group])))]
            obj = _ANOMALY_MAKERS[kind](rng)
            R = obj.radius
            lo, hi = street.road
            if near and k == 0:
                surface = "road"
                z = z_lo + R + rng.uniform(0.0, 2.0)
                a, b = max(lo + R + 0.3, -1.5), min(hi - R - 0.3, 1.5)
                X = rng.uniform(a, b) if a < b else (lo + hi) / 2
            else:
                z0 = min(z_lo + R, _Z_MAX - 5)
                z = float(np.exp(rng.uniform(np.log(z0), np.log(_Z_MAX))))
                if rng.random() < 0.8:
                    surface = "road"
                    a, b = lo + R + 0.3, hi - R - 0.3
                    X = rng.uniform(a, b) if a < b else (lo + hi) / 2
                else:
                    surface = "sidewalk"
                    side = int(rng.integers(2))
                    a, b = street.kerb[side] + R + 0.2, street.facade[side] - R - 0.2
                    d = rng.uniform(a, b) if a < b else (street.kerb[side]
                                                         + street.facade[side]) / 2
                    X = street.side_x(side, d)
            if obj.side_on:
                yaw = (math.pi if rng.random() < 0.5 else 0.0) + rng.uniform(-0.9, 0.9)
            else:
                yaw = rng.uniform(0, 2 * math.pi)
            if placed is not None:
                placed.append(Placement(kind, float(X), float(z), float(yaw), surface))
            pen = _Pen(street, cv, channel, X, z, yaw)
            street.add(z, lambda obj=obj, pen=pen: obj.draw(pen))

    return hook


def min_anomaly_pixels(size: int) -> int:
    """The fewest anomaly pixels a scene of height ``size`` (width 2·size) must show: 1/3200 of
    its pixels (10 at size 128), at least 1."""
    return max(1, math.ceil(2 * size * size / 3200))


def render_anomaly_scene(scene_rng: np.random.Generator, object_rng: np.random.Generator,
                         size: int, *, min_pixels: int | None = None, max_attempts: int = 64,
                         kinds: Sequence[str] | None = None, count: int | None = None
                         ) -> tuple[np.ndarray, np.ndarray, list[Placement]]:
    """A street scene (from a copy of ``scene_rng``, which is left as it is) with anomaly
    objects (from ``object_rng``): ``(image, label, placements)``, image (size, 2·size, 3)
    uint8, label (size, 2·size) uint8 with the 19 classes, ``OOD_LABEL`` where an object wins
    the pixel and 255 = void (``anomaly_mask`` turns it into the 0/1/255 mask).

    If the objects win fewer than ``min_pixels`` (default ``min_anomaly_pixels(size)``)
    pixels, the scene is rendered again with new placements from ``object_rng`` (from the third
    attempt on with the first object just beyond the bonnet); deterministic per generator
    states."""
    need = min_anomaly_pixels(size) if min_pixels is None else min_pixels
    for attempt in range(max_attempts):
        placed: list[Placement] = []
        hook = anomaly_objects(object_rng, count=count, kinds=kinds, near=attempt >= 2,
                               placed=placed)
        image, label = render_street_scene(copy.deepcopy(scene_rng), size, objects=hook,
                                           extra_labels=(OOD_LABEL,))
        if int((label == OOD_LABEL).sum()) >= need:
            return image, label, placed
    raise RuntimeError(f"no anomaly visible after {max_attempts} placements")


def anomaly_mask(label: np.ndarray) -> np.ndarray:
    """The benchmark's ground truth of a label map from ``render_anomaly_scene``: uint8, 1 =
    anomaly (``OOD_LABEL``), 0 = known class, 255 = void."""
    out = (label == OOD_LABEL).astype(np.uint8)
    out[label == IGNORE] = IGNORE
    return out


def connected_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a boolean (H, W) mask: (int32 (H, W) map, 0 = background,
    1..n the components in raster order of their first pixel; n)."""
    h, w = mask.shape
    out = np.zeros((h, w), dtype=np.int32)
    n = 0
    for r0, c0 in zip(*np.nonzero(mask), strict=True):
        if out[r0, c0]:
            continue
        n += 1
        out[r0, c0] = n
        queue = deque([(int(r0), int(c0))])
        while queue:
            r, c = queue.popleft()
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    rr, cc = r + dr, c + dc
                    if 0 <= rr < h and 0 <= cc < w and mask[rr, cc] and not out[rr, cc]:
                        out[rr, cc] = n
                        queue.append((rr, cc))
    return out, n


# --------------------------------------------------------------------------------------------
# OoD proxies: flat cut-outs on top of the image

_PROXY_ASPECT = {  # width / height of each kind's box
    "chair": 0.6, "table": 1.6, "sofa": 2.2, "suitcase": 0.7, "handbag": 1.2, "umbrella": 1.1,
    "ball": 1.0, "bottle": 0.33, "fridge": 0.55, "washing machine": 0.95, "teddy bear": 0.8,
    "kite": 0.75, "lamp": 0.4,
}
assert tuple(_PROXY_ASPECT) == PROXY_KINDS


class _Flat:
    """Draws a flat object in the box (x0, y0, bw, bh) pixels: unit coordinates u (left to
    right, mirrored if ``flip``) and v (top to bottom)."""

    def __init__(self, street, cv, channel: int, x0: float, y0: float, bw: float, bh: float,
                 flip: bool) -> None:
        self.st, self.cv, self.ch = street, cv, channel
        self.x0, self.y0, self.bw, self.bh, self.flip = x0, y0, bw, bh, flip
        top, bottom = y0, y0 + bh

        def shade(xc, yc):  # lit from above, the scene's texture
            t = np.clip((yc - top) / max(bottom - top, 1e-3), 0.0, 1.0)
            return (1 + 0.04 * street.noise(xc, yc) + 0.05 * street.smooth(xc, yc)) * (
                1.1 - 0.22 * t)
        self.shade = shade

    def p(self, u: float, v: float) -> tuple[float, float]:
        return self.x0 + (1 - u if self.flip else u) * self.bw, self.y0 + v * self.bh

    def rect(self, u0: float, u1: float, v0: float, v1: float, colour) -> None:
        (xa, ya), (xb, yb) = self.p(u0, v0), self.p(u1, v1)
        self.cv.rect(self.ch, min(xa, xb), max(xa, xb), ya, yb, colour, shade=self.shade)

    def ellipse(self, u: float, v: float, ru: float, rv: float, colour, shade=None) -> None:
        x, y = self.p(u, v)
        self.cv.ellipse(self.ch, x, y, max(ru * self.bw, 0.4), max(rv * self.bh, 0.4), colour,
                        shade or self.shade)

    def polygon(self, pts: Sequence[tuple[float, float]], colour) -> None:
        self.cv.polygon(self.ch, [self.p(u, v) for u, v in pts], colour, self.shade)

    def line(self, pts: Sequence[tuple[float, float]], width: float, colour) -> None:
        """A polyline of ``width`` (share of the box height; at least 1 pixel)."""
        wpx = max(width * self.bh, 1.0)
        for (u0, v0), (u1, v1) in itertools.pairwise(pts):
            self.cv.segment(self.ch, *self.p(u0, v0), *self.p(u1, v1), wpx, colour)


def _arc(cu: float, cv_: float, ru: float, rv: float, t0: float, t1: float, n: int
         ) -> list[tuple[float, float]]:
    return [(cu + ru * math.cos(t), cv_ - rv * math.sin(t))
            for t in np.linspace(t0, t1, n).tolist()]


def _draw_proxy(kind: str, f: _Flat, rng: np.random.Generator) -> None:
    """One flat object of ``kind``; colours from the known palettes."""
    main = _pick(rng, _ALL_KNOWN)
    second = _pick(rng, _ALL_KNOWN)
    dark = main * np.float32(0.6)
    if kind == "chair":
        wood = _pick(rng, [*KNOWN_PALETTES["wood"], *_CARS, *KNOWN_PALETTES["metal"]])
        f.rect(0.08, 0.2, 0.0, 1.0, wood)  # back post and rear leg
        f.rect(0.14, 0.24, 0.05, 0.45, main)  # back cushion
        f.rect(0.08, 0.92, 0.5, 0.58, wood)  # seat
        f.rect(0.1, 0.9, 0.44, 0.52, main)  # seat cushion
        f.rect(0.8, 0.9, 0.58, 1.0, wood)
        f.rect(0.3, 0.36, 0.58, 0.96, wood * np.float32(0.7))  # far legs
        f.rect(0.62, 0.68, 0.58, 0.96, wood * np.float32(0.7))
    elif kind == "table":
        wood = _pick(rng, [*KNOWN_PALETTES["wood"], *_WHITES, *KNOWN_PALETTES["metal"]])
        f.rect(0.2, 0.26, 0.1, 0.94, wood * np.float32(0.7))
        f.rect(0.74, 0.8, 0.1, 0.94, wood * np.float32(0.7))
        f.rect(0.05, 0.95, 0.08, 0.17, wood * np.float32(0.85))
        f.rect(0.06, 0.13, 0.1, 1.0, wood)
        f.rect(0.87, 0.94, 0.1, 1.0, wood)
        f.rect(0.0, 1.0, 0.0, 0.1, wood)
        if rng.random() < 0.4:  # a cloth
            f.polygon([(0.0, 0.0), (1.0, 0.0), (1.0, 0.3), (0.0, 0.3)], second)
    elif kind == "sofa":
        f.rect(0.06, 0.94, 0.05, 0.55, main)
        f.rect(0.04, 0.96, 0.5, 0.84, main * np.float32(0.92))
        for u in (0.06, 0.94):
            f.rect(u - 0.06, u + 0.06, 0.32, 0.86, main * np.float32(1.05))
            f.ellipse(u, 0.32, 0.06, 0.06, main * np.float32(1.05))
        f.line([(0.5, 0.08), (0.5, 0.82)], 0.02, dark)
        f.line([(0.12, 0.56), (0.88, 0.56)], 0.02, dark)
        for u in (0.1, 0.9):
            f.rect(u - 0.03, u + 0.03, 0.84, 1.0, _pick(rng, KNOWN_PALETTES["wood"]))
    elif kind == "suitcase":
        f.line([(0.35, 0.14), (0.35, 0.03), (0.65, 0.03), (0.65, 0.14)], 0.035, dark)
        f.rect(0.02, 0.98, 0.12, 0.94, main)
        f.rect(0.0, 1.0, 0.16, 0.9, main)
        for u in (0.25, 0.5, 0.75):
            f.rect(u - 0.03, u + 0.03, 0.14, 0.92, main * np.float32(0.8))
        for u in (0.15, 0.85):
            f.ellipse(u, 0.96, 0.07, 0.04, KNOWN_PALETTES["dark"][0])
    elif kind == "handbag":
        f.line(_arc(0.5, 0.38, 0.26, 0.36, 0.0, math.pi, 9), 0.05, dark)
        f.polygon([(0.1, 0.35), (0.9, 0.35), (1.0, 1.0), (0.0, 1.0)], main)
        f.polygon([(0.1, 0.35), (0.9, 0.35), (0.84, 0.62), (0.16, 0.62)], main * np.float32(0.8))
        f.rect(0.45, 0.55, 0.55, 0.66, _pick(rng, KNOWN_PALETTES["metal"]))
    elif kind == "umbrella":
        f.line([(0.5, 0.45), (0.5, 0.93), (0.47, 0.99), (0.41, 0.98), (0.39, 0.93)], 0.03,
               KNOWN_PALETTES["dark"][2])
        rim = _arc(0.5, 0.45, 0.5, 0.42, 0.0, math.pi, 25)
        f.polygon(rim, main)
        for k in range(0, 24, 8):  # alternate panels
            f.polygon([(0.5, 0.45), *rim[k:k + 5]], second)
        f.line([(0.5, 0.03), (0.5, 0.0)], 0.03, KNOWN_PALETTES["dark"][2])
    elif kind == "ball":
        hx, hy = f.p(0.38, 0.35)  # the highlight
        r = max(f.bw, 1.0) / 2

        def round_shade(xc, yc):
            d = np.sqrt((xc - hx) ** 2 + (yc - hy) ** 2) / r
            return f.shade(xc, yc) * np.clip(1.2 - 0.45 * d, 0.5, 1.2)
        f.ellipse(0.5, 0.5, 0.5, 0.5, main, round_shade)
        if rng.random() < 0.5:  # beach ball: coloured sectors
            for k in range(3):
                t0 = 2 * math.pi * k / 3
                f.polygon([(0.5, 0.5), *_arc(0.5, 0.5, 0.49, 0.49, t0, t0 + math.pi / 3, 6)],
                          second)
        else:  # football: dark patches
            f.polygon(_arc(0.5, 0.5, 0.14, 0.14, math.pi / 2, math.pi / 2 + 2 * math.pi, 6)[:5],
                      KNOWN_PALETTES["dark"][0])
            for k in range(5):
                t = math.pi / 2 + 2 * math.pi * k / 5
                u, v = 0.5 + 0.4 * math.cos(t), 0.5 - 0.4 * math.sin(t)
                f.ellipse(u, v, 0.07, 0.07, KNOWN_PALETTES["dark"][0], round_shade)
    elif kind == "bottle":
        glass = _pick(rng, [*KNOWN_PALETTES["green"][:2], _GLASS, KNOWN_PALETTES["wood"][0],
                            _CARS[6], _CLOTHES[6]])
        f.rect(0.05, 0.95, 0.38, 1.0, glass)
        f.polygon([(0.05, 0.385), (0.95, 0.385), (0.65, 0.2), (0.35, 0.2)], glass)
        f.rect(0.35, 0.65, 0.04, 0.22, glass)
        f.rect(0.31, 0.69, 0.0, 0.07, second)
        f.rect(0.05, 0.95, 0.55, 0.8, main)
        f.rect(0.18, 0.26, 0.42, 0.95, glass * np.float32(1.35))
    elif kind == "fridge":
        body = _pick(rng, [*_WHITES, *KNOWN_PALETTES["metal"], *_CARS[4:6], _FACADES[2]])
        f.rect(0.0, 1.0, 0.0, 1.0, body)
        f.rect(0.9, 1.0, 0.0, 1.0, body * np.float32(0.85))
        f.line([(0.0, 0.35), (0.9, 0.35)], 0.012, body * np.float32(0.5))
        f.rect(0.78, 0.83, 0.12, 0.3, KNOWN_PALETTES["metal"][1])
        f.rect(0.78, 0.83, 0.42, 0.62, KNOWN_PALETTES["metal"][1])
    elif kind == "washing machine":
        body = _pick(rng, [*_WHITES, *KNOWN_PALETTES["metal"]])
        f.rect(0.0, 1.0, 0.0, 1.0, body)
        f.rect(0.0, 1.0, 0.0, 0.15, body * np.float32(0.85))
        for u in (0.7, 0.85):
            f.ellipse(u, 0.075, 0.04, 0.04, KNOWN_PALETTES["dark"][2])
        f.ellipse(0.5, 0.57, 0.34, 0.34, KNOWN_PALETTES["metal"][0])
        f.ellipse(0.5, 0.57, 0.26, 0.26, _GLASS)
        f.ellipse(0.42, 0.5, 0.06, 0.06, _GLASS * np.float32(2.5))
    elif kind == "teddy bear":
        fur = _pick(rng, [*_BROWNS, *_WHITES[:2], _GREYS[0], _FACADES[4]])
        light = np.minimum(fur * np.float32(1.35), 1.0)
        for u in (0.3, 0.7):
            f.ellipse(u, 0.1, 0.1, 0.09, fur)
            f.ellipse(u, 0.1, 0.05, 0.05, light)
        for u in (0.18, 0.82):
            f.ellipse(u, 0.58, 0.1, 0.15, fur)
        f.ellipse(0.5, 0.66, 0.3, 0.28, fur)
        f.ellipse(0.5, 0.68, 0.17, 0.17, light)
        for u in (0.3, 0.7):
            f.ellipse(u, 0.9, 0.15, 0.1, fur)
        f.ellipse(0.5, 0.3, 0.25, 0.22, fur)
        f.ellipse(0.5, 0.37, 0.1, 0.08, light)
        f.ellipse(0.5, 0.34, 0.04, 0.03, KNOWN_PALETTES["dark"][0])
        for u in (0.4, 0.6):
            f.ellipse(u, 0.25, 0.03, 0.03, KNOWN_PALETTES["dark"][0])
    elif kind == "kite":
        top, right, bottom, left = (0.5, 0.0), (1.0, 0.26), (0.5, 0.7), (0.0, 0.26)
        centre = (0.5, 0.26)
        f.polygon([top, right, centre], main)
        f.polygon([right, bottom, centre], second)
        f.polygon([bottom, left, centre], main)
        f.polygon([left, top, centre], second)
        f.line([top, bottom], 0.015, KNOWN_PALETTES["dark"][2])
        f.line([left, right], 0.015, KNOWN_PALETTES["dark"][2])
        tail = [(0.5, 0.7), (0.45, 0.78), (0.55, 0.86), (0.45, 0.94), (0.5, 1.0)]
        f.line(tail, 0.012, KNOWN_PALETTES["dark"][2])
        for u, v in tail[1:4]:
            f.polygon([(u - 0.08, v - 0.025), (u, v), (u - 0.08, v + 0.025)], second)
            f.polygon([(u + 0.08, v - 0.025), (u + 0.08, v + 0.025), (u, v)], second)
    else:  # floor lamp
        metal = _pick(rng, [*KNOWN_PALETTES["metal"], *KNOWN_PALETTES["dark"]])
        f.ellipse(0.5, 0.97, 0.4, 0.03, metal)
        f.line([(0.5, 0.96), (0.5, 0.3)], 0.02, metal)
        f.polygon([(0.25, 0.0), (0.75, 0.0), (1.0, 0.32), (0.0, 0.32)], main)


def proxy_overlay(rng: np.random.Generator, *, count: int | None = None,
                  kinds: Sequence[str] | None = None, placed: list | None = None,
                  channel: int = EXTRA_CHANNEL):
    """The ``overlay`` hook of ``render_street_scene`` that pastes 1-3 OoD proxies (or
    ``count``; of ``kinds`` in turn if given, else uniformly drawn) in coverage channel
    ``channel``: boxes of 8-40% of the image height (log-uniform) at uniform positions inside
    the image, mirrored at random. ``placed`` receives ``(kind, x0, y0, width, height)`` in
    pixels. All random numbers come from ``rng``."""
    if kinds is not None and not set(kinds) <= set(PROXY_KINDS):
        raise ValueError(f"unknown proxy kinds {sorted(set(kinds) - set(PROXY_KINDS))}")

    def hook(street, cv) -> None:
        n = count if count is not None else int(rng.integers(1, 4))
        h, w = cv.h, cv.w
        for k in range(n):
            kind = kinds[k % len(kinds)] if kinds is not None else \
                PROXY_KINDS[int(rng.integers(len(PROXY_KINDS)))]
            bh = h * float(np.exp(rng.uniform(np.log(0.08), np.log(0.4))))
            bw = min(bh * _PROXY_ASPECT[kind] * rng.uniform(0.85, 1.15), 0.9 * w)
            x0, y0 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            flat = _Flat(street, cv, channel, x0, y0, bw, bh, bool(rng.random() < 0.5))
            if placed is not None:
                placed.append((kind, float(x0), float(y0), float(bw), float(bh)))
            if cv.begin(channel, x0, x0 + bw, y0, y0 + bh):
                _draw_proxy(kind, flat, rng)
                cv.end()

    return hook
