"""Training-harness data: Cityscapes/ACDC loaders on fabricated trees, augmentation, synthetic
scenes and the resumable sampler."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

try:
    from PIL import Image
except ImportError:  # the file-based tests need pillow; the others do not
    Image = None
needs_pillow = pytest.mark.skipif(Image is None, reason="needs pillow")

from train.data import (  # noqa: E402
    IGNORE_INDEX,
    LABEL_ID_TO_TRAIN_ID,
    DatasetError,
    ResumableDistributedSampler,
    SyntheticScenes,
    Transform,
    build_dataset,
)

EVAL = Transform(train=False)


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _scene(h: int = 20, w: int = 36, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    ids = rng.choice(np.array([0, 1, 7, 8, 11, 21, 26, 33, 255], dtype=np.uint8), (h, w))
    return image, ids


def _cityscapes(root: Path, kind: str) -> dict[str, np.ndarray]:
    """Two cities; labels as labelIds (kind='ids') or labelTrainIds (kind='train')."""
    expected = {}
    for i, (city, name) in enumerate([("aachen", "aachen_000000_000019"),
                                      ("bochum", "bochum_000000_000313")]):
        image, ids = _scene(seed=i)
        _png(root / "leftImg8bit" / "val" / city / f"{name}_leftImg8bit.png", image)
        train = LABEL_ID_TO_TRAIN_ID[ids]
        if kind == "ids":
            _png(root / "gtFine" / "val" / city / f"{name}_gtFine_labelIds.png", ids)
        else:
            _png(root / "gtFine" / "val" / city / f"{name}_gtFine_labelTrainIds.png", train)
            # a labelIds file next to it must not be used
            _png(root / "gtFine" / "val" / city / f"{name}_gtFine_labelIds.png", ids * 0)
        _png(root / "gtFine" / "val" / city / f"{name}_gtFine_color.png", image)
        expected[name] = (image, train)
    return expected


def test_label_id_mapping_is_the_standard_cityscapes_one():
    ids = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]
    assert LABEL_ID_TO_TRAIN_ID[ids].tolist() == list(range(19))
    others = sorted(set(range(256)) - set(ids))
    assert (LABEL_ID_TO_TRAIN_ID[others] == IGNORE_INDEX).all()


@needs_pillow
@pytest.mark.parametrize("kind", ["ids", "train"])
def test_cityscapes_layout(tmp_path, kind):
    expected = _cityscapes(tmp_path, kind)
    ds = build_dataset("cityscapes", "val", EVAL, root=str(tmp_path))
    assert len(ds) == 2
    for i, name in enumerate(sorted(expected)):
        image, label = ds[i]
        exp_image, exp_label = expected[name]
        # evaluation pads bottom/right to a multiple of 16 (image 0, label 255)
        assert image.shape == (3, 32, 48) and label.shape == (32, 48)
        torch.testing.assert_close(image[:, :20, :36],
                                   torch.from_numpy(exp_image).permute(2, 0, 1).float() / 255)
        assert (image[:, 20:] == 0).all() and (image[:, :, 36:] == 0).all()
        assert torch.equal(label[:20, :36], torch.from_numpy(exp_label).long())
        assert (label[20:] == IGNORE_INDEX).all() and (label[:, 36:] == IGNORE_INDEX).all()


@needs_pillow
@pytest.mark.parametrize("layout", ["official-zips", "flat"])
def test_acdc_layouts(tmp_path, layout):
    if layout == "official-zips":
        images = tmp_path / "rgb_anon_trainvaltest" / "rgb_anon"
        labels = tmp_path / "gt_trainval" / "gt"
    else:
        images, labels = tmp_path / "rgb_anon", tmp_path / "gt"
    expected = []
    for i, condition in enumerate(["fog", "night", "rain", "snow"]):
        image, ids = _scene(16, 16, seed=10 + i)
        name = f"GOPR04{i}_frame_000{i}"
        _png(images / condition / "val" / f"GOPR04{i}" / f"{name}_rgb_anon.png", image)
        # reference images and the test split must be ignored
        _png(images / condition / "val_ref" / f"GOPR04{i}" / f"{name}_ref_rgb_anon.png", image)
        if i % 2:
            _png(labels / condition / "val" / f"GOPR04{i}" / f"{name}_gt_labelIds.png", ids)
        else:
            _png(labels / condition / "val" / f"GOPR04{i}" / f"{name}_gt_labelTrainIds.png",
                 LABEL_ID_TO_TRAIN_ID[ids])
        expected.append(LABEL_ID_TO_TRAIN_ID[ids])
    ds = build_dataset("acdc", "val", EVAL, root=str(tmp_path))
    assert len(ds) == 4
    for i in range(4):
        assert torch.equal(ds[i][1], torch.from_numpy(expected[i]).long())
    night = build_dataset("acdc", "val", EVAL, root=str(tmp_path), conditions=["night"])
    assert len(night) == 1 and torch.equal(night[0][1], torch.from_numpy(expected[1]).long())


def test_missing_dataset_names_path_and_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"leftImg8bit.*<city>") as info:
        build_dataset("cityscapes", "train", EVAL, root=str(tmp_path))
    assert str(tmp_path / "leftImg8bit" / "train") in str(info.value)
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="rgb_anon_trainvaltest") as info:
        build_dataset("acdc", "val", EVAL, root=str(missing))
    assert str(missing) in str(info.value)
    (tmp_path / "rgb_anon" / "fog" / "val").mkdir(parents=True)
    (tmp_path / "gt").mkdir()
    with pytest.raises(FileNotFoundError) as info:
        build_dataset("acdc", "val", EVAL, root=str(tmp_path), conditions=["fog"])
    assert str(tmp_path / "gt" / "fog" / "val") in str(info.value)


@needs_pillow
def test_missing_label_and_empty_split_are_errors(tmp_path):
    image, _ = _scene()
    _png(tmp_path / "leftImg8bit" / "val" / "ulm" / "ulm_000000_000019_leftImg8bit.png", image)
    (tmp_path / "gtFine" / "val" / "ulm").mkdir(parents=True)
    with pytest.raises(DatasetError, match=re.escape("ulm_000000_000019_gtFine_labelTrainIds.png")):
        build_dataset("cityscapes", "val", EVAL, root=str(tmp_path))
    (tmp_path / "leftImg8bit" / "train" / "ulm").mkdir(parents=True)
    (tmp_path / "gtFine" / "train").mkdir(parents=True)
    with pytest.raises(DatasetError, match=re.escape("no *_leftImg8bit.png images")):
        build_dataset("cityscapes", "train", EVAL, root=str(tmp_path))


@needs_pillow
def test_corrupt_png_names_the_file(tmp_path):
    _cityscapes(tmp_path, "ids")
    bad = tmp_path / "leftImg8bit" / "val" / "aachen" / "aachen_000000_000019_leftImg8bit.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated
    ds = build_dataset("cityscapes", "val", EVAL, root=str(tmp_path))
    with pytest.raises(DatasetError, match=re.escape("aachen_000000_000019_leftImg8bit.png")):
        ds[0]
    label = tmp_path / "gtFine" / "val" / "bochum" / "bochum_000000_000313_gtFine_labelIds.png"
    label.write_bytes(b"not a png at all")
    with pytest.raises(DatasetError, match=re.escape("bochum_000000_000313_gtFine_labelIds.png")):
        ds[1]


@needs_pillow
def test_size_mismatch_names_both_files(tmp_path):
    _cityscapes(tmp_path, "train")
    label = tmp_path / "gtFine" / "val" / "aachen" / "aachen_000000_000019_gtFine_labelTrainIds.png"
    _png(label, np.zeros((8, 8), dtype=np.uint8))
    ds = build_dataset("cityscapes", "val", EVAL, root=str(tmp_path))
    with pytest.raises(DatasetError, match=r"aachen_000000_000019_leftImg8bit\.png.*labelTrainIds"):
        ds[0]


def test_training_augmentation_shapes_padding_and_determinism():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    label = rng.integers(0, 5, (40, 60), dtype=np.uint8)
    tf = Transform(train=True, crop=64)
    seen_pad = False
    for seed in range(20):
        img, lab = tf(image, label, np.random.default_rng(seed))
        assert img.shape == (3, 64, 64) and lab.shape == (64, 64) and lab.dtype == torch.int64
        padded = lab == IGNORE_INDEX
        if padded.any():
            seen_pad = True
            assert (img[:, padded] == 0).all()  # image padded with 0 (no normalisation)
        assert set(lab.unique().tolist()) <= {0, 1, 2, 3, 4, IGNORE_INDEX}
        img2, lab2 = tf(image, label, np.random.default_rng(seed))
        assert torch.equal(img, img2) and torch.equal(lab, lab2)
    assert seen_pad  # 40×60 scaled by <= 2 often stays below 64
    norm = Transform(train=True, crop=64, normalize=True)
    img, lab = norm(image, label, np.random.default_rng(1))
    assert img[:, lab == IGNORE_INDEX].abs().max() < 1e-6 if (lab == IGNORE_INDEX).any() else True


def test_training_augmentation_does_not_depend_on_the_thread_count():
    # A loader worker runs one thread, the main process several: the same sample must come out.
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (128, 256, 3), dtype=np.uint8)
    label = rng.integers(0, 5, (128, 256), dtype=np.uint8)
    tf = Transform(train=True, crop=96, normalize=True)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 4):
            torch.set_num_threads(n)
            outs.append([tf(image, label, np.random.default_rng(seed)) for seed in range(8)])
            assert torch.get_num_threads() == n  # restored after the one-thread resize
    finally:
        torch.set_num_threads(threads)
    for other in outs[1:]:
        for (img, lab), (img2, lab2) in zip(outs[0], other, strict=True):
            assert torch.equal(img, img2) and torch.equal(lab, lab2)


def test_synthetic_scenes_are_deterministic_and_labelled():
    tf = Transform(train=True, crop=48)
    a = SyntheticScenes(8, tf, seed=3, size=64)
    b = SyntheticScenes(8, tf, seed=3, size=64)
    c = SyntheticScenes(8, tf, seed=4, size=64)
    x1, y1 = a[(5, 2)]
    x2, y2 = b[(5, 2)]
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(a[(5, 3)][0], x1)  # another epoch, another augmentation
    assert not torch.equal(c[(5, 2)][0], x1)
    ev = SyntheticScenes(16, EVAL, seed=0, split="val", size=64)
    labels = torch.stack([ev[i][1] for i in range(16)])
    present = set(labels.unique().tolist())
    assert set(range(SyntheticScenes.num_classes)) <= present
    assert present <= set(range(SyntheticScenes.num_classes)) | {IGNORE_INDEX}


def test_resumable_sampler_skips_to_position():
    data = list(range(23))
    full = ResumableDistributedSampler(data, num_replicas=2, rank=1, seed=5)
    full.set_epoch(3)
    keys = list(full)
    assert all(epoch == 3 for _, epoch in keys) and len(keys) == len(full) == 12
    part = ResumableDistributedSampler(data, num_replicas=2, rank=1, seed=5)
    part.set_epoch(3, start=4)
    assert list(part) == keys[4:] and len(part) == 8
    other = ResumableDistributedSampler(data, num_replicas=2, rank=0, seed=5)
    other.set_epoch(3)
    assert {i for i, _ in other} | {i for i, _ in keys} == set(range(23))


def test_shapes_keep_their_old_name_and_preset():
    from train.config import parse_args

    a = build_dataset("synthetic", "val", EVAL, seed=2, synthetic_length=3, synthetic_size=32)
    b = build_dataset("shapes", "val", EVAL, seed=2, synthetic_length=3, synthetic_size=32)
    assert all(torch.equal(a[i][1], b[i][1]) for i in range(3))
    # without a scene seed the scenes follow the seed, as before; with one they do not
    c = build_dataset("shapes", "val", EVAL, seed=5, scene_seed=2, synthetic_length=3,
                      synthetic_size=32)
    assert torch.equal(c[1][0], a[1][0])
    args = parse_args(["--preset", "cpu-shapes"])
    assert (args.dataset, args.iterations, args.synthetic_train_size) == ("shapes", 400, 2048)
    assert parse_args(["--dataset", "synthetic"]).dataset == "shapes"
    default = parse_args([])
    assert (default.preset, default.dataset, default.scene_seed, default.label_noise) == (
        "cpu-small", "street", 0, 0.0)
