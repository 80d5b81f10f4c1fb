"""The converters in datasets/prepare_*.py on tiny datasets written here in each source format,
checked against expectations worked out by hand."""
import importlib.util
import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from panopticapi.utils import id2rgb, rgb2id
from PIL import Image
from pycocotools.coco import COCO

REPO_ROOT = Path(__file__).resolve().parents[1]


def _load_script(name):
    """Import datasets/<name>.py (the folder is not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "datasets" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # lets multiprocessing workers find the module's functions
    spec.loader.exec_module(module)
    return module


def _save(array, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _read(path):
    return np.asarray(Image.open(path))


def _jpg(path, height=32, width=32):
    _save(np.full((height, width, 3), 128, dtype=np.uint8), path)


# ---------------------------------------------------------------- ADE20K-150 semantic
def test_ade20k_sem_seg_shifts_labels(tmp_path):
    prepare = _load_script("prepare_ade20k_sem_seg")
    root = tmp_path / "ADEChallengeData2016"
    raw = np.zeros((32, 32), dtype=np.uint8)  # columns: void | wall | flag | person
    raw[:, 8:16], raw[:, 16:24], raw[:, 24:] = 1, 150, 13
    _save(raw, root / "annotations" / "training" / "ADE_train_00000001.png")
    _save(raw.T.copy(), root / "annotations" / "validation" / "ADE_val_00000001.png")

    prepare.main(["--root", str(root)])

    expected = np.full((32, 32), 255, dtype=np.uint8)
    expected[:, 8:16], expected[:, 16:24], expected[:, 24:] = 0, 149, 12
    out_dir = root / "annotations_detectron2"
    assert np.array_equal(_read(out_dir / "training" / "ADE_train_00000001.png"), expected)
    assert np.array_equal(_read(out_dir / "validation" / "ADE_val_00000001.png"), expected.T)


def test_ade20k_sem_seg_rejects_out_of_range_labels(tmp_path):
    prepare = _load_script("prepare_ade20k_sem_seg")
    raw = np.zeros((4, 4), dtype=np.uint8)
    raw[0, 0] = 151
    _save(raw, tmp_path / "annotations" / "training" / "x.png")
    with pytest.raises(ValueError, match=r"x\.png.*151"):
        prepare.convert_ade20k_sem_seg(str(tmp_path), splits=["training"])
    with pytest.raises(FileNotFoundError, match="validation"):
        prepare.convert_ade20k_sem_seg(str(tmp_path), splits=["validation"])


# ---------------------------------------------------------------- ADE20K panoptic + instances
def test_ade20k_default_instance_mapping_matches_instance_class_names():
    prepare = _load_script("prepare_ade20k_pan_seg")
    mapping = prepare.default_instance_to_semantic()
    assert len(mapping) == 100 and sorted(mapping) == list(range(1, 101))
    # Places-Challenge instanceInfo100 names -> SceneParsing ids (0-based) of the same objects
    expected = {
        1: 7,  # bed
        2: 8,  # windowpane -> "window "
        4: 12,  # person
        58: 89,  # television receiver -> "tv"
        60: 92,  # apparel -> "clothes"
        92: 138,  # ashcan -> "trash can"
        100: 149,  # flag
    }
    assert {k: mapping[k] for k in expected} == expected


def test_ade20k_instance_mapping_file(tmp_path):
    prepare = _load_script("prepare_ade20k_pan_seg")
    good = tmp_path / "mapping.txt"
    good.write_text("Instance SceneParsing Full\n1\t8\t165\n4\t13\t1831\n")
    assert prepare.load_instance_to_semantic(str(good)) == {1: 7, 4: 12}
    bad = tmp_path / "bad.txt"
    bad.write_text("header\n5 1 2978\n")  # SceneParsing 1 = wall, a stuff class
    with pytest.raises(ValueError, match=r"bad\.txt:2"):
        prepare.load_instance_to_semantic(str(bad))


def _ade_panoptic_inputs(root):
    """One 32 x 32 training image:

    semantic: rows 0-15 wall (1), rows 16-31 floor (4), rows 0-1 x cols 24-31 person (13) that no
    instance covers; instances: bed (class 1, G=1) rows 4-11 x cols 4-11, person (class 4, G=2)
    rows 20-27 x cols 20-27, bed (class 1, G=3) rows 12-19 x cols 0-3 (across wall and floor).
    """
    stem = "ADE_train_00000001"
    _jpg(root / "images" / "training" / f"{stem}.jpg")
    semantic = np.ones((32, 32), dtype=np.uint8)
    semantic[16:] = 4
    semantic[0:2, 24:32] = 13
    _save(semantic, root / "annotations" / "training" / f"{stem}.png")
    instance = np.zeros((32, 32, 3), dtype=np.uint8)
    instance[4:12, 4:12] = [1, 1, 0]
    instance[20:28, 20:28] = [4, 2, 0]
    instance[12:20, 0:4] = [1, 3, 0]
    _save(instance, root / "annotations_instance" / "training" / f"{stem}.png")
    return stem


def test_ade20k_panoptic_and_instance_json(tmp_path):
    prepare = _load_script("prepare_ade20k_pan_seg")
    root = tmp_path / "ADEChallengeData2016"
    stem = _ade_panoptic_inputs(root)

    counts = prepare.convert_ade20k_panoptic(str(root), splits=[("train", "training")])
    assert counts == {"train": 1}

    # segment ids: (category + 1) * 1000 + instance number
    wall, floor, bed1, bed2, person = 1000, 4000, 8001, 8002, 13001
    expected_ids = np.full((32, 32), wall, dtype=np.int64)
    expected_ids[16:] = floor
    expected_ids[0:2, 24:32] = 0
    expected_ids[4:12, 4:12] = bed1
    expected_ids[20:28, 20:28] = person
    expected_ids[12:20, 0:4] = bed2
    panoptic_png = _read(root / "ade20k_panoptic_train" / f"{stem}.png")
    assert np.array_equal(rgb2id(panoptic_png), expected_ids)

    panoptic_json = json.loads((root / "ade20k_panoptic_train.json").read_text())
    categories = panoptic_json["categories"]
    assert [c["id"] for c in categories] == list(range(150))
    assert sum(c["isthing"] for c in categories) == 100
    assert panoptic_json["images"] == [
        {"id": stem, "file_name": f"{stem}.jpg", "width": 32, "height": 32}
    ]
    (annotation,) = panoptic_json["annotations"]
    assert annotation["image_id"] == stem and annotation["file_name"] == f"{stem}.png"
    segments = {
        s["id"]: (s["category_id"], s["area"], s["bbox"]) for s in annotation["segments_info"]
    }
    assert segments == {
        wall: (0, 512 - 16 - 64 - 16, [0, 0, 32, 16]),
        floor: (3, 512 - 64 - 16, [0, 16, 32, 16]),
        bed1: (7, 64, [4, 4, 8, 8]),
        bed2: (7, 32, [0, 12, 4, 8]),
        person: (12, 64, [20, 20, 8, 8]),
    }

    coco = COCO(str(root / "ade20k_instance_train.json"))
    assert len(coco.getCatIds()) == 100 and {7, 12} <= set(coco.getCatIds())
    assert 0 not in coco.getCatIds()  # wall is stuff
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[stem]))
    by_box = {tuple(a["bbox"]): a for a in anns}
    assert sorted(by_box) == sorted([(4, 4, 8, 8), (20, 20, 8, 8), (0, 12, 4, 8)])
    expected_instances = [((4, 4, 8, 8), 7, 64), ((20, 20, 8, 8), 12, 64), ((0, 12, 4, 8), 7, 32)]
    for box, category_id, area in expected_instances:
        ann = by_box[box]
        assert (ann["category_id"], ann["area"], ann["iscrowd"]) == (category_id, area, 0)
        x, y, w, h = box
        expected_mask = np.zeros((32, 32), dtype=np.uint8)
        expected_mask[y : y + h, x : x + w] = 1
        assert np.array_equal(coco.annToMask(ann), expected_mask)
    assert sorted(a["id"] for a in anns) == [1, 2, 3]


def test_ade20k_panoptic_rejects_instance_with_two_classes(tmp_path):
    prepare = _load_script("prepare_ade20k_pan_seg")
    semantic = np.ones((4, 4), dtype=np.uint8)
    instance = np.zeros((4, 4, 3), dtype=np.uint8)
    instance[0, 0:2] = [[1, 1, 0], [4, 1, 0]]  # instance 1 labelled bed and person
    with pytest.raises(ValueError, match="several classes"):
        prepare.build_panoptic(semantic, instance, prepare.default_instance_to_semantic(), "x.png")


# ---------------------------------------------------------------- ADE20K-Full
def _ade_seg_png(object_ids):
    """Encode ADE20K object ids as R // 10 * 256 + G (R deliberately not a multiple of 10)."""
    seg = np.zeros(object_ids.shape + (3,), dtype=np.uint8)
    seg[..., 0] = (object_ids // 256) * 10 + 5 * (object_ids // 256 > 0)
    seg[..., 1] = object_ids % 256
    return seg


def test_ade20k_full_sem_seg(tmp_path):
    prepare = _load_script("prepare_ade20k_full_sem_seg")
    from prepare_ade20k_full_sem_seg import ADE20K_FULL_CATEGORIES  # loaded by _load_script

    assert 5 not in {object_id for object_id, _ in ADE20K_FULL_CATEGORIES}  # used as "unknown"
    wall, adding_machine, unknown = 2978, 3148, 5  # training ids 0 and 846; not a class
    ade = tmp_path / "ADE20K_2021_17_01"
    train_folder = "ADE20K_2021_17_01/images/ADE/training/urban/street"
    val_folder = "ADE20K_2021_17_01/images/ADE/validation/misc"

    # training image 16 x 16 (not resized): quadrants wall | machine / unknown | unlabeled
    train_ids = np.zeros((16, 16), dtype=np.int64)
    train_ids[:8, :8], train_ids[:8, 8:], train_ids[8:, :8] = wall, adding_machine, unknown
    _jpg(tmp_path / train_folder / "ADE_train_00000001.jpg", 16, 16)
    _save(_ade_seg_png(train_ids), tmp_path / train_folder / "ADE_train_00000001_seg.png")
    # validation image 20 x 40 -> resized to 16 x 32: left half wall, right half machine
    val_ids = np.full((20, 40), wall, dtype=np.int64)
    val_ids[:, 20:] = adding_machine
    _jpg(tmp_path / val_folder / "ADE_val_00000001.jpg", 20, 40)
    _save(_ade_seg_png(val_ids), tmp_path / val_folder / "ADE_val_00000001_seg.png")
    index = {
        "folder": [train_folder, val_folder],
        "filename": ["ADE_train_00000001.jpg", "ADE_val_00000001.jpg"],
    }
    with open(ade / "index_ade20k.pkl", "wb") as f:
        pickle.dump(index, f)

    counts = prepare.convert_ade20k_full_sem_seg(str(tmp_path), max_size=16)
    assert counts == {"training": 1, "validation": 1}

    train_label = _read(ade / "annotations_detectron2" / "training" / "ADE_train_00000001.tif")
    assert train_label.dtype == np.uint16
    expected = np.full((16, 16), 65535, dtype=np.uint16)
    expected[:8, :8], expected[:8, 8:] = 0, 846
    assert np.array_equal(train_label, expected)
    copied = ade / "images_detectron2" / "training" / "ADE_train_00000001.jpg"
    assert copied.read_bytes() == (tmp_path / train_folder / "ADE_train_00000001.jpg").read_bytes()

    val_label = _read(ade / "annotations_detectron2" / "validation" / "ADE_val_00000001.tif")
    expected = np.zeros((16, 32), dtype=np.uint16)
    expected[:, 16:] = 846
    assert np.array_equal(val_label, expected)
    val_image = Image.open(ade / "images_detectron2" / "validation" / "ADE_val_00000001.jpg")
    assert val_image.size == (32, 16)


def test_ade20k_full_resize_rule():
    prepare = _load_script("prepare_ade20k_full_sem_seg")
    assert prepare.resized_shape(600, 800, 512) == (512, 683)  # shorter side (height) -> 512
    assert prepare.resized_shape(1000, 700, 512) == (731, 512)
    assert prepare.resized_shape(512, 900, 512) is None
    assert prepare.split_of("ADE_val_00001234.jpg") == "validation"
    assert prepare.split_of("ADE_train_00001234.jpg") == "training"


# ---------------------------------------------------------------- COCO-Stuff-10K
def _coco_stuff_inputs(root, split, stem, label_map):
    (root / "imageLists").mkdir(parents=True, exist_ok=True)
    (root / "imageLists" / f"{split}.txt").write_text(stem + "\n")
    _jpg(root / "images" / f"{stem}.jpg", *label_map.shape)
    (root / "annotations").mkdir(exist_ok=True)
    scipy.io.savemat(str(root / "annotations" / f"{stem}.mat"), {"S": label_map})


def test_coco_stuff_10k(tmp_path):
    prepare = _load_script("prepare_coco_stuff_10k_sem_seg")
    root = tmp_path / "coco_stuff_10k"
    # MATLAB indices: 1 unlabeled, 2 person, 81 toothbrush, 82 banner, 172 wood
    label_map = np.array([[1, 2, 81], [82, 172, 1]], dtype=np.uint8).repeat(8, 0).repeat(8, 1)
    _coco_stuff_inputs(root, "train", "COCO_train2014_000000000077", label_map)
    _coco_stuff_inputs(root, "test", "COCO_train2014_000000000078", label_map[::-1].copy())

    assert prepare.convert_coco_stuff_10k(str(root)) == {"train": 1, "test": 1}

    expected = np.array([[255, 0, 79], [80, 170, 255]], dtype=np.uint8).repeat(8, 0).repeat(8, 1)
    out = root / "annotations_detectron2"
    assert np.array_equal(_read(out / "train" / "COCO_train2014_000000000077.png"), expected)
    assert np.array_equal(_read(out / "test" / "COCO_train2014_000000000078.png"), expected[::-1])
    image = root / "images_detectron2" / "train" / "COCO_train2014_000000000077.jpg"
    assert image.read_bytes() == (root / "images" / "COCO_train2014_000000000077.jpg").read_bytes()


def test_coco_stuff_10k_rejects_bad_labels(tmp_path):
    prepare = _load_script("prepare_coco_stuff_10k_sem_seg")
    root = tmp_path / "coco_stuff_10k"
    _coco_stuff_inputs(root, "train", "a", np.zeros((4, 4), dtype=np.uint8))  # 0 is not a label
    with pytest.raises(ValueError, match=r"a\.mat.*\[1, 172\]"):
        prepare.convert_coco_stuff_10k(str(root), splits=["train"])


def test_coco_stuff_10k_reads_matlab_v73(tmp_path):
    prepare = _load_script("prepare_coco_stuff_10k_sem_seg")
    path = tmp_path / "v73.mat"
    try:
        import h5py
    except ImportError:
        # a MATLAB v7.3 header: scipy refuses it and the converter says h5py is needed
        header = b"MATLAB 7.3 MAT-file".ljust(116, b" ") + b"\0" * 8 + b"\x00\x02" + b"IM"
        path.write_bytes(header + b"\0" * 512)
        with pytest.raises(ImportError, match="h5py"):
            prepare.read_label_map(str(path))
        return
    label_map = np.arange(6, dtype=np.uint8).reshape(2, 3) + 1
    # a MATLAB v7.3 file: HDF5 behind a 512-byte user block that starts with MATLAB's header
    with h5py.File(path, "w", userblock_size=512) as f:
        f["S"] = label_map.T  # MATLAB writes column-major
    with open(path, "r+b") as f:
        f.write(b"MATLAB 7.3 MAT-file".ljust(116, b" ") + b"\0" * 8 + b"\x00\x02" + b"IM")
    assert np.array_equal(prepare.read_label_map(str(path)), label_map)


# ---------------------------------------------------------------- COCO panoptic -> semantic
def _coco_panoptic_inputs(root, split, segments_info, id_map, file_name="000000000139.png"):
    _save(id2rgb(id_map), root / f"panoptic_{split}" / file_name)
    annotations = [{"image_id": 139, "file_name": file_name, "segments_info": segments_info}]
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / f"panoptic_{split}.json").write_text(
        json.dumps({"images": [], "annotations": annotations, "categories": []})
    )


@pytest.mark.parametrize("num_workers", [1, 2])
def test_coco_panoptic_sem_seg(tmp_path, num_workers):
    prepare = _load_script("prepare_coco_panoptic_sem_seg")
    root = tmp_path / "coco"
    id_map = np.zeros((32, 32), dtype=np.int64)  # rows 24-31: void
    id_map[0:8], id_map[8:16] = 1, 2
    id_map[16:24, 0:16], id_map[16:24, 16:32] = 300, 70000
    segments = [
        {"id": 1, "category_id": 1, "iscrowd": 0},  # person
        {"id": 2, "category_id": 3, "iscrowd": 1},  # car, crowd: keeps its class
        {"id": 300, "category_id": 92, "iscrowd": 0},  # banner, first stuff class
        {"id": 70000, "category_id": 200, "iscrowd": 0},  # rug-merged, last class
    ]
    _coco_panoptic_inputs(root, "val2017", segments, id_map)

    counts = prepare.convert_coco_panoptic_sem_seg(str(root), ["val2017"], num_workers=num_workers)
    assert counts == {"val2017": 1}

    expected = np.full((32, 32), 255, dtype=np.uint8)
    expected[0:8], expected[8:16] = 0, 2
    expected[16:24, 0:16], expected[16:24, 16:32] = 80, 132
    assert np.array_equal(_read(root / "panoptic_semseg_val2017" / "000000000139.png"), expected)


def test_coco_panoptic_sem_seg_rejects_unknown_category(tmp_path):
    prepare = _load_script("prepare_coco_panoptic_sem_seg")
    root = tmp_path / "coco"
    segments = [{"id": 1, "category_id": 12}]  # 12 is not a COCO category id
    _coco_panoptic_inputs(root, "val2017", segments, np.ones((4, 4), np.int64))
    with pytest.raises(ValueError, match="category_id 12"):
        prepare.convert_coco_panoptic_sem_seg(str(root), ["val2017"])
    with pytest.raises(FileNotFoundError, match="panoptic_train2017"):
        prepare.convert_coco_panoptic_sem_seg(str(root), ["train2017"])
