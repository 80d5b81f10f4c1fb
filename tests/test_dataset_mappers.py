"""Dataset mappers on tiny generated images, checked against hand-built expectations,
pycocotools / panopticapi decoding and round trips."""

import contextlib
import logging

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from panopticapi.utils import id2rgb, rgb2id
from PIL import Image

from mask_former.config import add_mask_former_config
from mask_former.data.dataset_mappers import (
    DATASET_MAPPER_REGISTRY,
    ColorAugSSDTransform,
    DETRPanopticDatasetMapper,
    ImageReadError,
    MaskFormerInstanceDatasetMapper,
    MaskFormerPanopticDatasetMapper,
    MaskFormerSemanticDatasetMapper,
    RandomChoiceAugmentation,
    RandomColorAugSSD,
    build_dataset_mapper,
)

H, W = 48, 64
NUM_CLASSES = 5
IGNORE = 255
MAPPER_NAMES = [
    "mask_former_semantic",
    "mask_former_panoptic",
    "mask_former_instance",
    "detr_panoptic",
]


# --------------------------------------------------------------------------- fixtures / helpers


def make_cfg(mapper="mask_former_semantic", **input_overrides):
    """A config whose training pipeline is the identity on H x W RGB images (no resize, crop,
    color augmentation or flip) unless overridden."""
    cfg = get_cfg()
    add_mask_former_config(cfg)
    cfg.INPUT.DATASET_MAPPER_NAME = mapper
    cfg.INPUT.FORMAT = "RGB"
    cfg.INPUT.MIN_SIZE_TRAIN = (H,)
    cfg.INPUT.MAX_SIZE_TRAIN = 10000
    cfg.INPUT.MIN_SIZE_TEST = H
    cfg.INPUT.MAX_SIZE_TEST = 10000
    cfg.INPUT.RANDOM_FLIP = "none"
    cfg.INPUT.CROP.ENABLED = False
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = NUM_CLASSES
    cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE = IGNORE
    for key, value in input_overrides.items():
        node = cfg.INPUT
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


def random_rgb(seed=0, shape=(H, W)):
    return np.random.default_rng(seed).integers(0, 256, shape + (3,), dtype=np.uint8)


def save(path, array, mode=None):
    Image.fromarray(array, mode=mode).save(path)
    return str(path)


def semantic_label():
    """Classes 0, 2, 4 in blocks, an ignore band and a single ignored pixel."""
    label = np.zeros((H, W), dtype=np.uint8)
    label[:, 20:40] = 2
    label[30:, 10:50] = 4
    label[10:14, :] = IGNORE
    label[0, 0] = IGNORE
    return label


@pytest.fixture
def semantic_sample(tmp_path):
    image = random_rgb(1)
    label = semantic_label()
    record = {
        "file_name": save(tmp_path / "img.png", image),
        "sem_seg_file_name": save(tmp_path / "sem.png", label),
        "height": H,
        "width": W,
        "image_id": "img",
    }
    return record, image, label


def panoptic_ids():
    """Segment-id map: ids chosen to need all three RGB bytes; 0 is void."""
    ids = np.zeros((H, W), dtype=np.int64)
    ids[:, :20] = 5
    ids[:24, 20:44] = 300
    ids[24:, 20:44] = 70000
    ids[:, 44:60] = 123456
    ids[5:9, 2:6] = 999  # crowd
    ids[40:, 60:] = 0  # void (ids[:, 60:] is void too)
    return ids


PANOPTIC_SEGMENTS = [
    {"id": 5, "category_id": 0, "iscrowd": 0, "isthing": 0},
    {"id": 300, "category_id": 3, "iscrowd": 0, "isthing": 1},
    {"id": 70000, "category_id": 3, "iscrowd": 0, "isthing": 1},
    {"id": 123456, "category_id": 1, "iscrowd": 0, "isthing": 0},
    {"id": 999, "category_id": 2, "iscrowd": 1, "isthing": 1},
    {"id": 4242, "category_id": 4, "iscrowd": 0, "isthing": 1},  # listed, absent from the PNG
]


def write_panoptic(tmp_path, ids, segments, image=None, name="pan"):
    image = random_rgb(2) if image is None else image
    return {
        "file_name": save(tmp_path / f"{name}_img.png", image),
        "pan_seg_file_name": save(tmp_path / f"{name}.png", id2rgb(ids).astype(np.uint8)),
        "segments_info": [dict(s) for s in segments],
        "height": ids.shape[0],
        "width": ids.shape[1],
        "image_id": name,
    }, image


def polygon_square(x0, y0, x1, y1):
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def uncompressed_rle(mask):
    """COCO uncompressed RLE by hand: alternating run lengths (starting with zeros) over the
    column-major pixel order."""
    flat = mask.flatten(order="F").astype(np.uint8)
    counts, current, run = [], 0, 0
    for v in flat:
        if v == current:
            run += 1
        else:
            counts.append(run)
            current, run = v, 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def instance_sample(tmp_path):
    """Annotations: two polygons (one with two parts), a compressed RLE, an uncompressed RLE and a
    crowd; returns the record and the masks pycocotools decodes for the non-crowd ones."""
    image = random_rgb(3)
    blob = np.zeros((H, W), dtype=bool)
    blob[20:30, 5:15] = True
    blob[25:28, 15:25] = True
    compressed = mask_util.encode(np.asfortranarray(blob.astype(np.uint8)))
    compressed["counts"] = compressed["counts"].decode("ascii")  # as json stores it
    ring = np.zeros((H, W), dtype=bool)
    ring[35:45, 30:62] = True
    ring[38:42, 34:58] = False
    polygons_a = [polygon_square(2, 2, 20, 15)]
    polygons_b = [polygon_square(30, 3, 40, 12), [45.5, 3.0, 60.0, 3.0, 52.0, 18.5]]
    annotations = [
        {
            "category_id": 1,
            "iscrowd": 0,
            "segmentation": polygons_a,
            "bbox": [2, 2, 18, 13],
            "bbox_mode": 1,
        },
        {
            "category_id": 3,
            "iscrowd": 0,
            "segmentation": polygons_b,
            "bbox": [0, 0, 1, 1],
            "bbox_mode": 1,
        },
        {
            "category_id": 0,
            "iscrowd": 1,
            "segmentation": uncompressed_rle(ring),
            "bbox": [0, 0, 1, 1],
            "bbox_mode": 1,
        },
        {
            "category_id": 4,
            "iscrowd": 0,
            "segmentation": compressed,
            "bbox": [0, 0, 1, 1],
            "bbox_mode": 1,
        },
        {
            "category_id": 2,
            "iscrowd": 0,
            "segmentation": uncompressed_rle(ring),
            "bbox": [0, 0, 1, 1],
            "bbox_mode": 1,
        },
    ]

    def coco_decode(segmentation):
        if isinstance(segmentation, list):
            return mask_util.decode(
                mask_util.merge(mask_util.frPyObjects(segmentation, H, W))
            ).astype(bool)
        if isinstance(segmentation["counts"], list):
            segmentation = mask_util.frPyObjects(segmentation, H, W)
        return mask_util.decode(segmentation).astype(bool)

    expected = [
        (a["category_id"], coco_decode(a["segmentation"])) for a in annotations if not a["iscrowd"]
    ]
    assert np.array_equal(
        expected[3][1], ring
    ), "hand-written RLE encoder disagrees with pycocotools"
    record = {
        "file_name": save(tmp_path / "inst.png", image),
        "annotations": annotations,
        "height": H,
        "width": W,
        "image_id": 7,
    }
    return record, image, expected


def masks_of(out):
    return out["instances"].gt_masks.numpy()


def classes_of(out):
    return out["instances"].gt_classes.tolist()


@contextlib.contextmanager
def captured_warnings():
    """Collect warning records of the mappers' logger whatever its propagation settings."""
    records = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record)

    logger = logging.getLogger("mask_former.data.dataset_mappers.base")
    handler = Collect(level=logging.WARNING)
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def upsample2(array):
    """What PIL's nearest resize does for an exact 2x: every pixel becomes a 2 x 2 block."""
    return np.repeat(np.repeat(array, 2, axis=0), 2, axis=1)


# --------------------------------------------------------------------------- registry


def test_registered_names_and_build():
    for name, cls in zip(
        MAPPER_NAMES,
        [
            MaskFormerSemanticDatasetMapper,
            MaskFormerPanopticDatasetMapper,
            MaskFormerInstanceDatasetMapper,
            DETRPanopticDatasetMapper,
        ],
    ):
        assert DATASET_MAPPER_REGISTRY.get(name) is cls
        mapper = build_dataset_mapper(make_cfg(name), is_train=True)
        assert type(mapper) is cls and mapper.is_train
        assert build_dataset_mapper(make_cfg(name), is_train=False).is_train is False


def test_unknown_mapper_name_lists_registered_names():
    with pytest.raises(KeyError) as e:
        build_dataset_mapper(make_cfg("no_such_mapper"), is_train=True)
    message = str(e.value)
    assert "no_such_mapper" in message and "INPUT.DATASET_MAPPER_NAME" in message
    for name in MAPPER_NAMES:
        assert name in message


def test_ignore_label_must_match_dataset_metadata():
    name = "_test_dataset_mappers_ignore_mismatch"
    MetadataCatalog.get(name).set(ignore_label=0)
    try:
        cfg = make_cfg()
        cfg.DATASETS.TRAIN = (name,)
        with pytest.raises(ValueError, match="ignore_label=0"):
            build_dataset_mapper(cfg, is_train=True)
    finally:
        MetadataCatalog.remove(name)


def test_unsupported_image_format():
    with pytest.raises(ValueError, match="YUV-BT.601"):
        build_dataset_mapper(make_cfg(FORMAT="YUV-BT.601"), is_train=True)


# --------------------------------------------------------------------------- semantic


@pytest.mark.parametrize("fmt", ["RGB", "BGR"])
def test_semantic_masks_partition_labelled_pixels(semantic_sample, fmt):
    record, image, label = semantic_sample
    original = {k: v for k, v in record.items()}
    mapper = build_dataset_mapper(make_cfg(FORMAT=fmt), is_train=True)
    out = mapper(record)
    assert record == original, "the mapper must not modify its input dict"

    expected_image = image if fmt == "RGB" else image[:, :, ::-1]
    assert out["image"].dtype == torch.uint8 and out["image"].shape == (3, H, W)
    assert np.array_equal(out["image"].permute(1, 2, 0).numpy(), expected_image)
    assert out["sem_seg"].dtype == torch.int64
    assert np.array_equal(out["sem_seg"].numpy(), label)
    assert (out["height"], out["width"], out["file_name"], out["image_id"]) == (
        H,
        W,
        record["file_name"],
        "img",
    )
    assert "sem_seg_file_name" not in out

    masks = masks_of(out)
    assert out["instances"].gt_classes.dtype == torch.int64 and masks.dtype == bool
    assert out["instances"].image_size == (H, W)
    assert classes_of(out) == [0, 2, 4]
    for c, m in zip([0, 2, 4], masks):
        assert np.array_equal(m, label == c)
    assert masks.sum(0).max() == 1, "masks overlap"
    assert np.array_equal(masks.any(0), label != IGNORE)


def pil_nearest_resize(label, height, width):
    """Nearest-neighbour resize the way PIL does it for uint8 maps (and hence for the image's
    pixel grid), for labels of any dtype: resize an index map, then look the values up."""
    values, index = np.unique(label, return_inverse=True)
    assert values.size <= 256
    index = Image.fromarray(index.reshape(label.shape).astype(np.uint8))
    return values[np.asarray(index.resize((width, height), Image.NEAREST))]


@pytest.mark.parametrize("scale", [2, 1.5])
@pytest.mark.parametrize(
    "dtype,num_classes,ignore", [(np.uint8, NUM_CLASSES, 255), (np.uint16, 1000, 65535)]
)
def test_semantic_resize_is_nearest_and_aligned(tmp_path, dtype, num_classes, ignore, scale):
    label = np.zeros((H, W), dtype=dtype)
    label[:, 33:] = num_classes - 1  # 999 needs 16 bits
    label[5:9, 3:7] = 1
    label[20:23, :] = ignore
    label[:, 3::4] = 2  # one-pixel stripes: where nearest samples matters
    image = random_rgb(4)
    record = {
        "file_name": save(tmp_path / "img.png", image),
        "sem_seg_file_name": save(tmp_path / "sem.png", label),
        "image_id": 0,
    }
    new_h, new_w = int(H * scale), int(W * scale)
    cfg = make_cfg(MIN_SIZE_TRAIN=(new_h,))
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = num_classes
    cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE = ignore
    out = build_dataset_mapper(cfg, is_train=True)(record)

    assert out["image"].shape == (3, new_h, new_w)
    assert (out["height"], out["width"]) == (H, W), "height/width describe the original image"
    expected = pil_nearest_resize(label.astype(np.int64), new_h, new_w)
    if scale == 2:
        assert np.array_equal(expected, upsample2(label.astype(np.int64)))
    assert np.array_equal(out["sem_seg"].numpy(), expected)
    assert classes_of(out) == [0, 1, 2, num_classes - 1]
    for c, m in zip(classes_of(out), masks_of(out)):
        assert np.array_equal(m, expected == c)


def test_semantic_horizontal_flip(semantic_sample):
    record, image, label = semantic_sample
    cfg = make_cfg()
    mapper = MaskFormerSemanticDatasetMapper(
        **{
            **MaskFormerSemanticDatasetMapper.from_config(cfg, True),
            "augmentations": [T.RandomFlip(prob=1.0)],
        }
    )
    out = mapper(record)
    assert np.array_equal(out["image"].permute(1, 2, 0).numpy(), np.fliplr(image))
    assert np.array_equal(out["sem_seg"].numpy(), np.fliplr(label))
    for c, m in zip(classes_of(out), masks_of(out)):
        assert np.array_equal(m, np.fliplr(label == c))


def test_semantic_random_flip_from_config_flips_sometimes(semantic_sample):
    record, image, label = semantic_sample
    mapper = build_dataset_mapper(make_cfg(RANDOM_FLIP="horizontal"), is_train=True)
    np.random.seed(0)
    flipped = []
    for _ in range(20):
        out = mapper(record)
        sem = out["sem_seg"].numpy()
        assert np.array_equal(sem, label) or np.array_equal(sem, np.fliplr(label))
        is_flipped = not np.array_equal(sem, label)
        expected_image = np.fliplr(image) if is_flipped else image
        assert np.array_equal(out["image"].permute(1, 2, 0).numpy(), expected_image)
        flipped.append(is_flipped)
    assert 0 < sum(flipped) < 20


def test_semantic_padding(semantic_sample):
    record, image, label = semantic_sample
    out = build_dataset_mapper(make_cfg(SIZE_DIVISIBILITY=32), is_train=True)(record)
    img = out["image"].permute(1, 2, 0).numpy()
    assert img.shape == (64, 64, 3)
    assert np.array_equal(img[:H], image) and (img[H:] == 128).all()
    sem = out["sem_seg"].numpy()
    assert np.array_equal(sem[:H], label) and (sem[H:] == IGNORE).all()
    masks = masks_of(out)
    assert masks.shape == (3, 64, 64) and out["instances"].image_size == (64, 64)
    assert not masks[:, H:].any()
    assert np.array_equal(masks.any(0), sem != IGNORE)


def crop_test_label():
    """Left half: 4-pixel stripes of classes 0 and 1; right half: class 2 (top rows ignored)."""
    label = np.where((np.arange(W) // 4) % 2 == 0, 0, 1).astype(np.uint8)[None].repeat(H, 0)
    label[:, 32:] = 2
    label[:2, 32:] = IGNORE
    return label


def find_crop(image, crop):
    """Brute force: every (y0, x0) where ``crop`` appears in ``image``."""
    ch, cw = crop.shape[:2]
    return [
        (y, x)
        for y in range(image.shape[0] - ch + 1)
        for x in range(image.shape[1] - cw + 1)
        if np.array_equal(image[y : y + ch, x : x + cw], crop)
    ]


def largest_category_fraction(sem):
    _, counts = np.unique(sem[sem != IGNORE], return_counts=True)
    return counts.max() / counts.sum()


@pytest.mark.parametrize("max_area", [0.75, 1.0])
def test_semantic_crop_category_area_constraint(tmp_path, max_area):
    # a 16 x 16 crop at x0 >= 28 is >= 75% class 2; about 43% of positions are such
    label = crop_test_label()
    image = random_rgb(5)
    record = {
        "file_name": save(tmp_path / "img.png", image),
        "sem_seg_file_name": save(tmp_path / "sem.png", label),
    }
    cfg = make_cfg(**{"CROP.ENABLED": True, "CROP.TYPE": "absolute", "CROP.SIZE": [16, 16]})
    cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA = max_area
    mapper = build_dataset_mapper(cfg, is_train=True)
    np.random.seed(0)
    fractions = []
    for _ in range(20):
        out = mapper(record)
        img, sem = out["image"].permute(1, 2, 0).numpy(), out["sem_seg"].numpy()
        assert img.shape == (16, 16, 3)
        ((y0, x0),) = find_crop(image, img)
        assert np.array_equal(
            sem, label[y0 : y0 + 16, x0 : x0 + 16]
        ), "label cropped elsewhere than image"
        fractions.append(largest_category_fraction(sem))
    if max_area < 1:
        assert max(fractions) < max_area
    else:  # unconstrained crops do violate it: the check above can fail
        assert max(fractions) >= 0.75


def test_semantic_color_aug_leaves_labels_alone(semantic_sample):
    record, image, label = semantic_sample
    np.random.seed(1)
    mapper = build_dataset_mapper(make_cfg(COLOR_AUG_SSD=True), is_train=True)
    changed = 0
    for _ in range(5):
        out = mapper(record)
        assert np.array_equal(out["sem_seg"].numpy(), label)
        changed += not np.array_equal(out["image"].permute(1, 2, 0).numpy(), image)
    assert changed > 0


def test_semantic_invalid_label_value(tmp_path):
    label = semantic_label()
    label[3, 3] = 7  # NUM_CLASSES is 5
    label[4, 4] = 200
    record = {
        "file_name": save(tmp_path / "img.png", random_rgb()),
        "sem_seg_file_name": save(tmp_path / "bad_sem.png", label),
    }
    with pytest.raises(ValueError) as e:
        build_dataset_mapper(make_cfg(), is_train=True)(record)
    assert "bad_sem.png" in str(e.value) and "7, 200" in str(e.value)


def test_semantic_labels_numbered_from_1_get_a_hint(tmp_path):
    label = np.where(semantic_label() == IGNORE, IGNORE, semantic_label() + 1).astype(np.uint8)
    label[label == 3] = 2
    label[0, 1:4] = [1, 3, 4]
    label[0, 4] = NUM_CLASSES  # classes 1..5 for NUM_CLASSES 5
    record = {
        "file_name": save(tmp_path / "img.png", random_rgb()),
        "sem_seg_file_name": save(tmp_path / "from_one.png", label),
    }
    with pytest.raises(ValueError) as e:
        build_dataset_mapper(make_cfg(), is_train=True)(record)
    message = str(e.value)
    assert "from_one.png" in message and "value(s) 5 " in message and "numbered 1..5" in message


def test_semantic_label_size_mismatch(tmp_path):
    record = {
        "file_name": save(tmp_path / "img.png", random_rgb()),
        "sem_seg_file_name": save(tmp_path / "sem.png", np.zeros((H, W - 1), np.uint8)),
    }
    with pytest.raises(ValueError, match="sem.png"):
        build_dataset_mapper(make_cfg(), is_train=True)(record)


def test_semantic_rgb_label_rejected(tmp_path):
    record = {
        "file_name": save(tmp_path / "img.png", random_rgb()),
        "sem_seg_file_name": save(tmp_path / "sem_rgb.png", random_rgb(9)),
    }
    with pytest.raises(ValueError, match="sem_rgb.png.*single-channel"):
        build_dataset_mapper(make_cfg(), is_train=True)(record)


def test_semantic_all_ignore_gives_no_masks(tmp_path):
    record = {
        "file_name": save(tmp_path / "img.png", random_rgb()),
        "sem_seg_file_name": save(tmp_path / "sem.png", np.full((H, W), IGNORE, np.uint8)),
    }
    out = build_dataset_mapper(make_cfg(), is_train=True)(record)
    assert masks_of(out).shape == (0, H, W) and classes_of(out) == []


# --------------------------------------------------------------------------- bad files


def truncated_png(tmp_path, name):
    path = tmp_path / name
    Image.fromarray(random_rgb(6)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return str(path)


@pytest.mark.parametrize(
    "broken", ["missing_image", "truncated_image", "garbage_image", "missing_label"]
)
def test_unreadable_file_is_skipped_in_training_and_raises_in_inference(tmp_path, broken):
    record = {
        "file_name": save(tmp_path / "img.png", random_rgb()),
        "sem_seg_file_name": save(tmp_path / "sem.png", semantic_label()),
        "image_id": 3,
    }
    if broken == "missing_image":
        record["file_name"] = bad = str(tmp_path / "nope.jpg")
    elif broken == "truncated_image":
        record["file_name"] = bad = truncated_png(tmp_path, "cut.png")
    elif broken == "garbage_image":
        bad = tmp_path / "garbage.png"
        bad.write_bytes(b"this is not an image")
        record["file_name"] = bad = str(bad)
    else:
        record["sem_seg_file_name"] = bad = str(tmp_path / "no_label.png")

    mapper = build_dataset_mapper(make_cfg(), is_train=True)
    with captured_warnings() as records:
        assert mapper(record) is None
        assert mapper(record) is None
    assert mapper.num_skipped == 2
    assert len(records) == 2 and bad in records[0].getMessage()

    if broken != "missing_label":  # inference never reads labels
        with pytest.raises(ImageReadError) as e:
            build_dataset_mapper(make_cfg(), is_train=False)(record)
        assert bad in str(e.value)


@pytest.mark.parametrize("name", ["mask_former_panoptic", "mask_former_instance"])
def test_unreadable_file_skipped_by_other_mappers(tmp_path, name):
    record, _ = write_panoptic(tmp_path, panoptic_ids(), PANOPTIC_SEGMENTS)
    record["annotations"] = []
    record["file_name"] = truncated_png(tmp_path, "cut.png")
    mapper = build_dataset_mapper(make_cfg(name), is_train=True)
    with captured_warnings() as records:
        assert mapper(record) is None
    assert mapper.num_skipped == 1 and "cut.png" in records[0].getMessage()


# --------------------------------------------------------------------------- image modes


def palette_image():
    indices = (np.arange(H * W).reshape(H, W) % 7).astype(np.uint8)
    palette = np.random.default_rng(7).integers(0, 256, (256, 3), dtype=np.uint8)
    pil = Image.fromarray(indices, mode="P")
    pil.putpalette(palette.ravel().tolist())
    return pil, palette[indices]


def image_in_mode(mode):
    """(PIL image to save, expected RGB uint8 H x W x 3)."""
    rgb = random_rgb(8)
    if mode == "RGBA":
        alpha = np.random.default_rng(9).integers(0, 256, (H, W, 1), dtype=np.uint8)
        return Image.fromarray(np.concatenate([rgb, alpha], axis=2), mode="RGBA"), rgb
    if mode == "L":
        return Image.fromarray(rgb[:, :, 0], mode="L"), np.repeat(rgb[:, :, :1], 3, axis=2)
    if mode == "P":
        return palette_image()
    if mode == "I;16":
        values = np.random.default_rng(10).integers(0, 65536, (H, W)).astype(np.uint16)
        values[0, :3] = [0, 256 * 100 + 200, 65535]  # high bytes 0, 100, 255
        expected = np.repeat((values // 256).astype(np.uint8)[:, :, None], 3, axis=2)
        assert list(expected[0, :3, 0]) == [0, 100, 255]
        return Image.fromarray(values), expected
    raise AssertionError(mode)


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "I;16"])
@pytest.mark.parametrize("fmt", ["RGB", "BGR"])
def test_image_modes_become_3_channel_uint8(tmp_path, mode, fmt):
    pil, expected_rgb = image_in_mode(mode)
    path = tmp_path / "img.png"
    pil.save(path)
    assert Image.open(path).mode == mode, "the test did not produce the mode it means to test"
    out = build_dataset_mapper(make_cfg(FORMAT=fmt), is_train=False)(
        {"file_name": str(path), "image_id": 0}
    )
    image = out["image"].permute(1, 2, 0).numpy()
    assert out["image"].dtype == torch.uint8 and image.shape == (H, W, 3)
    assert np.array_equal(image, expected_rgb if fmt == "RGB" else expected_rgb[:, :, ::-1])


def test_palette_label_uses_indices(tmp_path):
    label = semantic_label()
    pil = Image.fromarray(label, mode="P")
    pil.putpalette(list(range(256)) * 3)
    record = {
        "file_name": save(tmp_path / "img.png", random_rgb()),
        "sem_seg_file_name": str(tmp_path / "sem.png"),
    }
    pil.save(record["sem_seg_file_name"])
    out = build_dataset_mapper(make_cfg(), is_train=True)(record)
    assert np.array_equal(out["sem_seg"].numpy(), label)


# --------------------------------------------------------------------------- inference mode


@pytest.mark.parametrize("name", MAPPER_NAMES)
def test_inference_mode_resizes_and_has_no_targets(tmp_path, name):
    record, image = write_panoptic(tmp_path, panoptic_ids(), PANOPTIC_SEGMENTS)
    record["sem_seg_file_name"] = save(tmp_path / "sem.png", semantic_label())
    record["annotations"] = [
        {"category_id": 1, "iscrowd": 0, "segmentation": [polygon_square(1, 1, 9, 9)]}
    ]
    cfg = make_cfg(name, MIN_SIZE_TEST=2 * H)
    out = build_dataset_mapper(cfg, is_train=False)(record)
    assert "instances" not in out and "sem_seg" not in out
    assert (out["height"], out["width"], out["file_name"], out["image_id"]) == (
        H,
        W,
        record["file_name"],
        "pan",
    )
    assert out["image"].shape == (3, 2 * H, 2 * W) and out["image"].dtype == torch.uint8
    expected = np.asarray(Image.fromarray(image).resize((2 * W, 2 * H), Image.BILINEAR))
    assert np.array_equal(out["image"].permute(1, 2, 0).numpy(), expected)


def test_inference_mode_checks_recorded_size(tmp_path):
    record = {"file_name": save(tmp_path / "img.png", random_rgb()), "height": H + 1, "width": W}
    with pytest.raises(ValueError, match="img.png"):
        build_dataset_mapper(make_cfg(), is_train=False)(record)


# --------------------------------------------------------------------------- panoptic


@pytest.mark.parametrize("name", ["mask_former_panoptic", "detr_panoptic"])
def test_panoptic_masks_round_trip(tmp_path, name):
    ids = panoptic_ids()
    record, image = write_panoptic(tmp_path, ids, PANOPTIC_SEGMENTS)
    cfg = make_cfg(name)
    if name == "detr_panoptic":
        cfg.INPUT.CROP.ENABLED = False  # only the plain resize branch: identity here
    out = build_dataset_mapper(cfg, is_train=True)(record)
    assert np.array_equal(out["image"].permute(1, 2, 0).numpy(), image)
    masks, classes = masks_of(out), classes_of(out)

    # non-crowd segments present in the PNG, in segments_info order
    kept = [s for s in PANOPTIC_SEGMENTS if not s["iscrowd"] and (ids == s["id"]).any()]
    assert classes == [s["category_id"] for s in kept]
    assert masks.shape == (len(kept), H, W) and masks.sum(0).max() == 1

    # masks -> panoptic PNG -> ids: each mask carries exactly one original id
    rebuilt = np.zeros((H, W), dtype=np.int64)
    for mask in masks:
        under = np.unique(ids[mask])
        assert under.size == 1, f"a mask spans segments {under}"
        rebuilt[mask] = under[0]
    png = tmp_path / "rebuilt.png"
    Image.fromarray(id2rgb(rebuilt).astype(np.uint8)).save(png)
    expected = np.where(ids == 999, 0, ids)  # crowd pixels belong to no mask
    assert np.array_equal(rgb2id(np.asarray(Image.open(png))), expected)


def test_panoptic_flip_resize_and_padding(tmp_path):
    ids = panoptic_ids()
    record, image = write_panoptic(tmp_path, ids, PANOPTIC_SEGMENTS)
    cfg = make_cfg("mask_former_panoptic", SIZE_DIVISIBILITY=40)
    mapper = MaskFormerPanopticDatasetMapper(
        **{
            **MaskFormerPanopticDatasetMapper.from_config(cfg, True),
            "augmentations": [T.ResizeShortestEdge(2 * H, 10000), T.RandomFlip(prob=1.0)],
        }
    )
    out = mapper(record)
    expected_ids = np.fliplr(upsample2(ids))  # (96, 128) -> padded to (120, 160)
    img = out["image"].permute(1, 2, 0).numpy()
    assert img.shape == (120, 160, 3) and out["instances"].image_size == (120, 160)
    assert (img[96:] == 128).all() and (img[:, 128:] == 128).all()
    expected_img = np.fliplr(
        np.asarray(Image.fromarray(image).resize((2 * W, 2 * H), Image.BILINEAR))
    )
    assert np.array_equal(img[:96, :128], expected_img)
    kept = [s for s in PANOPTIC_SEGMENTS if not s["iscrowd"] and (ids == s["id"]).any()]
    masks = masks_of(out)
    assert classes_of(out) == [s["category_id"] for s in kept]
    for segment, mask in zip(kept, masks):
        assert np.array_equal(mask[:96, :128], expected_ids == segment["id"])
    assert not masks[:, 96:].any() and not masks[:, :, 128:].any()


def test_panoptic_crop_constraint_counts_categories_not_segments(tmp_path):
    # like the semantic crop test, but the class-2 half is two segments (top, bottom) of one
    # category: a check on segment ids instead of categories would accept crops inside it
    label = crop_test_label()
    ids = label.astype(np.int64) + 1
    ids[label == IGNORE] = 0
    ids[H // 2 :, 32:][label[H // 2 :, 32:] == 2] = 4
    segments = [
        {"id": 1, "category_id": 0, "iscrowd": 0},
        {"id": 2, "category_id": 1, "iscrowd": 0},
        {"id": 3, "category_id": 2, "iscrowd": 0},
        {"id": 4, "category_id": 2, "iscrowd": 0},
    ]
    record, image = write_panoptic(tmp_path, ids, segments, image=random_rgb(11))
    cfg = make_cfg(
        "mask_former_panoptic",
        **{"CROP.ENABLED": True, "CROP.TYPE": "absolute", "CROP.SIZE": [16, 16]},
    )
    cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA = 0.75
    mapper = build_dataset_mapper(cfg, is_train=True)
    np.random.seed(0)
    for _ in range(20):
        out = mapper(record)
        ((y0, x0),) = find_crop(image, out["image"].permute(1, 2, 0).numpy())
        crop_ids = ids[y0 : y0 + 16, x0 : x0 + 16]
        category = np.full(crop_ids.shape, IGNORE)
        for s in segments:
            category[crop_ids == s["id"]] = s["category_id"]
        assert largest_category_fraction(category) < 0.75
        for c, m in zip(classes_of(out), masks_of(out)):
            assert (category[m] == c).all()


def test_panoptic_invalid_category(tmp_path):
    segments = [dict(s) for s in PANOPTIC_SEGMENTS]
    segments[1]["category_id"] = 9
    record, _ = write_panoptic(tmp_path, panoptic_ids(), segments, name="badcat")
    with pytest.raises(ValueError) as e:
        build_dataset_mapper(make_cfg("mask_former_panoptic"), is_train=True)(record)
    assert "badcat.png" in str(e.value) and "9" in str(e.value)


def test_panoptic_unlisted_segment_id(tmp_path):
    segments = [s for s in PANOPTIC_SEGMENTS if s["id"] != 300]
    record, _ = write_panoptic(tmp_path, panoptic_ids(), segments, name="unlisted")
    with pytest.raises(ValueError, match=r"unlisted\.png.*\[300\]"):
        build_dataset_mapper(make_cfg("mask_former_panoptic"), is_train=True)(record)


def test_panoptic_empty(tmp_path):
    record, _ = write_panoptic(tmp_path, np.zeros((H, W), np.int64), [])
    out = build_dataset_mapper(make_cfg("mask_former_panoptic"), is_train=True)(record)
    assert masks_of(out).shape == (0, H, W) and classes_of(out) == []


# --------------------------------------------------------------------------- DETR augmentation


def test_detr_augmentation_structure():
    cfg = make_cfg(
        "detr_panoptic",
        RANDOM_FLIP="horizontal",
        **{"CROP.ENABLED": True, "CROP.TYPE": "absolute_range", "CROP.SIZE": [384, 600]},
    )
    mapper = build_dataset_mapper(cfg, is_train=True)
    flip, choice = mapper.augmentations.augs
    assert isinstance(flip, T.RandomFlip) and isinstance(choice, RandomChoiceAugmentation)
    assert choice.probs == [0.5, 0.5]
    (plain,), (resize, crop, final) = [c.augs for c in choice.choices]
    assert isinstance(plain, T.ResizeShortestEdge) and tuple(plain.short_edge_length) == (H,)
    assert isinstance(resize, T.ResizeShortestEdge) and tuple(resize.short_edge_length) == (
        400,
        500,
        600,
    )
    assert not resize.is_range
    assert isinstance(crop, T.RandomCrop) and crop.crop_type == "absolute_range"
    assert tuple(crop.crop_size) == (384, 600)
    assert isinstance(final, T.ResizeShortestEdge) and tuple(final.short_edge_length) == (H,)


def test_random_choice_augmentation_picks_each_branch():
    choice = RandomChoiceAugmentation([[T.HFlipTransform(W)], [T.VFlipTransform(H)]])
    np.random.seed(0)
    image = random_rgb()
    picks = []
    for _ in range(200):
        aug_input = T.AugInput(image.copy())
        tfm = choice(aug_input)
        (only,) = tfm.transforms
        picks.append(isinstance(only, T.HFlipTransform))
        expected = np.fliplr(image) if picks[-1] else np.flipud(image)
        assert np.array_equal(aug_input.image, expected)
    assert 70 < sum(picks) < 130
    with pytest.raises(ValueError, match="probs"):
        RandomChoiceAugmentation([[T.NoOpTransform()]], probs=[0.3])


def test_detr_mapper_end_to_end(tmp_path):
    ids = panoptic_ids()
    record, image = write_panoptic(tmp_path, ids, PANOPTIC_SEGMENTS)
    cfg = make_cfg(
        "detr_panoptic",
        **{"CROP.ENABLED": True, "CROP.TYPE": "absolute_range", "CROP.SIZE": [384, 600]},
    )
    mapper = build_dataset_mapper(cfg, is_train=True)
    np.random.seed(0)
    plain = cropped = 0
    for _ in range(10):
        out = mapper(record)
        img = out["image"].permute(1, 2, 0).numpy()
        assert min(img.shape[:2]) == H, "the last resize sets the short edge"
        masks = masks_of(out)
        assert masks.shape[1:] == img.shape[:2] and masks.sum(0).max() <= 1
        categories = {s["category_id"] for s in PANOPTIC_SEGMENTS if not s["iscrowd"]}
        assert set(classes_of(out)) <= categories
        if np.array_equal(img, image):
            plain += 1
            assert len(classes_of(out)) == 4
        else:
            cropped += 1
    assert plain > 0 and cropped > 0


# --------------------------------------------------------------------------- instance


def test_instance_masks_match_pycocotools(tmp_path):
    record, image, expected = instance_sample(tmp_path)
    out = build_dataset_mapper(make_cfg("mask_former_instance"), is_train=True)(record)
    assert np.array_equal(out["image"].permute(1, 2, 0).numpy(), image)
    assert "annotations" not in out and out["image_id"] == 7
    assert classes_of(out) == [c for c, _ in expected]
    masks = masks_of(out)
    assert masks.dtype == bool and masks.shape == (len(expected), H, W)
    for (_, e), m in zip(expected, masks):
        assert e.any() and np.array_equal(m, e)
    assert np.array_equal(masks.any(0), np.any([e for _, e in expected], axis=0))


def test_instance_flip_resize_and_crop(tmp_path):
    record, image, expected = instance_sample(tmp_path)
    cfg = make_cfg("mask_former_instance")

    def run(augmentations):
        kwargs = MaskFormerInstanceDatasetMapper.from_config(cfg, True)
        return MaskFormerInstanceDatasetMapper(**{**kwargs, "augmentations": augmentations})(record)

    out = run([T.RandomFlip(prob=1.0)])
    assert np.array_equal(out["image"].permute(1, 2, 0).numpy(), np.fliplr(image))
    for (_, e), m in zip(expected, masks_of(out)):
        assert np.array_equal(m, np.fliplr(e))

    out = run([T.ResizeShortestEdge(2 * H, 10000)])
    for (_, e), m in zip(expected, masks_of(out)):
        assert np.array_equal(m, upsample2(e))

    # keep columns [0, 28): the compressed-RLE blob survives, the ring (x >= 30) does not
    out = run([T.CropTransform(0, 0, 28, H)])
    survivors = [(c, e[:, :28]) for c, e in expected if e[:, :28].any()]
    assert len(survivors) < len(expected)
    assert classes_of(out) == [c for c, _ in survivors]
    for (_, e), m in zip(survivors, masks_of(out)):
        assert np.array_equal(m, e)


def test_instance_padding(tmp_path):
    record, image, expected = instance_sample(tmp_path)
    out = build_dataset_mapper(
        make_cfg("mask_former_instance", SIZE_DIVISIBILITY=32), is_train=True
    )(record)
    img, masks = out["image"].permute(1, 2, 0).numpy(), masks_of(out)
    assert img.shape == (64, 64, 3) and (img[H:] == 128).all()
    for (_, e), m in zip(expected, masks):
        assert np.array_equal(m[:H], e) and not m[H:].any()


@pytest.mark.parametrize("annotations", [[], None])
def test_instance_without_annotations(tmp_path, annotations):
    record = {"file_name": save(tmp_path / "img.png", random_rgb())}
    if annotations is not None:
        record["annotations"] = annotations
    out = build_dataset_mapper(make_cfg("mask_former_instance"), is_train=True)(record)
    assert masks_of(out).shape == (0, H, W) and out["instances"].gt_classes.shape == (0,)


def test_instance_invalid_annotations(tmp_path):
    record, _, _ = instance_sample(tmp_path)
    mapper = build_dataset_mapper(make_cfg("mask_former_instance"), is_train=True)
    bad_category = {**record, "annotations": [dict(a) for a in record["annotations"]]}
    bad_category["annotations"][3]["category_id"] = 12
    with pytest.raises(ValueError, match=r"annotation 3 of .*inst\.png.*12"):
        mapper(bad_category)
    bad_polygon = {
        **record,
        "annotations": [{"category_id": 0, "iscrowd": 0, "segmentation": [[1, 2, 3, 4]]}],
    }
    with pytest.raises(ValueError, match="polygon"):
        mapper(bad_polygon)
    bad_rle = {
        **record,
        "annotations": [
            {
                "category_id": 0,
                "iscrowd": 0,
                "segmentation": {"size": [H, W + 1], "counts": [H * (W + 1)]},
            }
        ],
    }
    with pytest.raises(ValueError, match="RLE size"):
        mapper(bad_rle)


# --------------------------------------------------------------------------- color augmentation


def test_color_aug_ssd_brightness_and_contrast_by_hand():
    image = np.array([[[0, 100, 250], [10, 128, 200]]], dtype=np.uint8)
    bright = ColorAugSSDTransform("RGB", brightness_delta=10.0).apply_image(image)
    assert bright.tolist() == [[[10, 110, 255], [20, 138, 210]]]
    dark = ColorAugSSDTransform("BGR", brightness_delta=-20.0).apply_image(image)
    assert dark.tolist() == [[[0, 80, 230], [0, 108, 180]]]
    contrast = ColorAugSSDTransform("RGB", contrast_alpha=1.5).apply_image(image)
    assert contrast.tolist() == [[[0, 150, 255], [15, 192, 255]]]
    # brightness first, then contrast first or last (no HSV step in between: same result)
    both = ColorAugSSDTransform(
        "RGB", brightness_delta=10.0, contrast_alpha=0.5, contrast_first=False
    )
    assert both.apply_image(image).tolist() == [[[5, 55, 127], [10, 69, 105]]]


def test_color_aug_ssd_hue_and_saturation_by_hand():
    red_rgb = np.array([[[255, 0, 0], [0, 0, 255]]], dtype=np.uint8)  # red, blue
    half_turn = ColorAugSSDTransform("RGB", hue_delta=90).apply_image(red_rgb)
    assert half_turn.tolist() == [[[0, 255, 255], [255, 255, 0]]]  # cyan, yellow
    # the same pixels in BGR order give the same colours in BGR order
    half_turn_bgr = ColorAugSSDTransform("BGR", hue_delta=90).apply_image(red_rgb[:, :, ::-1])
    assert np.array_equal(half_turn_bgr, half_turn[:, :, ::-1])
    gray = ColorAugSSDTransform("RGB", saturation_alpha=0.0).apply_image(red_rgb)
    assert gray.tolist() == [[[255, 255, 255], [255, 255, 255]]]  # V = max channel


def test_color_aug_ssd_geometry_untouched_and_input_checked():
    tfm = ColorAugSSDTransform("RGB", brightness_delta=5.0, hue_delta=3)
    seg = np.arange(12).reshape(3, 4)
    assert tfm.apply_segmentation(seg) is seg
    coords = np.array([[1.0, 2.0]])
    assert np.array_equal(tfm.apply_coords(coords.copy()), coords)
    with pytest.raises(ValueError, match="uint8"):
        tfm.apply_image(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="img_format"):
        ColorAugSSDTransform("YUV")


def test_random_color_aug_ssd_samples_in_range():
    aug = RandomColorAugSSD("BGR")
    np.random.seed(0)
    image = random_rgb()
    seen = {"brightness_delta": 0, "contrast_alpha": 0, "saturation_alpha": 0, "hue_delta": 0}
    order = set()
    for _ in range(100):
        tfm = aug.get_transform(image)
        assert isinstance(tfm, ColorAugSSDTransform) and tfm.img_format == "BGR"
        for key in seen:
            seen[key] += getattr(tfm, key) is not None
        if tfm.brightness_delta is not None:
            assert -32 <= tfm.brightness_delta <= 32
        for key in ("contrast_alpha", "saturation_alpha"):
            if getattr(tfm, key) is not None:
                assert 0.5 <= getattr(tfm, key) <= 1.5
        if tfm.hue_delta is not None:
            assert isinstance(tfm.hue_delta, int) and -18 <= tfm.hue_delta <= 18
        order.add(tfm.contrast_first)
    assert all(25 < n < 75 for n in seen.values()), seen
    assert order == {True, False}
