"""Datasets (Cityscapes, ACDC, synthetic street scenes and shapes), the paper's augmentation and a
resumable sampler.

Every dataset yields ``(image, label)``: a (3, H, W) float32 image in [0, 1] (or normalised with
ImageNet statistics) and an (H, W) int64 label map with the train ids 0..C-1 and 255 = ignore
(street training images with OoD proxies: also ``OOD_LABEL`` = 254 on the proxies; the street
anomaly track, split "anomaly": 1 = anomaly, 0 = known, 255 = void).

Training samples are addressed by ``(index, epoch)``: the augmentation draws its random numbers
from a generator seeded with ``(seed, epoch, index)``, so a sample is the same whichever process,
worker or resumed run loads it. Evaluation samples are addressed by ``index`` and are only padded
(bottom/right) to a multiple of the model's output stride.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler

from train.anomalies import (
    ANOMALY_KINDS,
    OOD_LABEL,
    PROXY_KINDS,
    anomaly_mask,
    proxy_overlay,
    render_anomaly_scene,
)
from train.street import CITYSCAPES_PIXEL_SHARES, STREET_CLASSES, render_street_scene

__all__ = [
    "ACDC_CONDITIONS",
    "ACDC_LAYOUT",
    "ANOMALY_KINDS",
    "CITYSCAPES_CLASSES",
    "CITYSCAPES_LAYOUT",
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LABEL_ID_TO_TRAIN_ID",
    "OOD_LABEL",
    "PROXY_KINDS",
    "STREET_CLASSES",
    "SYNTHETIC_CLASSES",
    "SYNTHETIC_DATASETS",
    "DatasetError",
    "FileSegmentationDataset",
    "ResumableDistributedSampler",
    "StreetAnomalies",
    "StreetScenes",
    "SyntheticScenes",
    "Transform",
    "acdc_items",
    "build_dataset",
    "cityscapes_items",
    "dataset_classes",
    "read_image",
    "read_label",
]

IGNORE_INDEX = 255
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)
#: Cityscapes label ids of the 19 evaluated classes, in train-id order (ACDC uses the same ids).
_EVAL_LABEL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
#: Lookup table label id (0..255) -> train id (0..18) or 255.
LABEL_ID_TO_TRAIN_ID = np.full(256, IGNORE_INDEX, dtype=np.uint8)
LABEL_ID_TO_TRAIN_ID[list(_EVAL_LABEL_IDS)] = np.arange(len(_EVAL_LABEL_IDS), dtype=np.uint8)
assert STREET_CLASSES == CITYSCAPES_CLASSES  # the street scenes use Cityscapes' train ids

ACDC_CONDITIONS = ("fog", "night", "rain", "snow")

CITYSCAPES_LAYOUT = (
    "<root>/leftImg8bit/<split>/<city>/<name>_leftImg8bit.png and "
    "<root>/gtFine/<split>/<city>/<name>_gtFine_labelTrainIds.png "
    "(or <name>_gtFine_labelIds.png)"
)
ACDC_LAYOUT = (
    "<root>/rgb_anon_trainvaltest/rgb_anon/<condition>/<split>/<sequence>/<name>_rgb_anon.png "
    "with <root>/gt_trainval/gt/<condition>/<split>/<sequence>/<name>_gt_labelTrainIds.png "
    "(or _gt_labelIds.png), as unpacked from the official zips; or the same below "
    "<root>/rgb_anon/ and <root>/gt/"
)


class DatasetError(RuntimeError):
    """A dataset on disk is malformed (wrong layout, missing label, unreadable file)."""


# --------------------------------------------------------------------------------------------
# Files


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """An RGB image as an (H, W, 3) uint8 array; ``DatasetError`` naming the file if unreadable."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    except Exception as exc:
        raise DatasetError(f"cannot read image file {path}: {exc}") from exc


def read_label(path: str | os.PathLike[str]) -> np.ndarray:
    """A single-channel label image as an (H, W) uint8 array (ids 0..255)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            if img.mode in ("I", "I;16", "I;16B", "F"):
                arr = np.asarray(img)
                if arr.min() < 0 or arr.max() > 255:
                    raise ValueError(f"label values outside 0..255 in mode {img.mode}")
                return arr.astype(np.uint8)
            if img.mode not in ("L", "P"):
                raise ValueError(f"expected a single-channel label image, got mode {img.mode}")
            return np.asarray(img, dtype=np.uint8).copy()
    except Exception as exc:
        raise DatasetError(f"cannot read label file {path}: {exc}") from exc


def _require_dir(path: Path, what: str, layout: str) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"{what}: directory {path} not found; expected the layout {layout}")


def cityscapes_items(root: str | os.PathLike[str], split: str) -> list[tuple[str, str, bool]]:
    """``(image, label, label_is_train_ids)`` for every image of a Cityscapes split.

    ``*_gtFine_labelTrainIds.png`` is used when present, else ``*_gtFine_labelIds.png`` (mapped to
    the 19 train ids, everything else to 255).
    """
    root = Path(root)
    images, labels = root / "leftImg8bit" / split, root / "gtFine" / split
    _require_dir(root, "Cityscapes root", CITYSCAPES_LAYOUT)
    _require_dir(images, f"Cityscapes {split} images", CITYSCAPES_LAYOUT)
    _require_dir(labels, f"Cityscapes {split} labels", CITYSCAPES_LAYOUT)
    items = []
    for city in sorted(p.name for p in images.iterdir() if p.is_dir()):
        for image in sorted(glob.glob(str(images / city / "*_leftImg8bit.png"))):
            stem = os.path.basename(image)[: -len("_leftImg8bit.png")]
            items.append((image, *_label_for(labels / city, stem, "gtFine", image,
                                             CITYSCAPES_LAYOUT)))
    if not items:
        raise DatasetError(
            f"no *_leftImg8bit.png images under {images}/<city>/; expected the layout "
            f"{CITYSCAPES_LAYOUT}"
        )
    return items


def _label_for(directory: Path, stem: str, tag: str, image: str, layout: str
               ) -> tuple[str, bool]:
    train_ids = directory / f"{stem}_{tag}_labelTrainIds.png"
    if train_ids.is_file():
        return str(train_ids), True
    label_ids = directory / f"{stem}_{tag}_labelIds.png"
    if label_ids.is_file():
        return str(label_ids), False
    raise DatasetError(
        f"no label for {image}: expected {train_ids} or {label_ids} (layout {layout})"
    )


def _acdc_roots(root: Path) -> tuple[Path, Path]:
    image_roots = [root / "rgb_anon_trainvaltest" / "rgb_anon", root / "rgb_anon"]
    label_roots = [root / "gt_trainval" / "gt", root / "gt"]
    _require_dir(root, "ACDC root", ACDC_LAYOUT)
    image_root = next((p for p in image_roots if p.is_dir()), None)
    label_root = next((p for p in label_roots if p.is_dir()), None)
    if image_root is None or label_root is None:
        missing = " or ".join(str(p) for p in (image_roots if image_root is None else label_roots))
        raise FileNotFoundError(
            f"ACDC: neither {missing} is a directory; expected the layout {ACDC_LAYOUT}"
        )
    return image_root, label_root


def acdc_items(root: str | os.PathLike[str], split: str,
               conditions: Sequence[str] = ACDC_CONDITIONS) -> list[tuple[str, str, bool]]:
    """``(image, label, label_is_train_ids)`` for every ACDC image of ``split`` in ``conditions``.

    Both archive layouts are found (see ``ACDC_LAYOUT``); only ``<condition>/<split>`` is read
    (not the ``<split>_ref`` reference images).
    """
    image_root, label_root = _acdc_roots(Path(root))
    items = []
    for condition in conditions:
        if condition not in ACDC_CONDITIONS:
            raise ValueError(f"unknown ACDC condition {condition!r}; expected {ACDC_CONDITIONS}")
        images, labels = image_root / condition / split, label_root / condition / split
        _require_dir(images, f"ACDC {condition}/{split} images", ACDC_LAYOUT)
        _require_dir(labels, f"ACDC {condition}/{split} labels", ACDC_LAYOUT)
        found = 0
        for sequence in sorted(p.name for p in images.iterdir() if p.is_dir()):
            for image in sorted(glob.glob(str(images / sequence / "*_rgb_anon.png"))):
                stem = os.path.basename(image)[: -len("_rgb_anon.png")]
                items.append((image, *_label_for(labels / sequence, stem, "gt", image,
                                                 ACDC_LAYOUT)))
                found += 1
        if not found:
            raise DatasetError(
                f"no *_rgb_anon.png images under {images}/<sequence>/; expected the layout "
                f"{ACDC_LAYOUT}"
            )
    return items


# --------------------------------------------------------------------------------------------
# Transforms


def _resize_bilinear(img: Tensor, size: tuple[int, int]) -> Tensor:
    """(C, H, W) float image resized to ``size``, bilinear, on one thread.

    The CPU kernel's last-bit rounding depends on how many threads split the rows; on one thread
    the augmented image is the same in the main process and in a loader worker (one thread each).
    """
    threads = torch.get_num_threads()
    if threads > 1:
        torch.set_num_threads(1)
    try:
        return F.interpolate(img[None], size=size, mode="bilinear", align_corners=False)[0]
    finally:
        if threads > 1:
            torch.set_num_threads(threads)


@dataclass
class Transform:
    """The paper's training augmentation, or evaluation padding; then optional normalisation.

    Training (official code order): random scale in [scale_min, scale_max] (half the draws below
    1, half above, as the official RandResize), bilinear for the image and nearest for the label;
    centred padding to at least ``crop`` with 255 (label) and 0 (image; the ImageNet mean when
    normalising, i.e. 0 after normalisation); horizontal flip with probability 1/2; random crop
    ``crop``×``crop``. Evaluation: pad bottom/right to a multiple of ``multiple``.
    """

    train: bool
    crop: int = 768
    scale_min: float = 0.5
    scale_max: float = 2.0
    flip: bool = True
    normalize: bool = False
    multiple: int = 16

    def __call__(self, image: np.ndarray, label: np.ndarray,
                 rng: np.random.Generator | None = None) -> tuple[Tensor, Tensor]:
        if image.shape[:2] != label.shape:
            raise DatasetError(
                f"image {image.shape[:2]} and label {label.shape} sizes differ"
            )
        img = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
        lab = torch.from_numpy(np.ascontiguousarray(label)).long()
        pad_value = torch.tensor(IMAGENET_MEAN if self.normalize else (0.0, 0.0, 0.0))
        if self.train:
            if rng is None:
                raise ValueError("the training transform needs a random generator")
            img, lab = self._augment(img, lab, rng, pad_value)
        else:
            h, w = lab.shape
            m = self.multiple
            img, lab = _pad(img, lab, 0, (-h) % m, 0, (-w) % m, pad_value)
        if self.normalize:
            mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
            std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
            img = (img - mean) / std
        return img.contiguous(), lab.contiguous()

    def _augment(self, img: Tensor, lab: Tensor, rng: np.random.Generator, pad_value: Tensor
                 ) -> tuple[Tensor, Tensor]:
        if rng.random() < 0.5:
            scale = self.scale_min + (1.0 - self.scale_min) * rng.random()
        else:
            scale = 1.0 + (self.scale_max - 1.0) * rng.random()
        h, w = lab.shape
        nh, nw = max(1, int(h * scale)), max(1, int(w * scale))
        img = _resize_bilinear(img, (nh, nw))
        lab = F.interpolate(lab[None, None].float(), size=(nh, nw), mode="nearest")[0, 0].long()
        ph, pw = max(self.crop - nh, 0), max(self.crop - nw, 0)
        if ph or pw:
            img, lab = _pad(img, lab, ph // 2, ph - ph // 2, pw // 2, pw - pw // 2, pad_value)
        if self.flip and rng.random() < 0.5:
            img, lab = img.flip(-1), lab.flip(-1)
        h, w = lab.shape
        top = int(rng.integers(0, h - self.crop + 1))
        left = int(rng.integers(0, w - self.crop + 1))
        return (img[:, top:top + self.crop, left:left + self.crop],
                lab[top:top + self.crop, left:left + self.crop])


def _pad(img: Tensor, lab: Tensor, top: int, bottom: int, left: int, right: int,
         pad_value: Tensor) -> tuple[Tensor, Tensor]:
    if not (top or bottom or left or right):
        return img, lab
    h, w = lab.shape
    out = pad_value.view(3, 1, 1).expand(3, h + top + bottom, w + left + right).clone()
    out[:, top:top + h, left:left + w] = img
    lab = F.pad(lab, (left, right, top, bottom), value=IGNORE_INDEX)
    return out, lab


# --------------------------------------------------------------------------------------------
# Datasets


class _KeyedDataset(Dataset):
    """Dataset addressed by ``index`` (evaluation) or ``(index, epoch)`` (augmented training)."""

    def __init__(self, transform: Transform, seed: int) -> None:
        self.transform = transform
        self.seed = seed

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, Tensor]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        image, label = self.load(index)
        rng = np.random.default_rng([self.seed, epoch, index, 0xA06]) if self.transform.train \
            else None
        return self.transform(image, label, rng)


class FileSegmentationDataset(_KeyedDataset):
    """Cityscapes or ACDC from ``items`` = ``[(image, label, label_is_train_ids), ...]``."""

    def __init__(self, items: list[tuple[str, str, bool]], transform: Transform, seed: int = 0,
                 num_classes: int = 19) -> None:
        super().__init__(transform, seed)
        self.items = items
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image_path, label_path, train_ids = self.items[index]
        image, label = read_image(image_path), read_label(label_path)
        if image.shape[:2] != label.shape:
            raise DatasetError(
                f"image {image_path} is {image.shape[1]}×{image.shape[0]} but its label "
                f"{label_path} is {label.shape[1]}×{label.shape[0]}"
            )
        if train_ids:
            label = np.where(label < self.num_classes, label, IGNORE_INDEX).astype(np.uint8)
        else:
            label = LABEL_ID_TO_TRAIN_ID[label]
        return image, label


#: Split -> split code of the synthetic scenes' generators; "anomaly" is the street scenes'
#: anomaly track (``StreetAnomalies``).
_SPLIT_CODES = {"train": 1, "val": 2, "test": 3, "anomaly": 4}


class _SyntheticDataset(_KeyedDataset):
    """Procedural scenes generated on the fly: ``length`` images per split, each deterministic
    per ``(scene_seed, split, index)``; ``seed`` drives the training augmentation only.

    ``scene_seed`` defaults to ``seed``. The harness fixes it (``--scene-seed``, default 0) so
    that runs with different ``--seed`` train and evaluate on the same scenes, as on a real
    dataset, and differ only in initialisation, data order, augmentation and dropout.
    """

    def __init__(self, length: int, transform: Transform, seed: int = 0, split: str = "train",
                 size: int = 128, scene_seed: int | None = None) -> None:
        super().__init__(transform, seed)
        self.length = length
        self.size = size
        self.split = split
        self.split_code = _SPLIT_CODES[split]
        self.scene_seed = seed if scene_seed is None else scene_seed

    def __len__(self) -> int:
        return self.length

    def scene_rng(self, index: int, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.scene_seed, self.split_code, index, stream])


SYNTHETIC_CLASSES = ("sky", "ground", "red-stripes", "red-checker", "green", "blue", "yellow")
# Base colours; classes 2 and 3 share a colour and differ only by texture, class 5 shares its hue
# with the smooth sky but is striped.
_SYN_COLOURS = np.array([
    (0.45, 0.65, 0.92), (0.50, 0.48, 0.45), (0.80, 0.20, 0.20), (0.80, 0.20, 0.20),
    (0.20, 0.65, 0.30), (0.25, 0.35, 0.85), (0.90, 0.80, 0.20),
], dtype=np.float32)


class SyntheticScenes(_SyntheticDataset):
    """Procedural scenes whose classes are decidable from colour and texture, plus ambiguity
    (the ``shapes`` dataset).

    Each image (deterministic per ``(scene_seed, split, index)``) has a sky/ground background
    with a wavy horizon, 3-6 textured objects (rectangles, ellipses, triangles) of the object
    classes with soft edges of random width, whose boundary pixels take the object's label with
    a probability equal to its opacity (so the labels of blended boundaries are genuinely
    random); 0-2 *ambiguous patches* whose appearance is an even blend of two object classes and
    whose label is one of the two at random; and sometimes a dark void blob labelled 255. Classes
    ``red-stripes`` and ``red-checker`` share their colour and differ only in texture. Global
    brightness jitter and pixel noise on top. The random labels make part of the targets pure
    label noise; see :class:`StreetScenes` for scenes without it.
    """

    num_classes = len(SYNTHETIC_CLASSES)
    classes = SYNTHETIC_CLASSES

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return render_scene(self.scene_rng(index, 0x5CE), self.size)


class StreetScenes(_SyntheticDataset):
    """Street-scene-like procedural images with Cityscapes' 19 classes and long-tailed pixel
    shares (the ``street`` dataset; see :mod:`train.street` for the scene model).

    Images are ``size`` × ``2·size`` (Cityscapes' 1:2 aspect). ``label_noise`` (default 0)
    relabels each object of a *training* image with that probability as another class, drawn
    from a generator of its own (images are unchanged); validation labels stay clean so that
    the metrics measure the scenes themselves.

    ``ood_proxies`` (default 0) pastes OoD proxy objects (``train.anomalies.PROXY_KINDS``:
    furniture, bags, umbrellas, balls, ...) into that share of the *training* images, labelled
    ``OOD_LABEL`` (254), for entropy maximisation: whether an image gets them (1-3 cut-outs at
    random positions and sizes, painted over everything before the brightness jitter and pixel
    noise) is drawn from a generator stream of its own, as are the cut-outs, so the images
    without proxies, and the rest of those with them, are exactly the scenes without the
    option; raising the share only adds images with proxies.
    """

    num_classes = len(STREET_CLASSES)
    classes = STREET_CLASSES
    #: Cityscapes' percent of all pixels per class (the profile the generator follows).
    pixel_shares = CITYSCAPES_PIXEL_SHARES

    def __init__(self, length: int, transform: Transform, seed: int = 0, split: str = "train",
                 size: int = 128, scene_seed: int | None = None, label_noise: float = 0.0,
                 ood_proxies: float = 0.0) -> None:
        if split not in ("train", "val", "test"):
            raise ValueError(f"unknown split {split!r} of StreetScenes (the anomaly track is "
                             "StreetAnomalies)")
        super().__init__(length, transform, seed, split, size, scene_seed)
        if not 0.0 <= label_noise <= 1.0:
            raise ValueError(f"label_noise must be in [0, 1], got {label_noise}")
        if not 0.0 <= ood_proxies <= 1.0:
            raise ValueError(f"ood_proxies must be in [0, 1], got {ood_proxies}")
        self.label_noise = label_noise if split == "train" else 0.0
        self.ood_proxies = ood_proxies if split == "train" else 0.0

    def has_proxies(self, index: int) -> bool:
        """Whether image ``index`` gets OoD proxies (the first draw of its proxy stream)."""
        return self.ood_proxies > 0 and self.scene_rng(index, 0x0D0).random() < self.ood_proxies

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        noise = self.scene_rng(index, 0x401) if self.label_noise > 0 else None
        if self.ood_proxies > 0:
            proxies = self.scene_rng(index, 0x0D0)
            if proxies.random() < self.ood_proxies:
                return render_street_scene(self.scene_rng(index, 0x57E), self.size,
                                           self.label_noise, noise,
                                           overlay=proxy_overlay(proxies),
                                           extra_labels=(OOD_LABEL,))
        return render_street_scene(self.scene_rng(index, 0x57E), self.size, self.label_noise,
                                   noise)


class StreetAnomalies(_SyntheticDataset):
    """The street scenes' anomaly track (split "anomaly", code 4; evaluation only): street
    scenes with 1-3 objects of kinds no training image has (``ANOMALY_KINDS``: animals, lost
    cargo, debris) on the road or sidewalk, as RoadAnomaly21 / RoadObstacle21 (see
    :mod:`train.anomalies`). Labels are the benchmarks' masks: 1 = anomaly, 0 = known class,
    255 = void. Deterministic per ``(scene_seed, index)``: the scene from the usual generator
    (its own split code), the objects from a stream of their own; every image shows at least
    ``train.anomalies.min_anomaly_pixels(size)`` anomaly pixels.
    """

    num_classes = 2
    classes = ("known", "anomaly")
    #: The classes the segmentation model is trained on (the scenes' known classes).
    known_classes = STREET_CLASSES

    def __init__(self, length: int, transform: Transform, seed: int = 0, size: int = 128,
                 scene_seed: int | None = None) -> None:
        super().__init__(length, transform, seed, "anomaly", size, scene_seed)
        if transform.train:
            raise ValueError("the anomaly track is for evaluation only")

    def load_scene(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(image, 19-class label map with ``OOD_LABEL`` on the anomaly pixels)."""
        image, label, _ = render_anomaly_scene(self.scene_rng(index, 0x57E),
                                               self.scene_rng(index, 0xA40), self.size)
        return image, label

    def load_base(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The same scene without its anomaly objects (image, 19-class label map)."""
        return render_street_scene(self.scene_rng(index, 0x57E), self.size)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image, label = self.load_scene(index)
        return image, anomaly_mask(label)


def _texture(cls: int, yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) appearance of class ``cls`` with a random phase/orientation/shade."""
    colour = _SYN_COLOURS[cls] * rng.uniform(0.85, 1.15)
    h = yy.shape[0]
    if cls == 0:  # sky: smooth vertical gradient
        mod = 0.85 + 0.3 * (yy / h)
    elif cls == 1:  # ground: fine noise
        mod = 1.0 + 0.25 * rng.standard_normal(yy.shape).astype(np.float32)
    elif cls == 2:  # horizontal stripes
        period = rng.uniform(5, 7)
        mod = 1.0 + 0.35 * np.sin(2 * np.pi * yy / period + rng.uniform(0, 2 * np.pi))
    elif cls == 3:  # checkerboard
        period = rng.uniform(7, 9)
        phase_y, phase_x = rng.uniform(0, period, 2)
        checker = (np.floor((yy + phase_y) / period) + np.floor((xx + phase_x) / period)) % 2
        mod = 0.7 + 0.6 * checker
    elif cls == 4:  # diagonal stripes
        period = rng.uniform(6, 9)
        mod = 1.0 + 0.3 * np.sin(2 * np.pi * (yy + xx) / period + rng.uniform(0, 2 * np.pi))
    elif cls == 5:  # vertical stripes
        period = rng.uniform(4, 6)
        mod = 1.0 + 0.35 * np.sin(2 * np.pi * xx / period + rng.uniform(0, 2 * np.pi))
    else:  # dots
        period = rng.uniform(7, 10)
        py, px = rng.uniform(0, period, 2)
        dy = ((yy + py) % period) - period / 2
        dx = ((xx + px) % period) - period / 2
        mod = np.where(dy * dy + dx * dx < (period / 4) ** 2, 0.6, 1.1)
    return np.clip(colour[None, None, :] * mod[..., None], 0.0, 1.0).astype(np.float32)


def _shape_distance(kind: int, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float,
                    rx: float, angle: float) -> np.ndarray:
    """Signed distance-like field: positive inside the shape (in pixels, approximately)."""
    cos, sin = np.cos(angle), np.sin(angle)
    y, x = yy - cy, xx - cx
    u, v = cos * x + sin * y, -sin * x + cos * y
    if kind == 0:  # rectangle
        return np.minimum(rx - np.abs(u), ry - np.abs(v))
    if kind == 1:  # ellipse
        r = np.sqrt((u / rx) ** 2 + (v / ry) ** 2)
        return (1.0 - r) * min(rx, ry)
    # triangle: the intersection of three half-planes, distance to the nearest edge
    verts = ((0.0, -ry), (-rx, ry), (rx, ry))
    dist = np.full(yy.shape, np.inf, dtype=np.float32)
    for (pu, pv), (qu, qv) in zip(verts, verts[1:] + verts[:1], strict=True):
        nu, nv = -(qv - pv), qu - pu
        norm = np.hypot(nu, nv)
        inward = np.sign((0.0 - pu) * nu + (ry / 3 - pv) * nv)
        dist = np.minimum(dist, inward * ((u - pu) * nu + (v - pv) * nv) / norm)
    return dist


def render_scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic scene: (size, size, 3) uint8 image and (size, size) uint8 label."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    # background: sky above a wavy horizon, ground below
    horizon = size * rng.uniform(0.3, 0.6) + size * rng.uniform(0.02, 0.08) * np.sin(
        2 * np.pi * xx / (size * rng.uniform(0.5, 1.5)) + rng.uniform(0, 2 * np.pi))
    sky = yy < horizon
    image = np.where(sky[..., None], _texture(0, yy, xx, rng), _texture(1, yy, xx, rng))
    label = np.where(sky, 0, 1).astype(np.uint8)

    def place() -> tuple[np.ndarray, float]:
        kind = int(rng.integers(0, 3))
        cy, cx = rng.uniform(0.1, 0.9, 2) * size
        ry, rx = rng.uniform(0.08, 0.22, 2) * size
        dist = _shape_distance(kind, yy, xx, cy, cx, ry, rx, rng.uniform(0, np.pi))
        softness = rng.uniform(0.2, 1.5)
        alpha = 1.0 / (1.0 + np.exp(-np.clip(dist / softness, -30, 30)))
        return alpha.astype(np.float32), softness

    for _ in range(int(rng.integers(3, 7))):
        cls = int(rng.integers(2, len(SYNTHETIC_CLASSES)))
        alpha, _ = place()
        image = alpha[..., None] * _texture(cls, yy, xx, rng) + (1 - alpha[..., None]) * image
        take = rng.random(alpha.shape) < alpha  # boundary labels are random with p = opacity
        label = np.where(take, cls, label).astype(np.uint8)

    for _ in range(int(rng.integers(0, 3))):  # ambiguous patches
        a, b = rng.choice(np.arange(2, len(SYNTHETIC_CLASSES)), size=2, replace=False)
        alpha, _ = place()
        look = 0.5 * _texture(int(a), yy, xx, rng) + 0.5 * _texture(int(b), yy, xx, rng)
        look += 0.08 * rng.standard_normal(look.shape).astype(np.float32)
        image = alpha[..., None] * look + (1 - alpha[..., None]) * image
        cls = int(a if rng.random() < 0.5 else b)
        label = np.where(rng.random(alpha.shape) < alpha, cls, label).astype(np.uint8)

    if rng.random() < 0.3:  # void blob, ignored
        alpha, _ = place()
        dark = 0.08 + 0.04 * rng.standard_normal((size, size, 3)).astype(np.float32)
        image = alpha[..., None] * dark + (1 - alpha[..., None]) * image
        label = np.where(alpha > 0.5, IGNORE_INDEX, label).astype(np.uint8)

    image = image * rng.uniform(0.8, 1.2) + 0.03 * rng.standard_normal(image.shape)
    image = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return image, label


#: Datasets generated on the fly (no files); "synthetic" is the former name of "shapes".
SYNTHETIC_DATASETS = ("street", "shapes", "synthetic")


def build_dataset(name: str, split: str, transform: Transform, *, root: str | None = None,
                  seed: int = 0, scene_seed: int | None = None,
                  conditions: Sequence[str] = ACDC_CONDITIONS, synthetic_length: int = 1024,
                  synthetic_size: int = 128, label_noise: float = 0.0,
                  ood_proxies: float = 0.0) -> _KeyedDataset:
    """``name`` in {"street", "shapes" (alias "synthetic"), "cityscapes", "acdc"}; ``split`` in
    {"train", "val"}, and "anomaly" for ``street`` (the anomaly track, ``StreetAnomalies``:
    0/1/255 masks). ``scene_seed`` applies to the synthetic datasets, ``label_noise`` and
    ``ood_proxies`` (share of training images with OoD proxies, labelled ``OOD_LABEL``) to
    ``street`` only."""
    if name == "street":
        if split == "anomaly":
            if label_noise or ood_proxies:
                raise ValueError("label_noise and ood_proxies are options of the training "
                                 "scenes, not of the anomaly track")
            return StreetAnomalies(synthetic_length, transform, seed=seed,
                                   size=synthetic_size, scene_seed=scene_seed)
        return StreetScenes(synthetic_length, transform, seed=seed, split=split,
                            size=synthetic_size, scene_seed=scene_seed, label_noise=label_noise,
                            ood_proxies=ood_proxies)
    if label_noise:
        raise ValueError(f"label_noise is an option of the street scenes, not of {name!r}")
    if ood_proxies:
        raise ValueError(f"ood_proxies is an option of the street scenes, not of {name!r}")
    if split == "anomaly":
        raise ValueError(f"the anomaly track is a split of the street scenes, not of {name!r}")
    if name in ("shapes", "synthetic"):
        return SyntheticScenes(synthetic_length, transform, seed=seed, split=split,
                               size=synthetic_size, scene_seed=scene_seed)
    if root is None:
        raise ValueError(f"dataset {name!r} needs --data-root")
    if name == "cityscapes":
        return FileSegmentationDataset(cityscapes_items(root, split), transform, seed)
    if name == "acdc":
        return FileSegmentationDataset(acdc_items(root, split, conditions), transform, seed)
    raise ValueError(f"unknown dataset {name!r}; expected street, shapes, cityscapes or acdc")


def dataset_classes(name: str) -> tuple[str, ...]:
    """Class names of dataset ``name`` (their order is the train-id order)."""
    return SYNTHETIC_CLASSES if name in ("shapes", "synthetic") else CITYSCAPES_CLASSES


# --------------------------------------------------------------------------------------------
# Sampling


class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler`` yielding ``(index, epoch)`` keys, able to start mid-epoch.

    ``set_epoch(epoch, start)`` reshuffles (seed + epoch, as ``DistributedSampler``) and skips the
    first ``start`` samples of this rank's share, so a resumed run continues at the exact sample.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int = 0,
                 shuffle: bool = True) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle,
                         seed=seed, drop_last=False)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self):  # type: ignore[override]
        for i, index in enumerate(super().__iter__()):
            if i >= self.start:
                yield (index, self.epoch)

    def __len__(self) -> int:
        return self.num_samples - self.start
