"""One-call registration of custom data, on tiny datasets written by the tests."""

import json
import os
import uuid

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from panopticapi.utils import id2rgb
from PIL import Image
from pycocotools import mask as mask_util

from mask_former.data.datasets.custom import (
    panoptic_metadata_from_categories,
    register_coco_instance_json,
    register_coco_panoptic_json,
    register_semantic_folder,
)
from mask_former.data.datasets.registration import load_coco_panoptic_json

# categories in no particular order, ids with gaps, one without a colour
CATEGORIES = [
    {"id": 7, "name": "car", "isthing": 1, "color": [10, 20, 30]},
    {"id": 3, "name": "road", "isthing": 0, "color": [40, 50, 60]},
    {"id": 2, "name": "person", "isthing": 1, "color": [70, 80, 90]},
    {"id": 50, "name": "sky", "isthing": 0},
]
# by hand: things by id (person 2, car 7), then stuff by id (road 3, sky 50)
THING_MAP = {2: 0, 7: 1}
ALL_MAP = {2: 0, 7: 1, 3: 2, 50: 3}


@pytest.fixture
def unique_name():
    """A fresh dataset name; whatever got registered under it is removed afterwards."""
    name = f"test_custom_{uuid.uuid4().hex[:8]}"
    yield name
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def _save(array, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture
def semantic_folder(tmp_path):
    for stem in ("b", "a", "c"):
        _save(np.full((6, 8, 3), 100, np.uint8), str(tmp_path / "images" / f"{stem}.jpg"))
        _save(np.full((6, 8), 1, np.uint8), str(tmp_path / "labels" / f"{stem}.png"))
    return str(tmp_path / "images"), str(tmp_path / "labels")


def test_semantic_folder(semantic_folder, unique_name):
    image_root, sem_seg_root = semantic_folder
    register_semantic_folder(
        unique_name, image_root, sem_seg_root, ["bg", "road", "car"], ignore_label=255
    )
    meta = MetadataCatalog.get(unique_name)
    assert meta.stuff_classes == ["bg", "road", "car"]
    assert (meta.ignore_label, meta.evaluator_type) == (255, "sem_seg")
    assert len(meta.stuff_colors) == 3 and all(len(c) == 3 for c in meta.stuff_colors)

    dicts = DatasetCatalog.get(unique_name)
    assert [
        (os.path.basename(d["file_name"]), os.path.basename(d["sem_seg_file_name"])) for d in dicts
    ] == [
        ("a.jpg", "a.png"),
        ("b.jpg", "b.png"),
        ("c.jpg", "c.png"),
    ]
    assert all(os.path.dirname(d["file_name"]) == image_root for d in dicts)


def test_semantic_folder_errors(semantic_folder, tmp_path, unique_name):
    image_root, sem_seg_root = semantic_folder
    with pytest.raises(ValueError, match="ignore_label=1"):
        register_semantic_folder(
            unique_name, image_root, sem_seg_root, ["a", "b", "c"], ignore_label=1
        )
    with pytest.raises(ValueError, match="2 colors for 3 classes"):
        register_semantic_folder(
            unique_name, image_root, sem_seg_root, ["a", "b", "c"], colors=[[0, 0, 0]] * 2
        )
    with pytest.raises(ValueError, match="classes"):
        register_semantic_folder(unique_name, image_root, sem_seg_root, [])

    missing = str(tmp_path / "nowhere")
    register_semantic_folder(unique_name, image_root, missing, ["a", "b"])
    with pytest.raises(FileNotFoundError, match="nowhere"):
        DatasetCatalog.get(unique_name)

    other = unique_name + "_png"
    register_semantic_folder(other, image_root, sem_seg_root, ["a", "b"], image_ext=".png")
    try:
        with pytest.raises(FileNotFoundError, match=r"\.png"):
            DatasetCatalog.get(other)  # the images are .jpg: nothing pairs
    finally:
        DatasetCatalog.remove(other)
        MetadataCatalog.remove(other)


def _instance_json(tmp_path, category_ids=(7, 3)):
    mask = np.zeros((6, 8), np.uint8)
    mask[1:4, 2:5] = 1
    rle = mask_util.encode(np.asfortranarray(mask))
    rle["counts"] = rle["counts"].decode("ascii")
    data = {
        "images": [{"id": 11, "file_name": "x.jpg", "height": 6, "width": 8}],
        "annotations": [
            {
                "id": 1,
                "image_id": 11,
                "category_id": cid,
                "segmentation": rle,
                "area": 9,
                "bbox": [2, 1, 3, 3],
                "iscrowd": 0,
            }
            for cid in category_ids
        ],
        "categories": [{"id": 7, "name": "car"}, {"id": 3, "name": "bike"}],
    }
    for i, ann in enumerate(data["annotations"]):
        ann["id"] = i + 1
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    _save(np.zeros((6, 8, 3), np.uint8), str(tmp_path / "img" / "x.jpg"))
    return str(path), str(tmp_path / "img")


def test_coco_instance_json(tmp_path, unique_name):
    json_file, image_root = _instance_json(tmp_path)
    register_coco_instance_json(unique_name, json_file, image_root)
    meta = MetadataCatalog.get(unique_name)
    assert (meta.evaluator_type, meta.json_file, meta.image_root) == ("coco", json_file, image_root)

    (record,) = DatasetCatalog.get(unique_name)
    assert record["file_name"] == os.path.join(image_root, "x.jpg")
    # contiguous ids by increasing dataset id: bike (3) -> 0, car (7) -> 1
    assert [a["category_id"] for a in record["annotations"]] == [1, 0]
    assert meta.thing_classes == ["bike", "car"]
    assert meta.thing_dataset_id_to_contiguous_id == {3: 0, 7: 1}


def test_coco_instance_json_errors(tmp_path, unique_name):
    register_coco_instance_json(unique_name, str(tmp_path / "missing.json"), str(tmp_path))
    with pytest.raises(FileNotFoundError, match="missing.json"):
        DatasetCatalog.get(unique_name)

    json_file, image_root = _instance_json(tmp_path, category_ids=(7, 99))
    other = unique_name + "_bad"
    register_coco_instance_json(other, json_file, image_root)
    try:
        with pytest.raises(ValueError, match=r"instances\.json.*99"):
            DatasetCatalog.get(other)
    finally:
        DatasetCatalog.remove(other)
        MetadataCatalog.remove(other)


def test_panoptic_metadata_from_categories():
    meta = panoptic_metadata_from_categories(CATEGORIES)
    assert meta["thing_classes"] == ["person", "car"]
    assert meta["stuff_classes"] == ["person", "car", "road", "sky"]
    assert meta["thing_dataset_id_to_contiguous_id"] == THING_MAP
    assert meta["stuff_dataset_id_to_contiguous_id"] == ALL_MAP
    assert meta["thing_colors"] == [[70, 80, 90], [10, 20, 30]]
    assert meta["stuff_colors"][:3] == [[70, 80, 90], [10, 20, 30], [40, 50, 60]]
    assert len(meta["stuff_colors"][3]) == 3  # sky has no colour: one from the palette

    with pytest.raises(ValueError, match="id 3 appears twice"):
        panoptic_metadata_from_categories(CATEGORIES + [{"id": 3, "name": "x", "isthing": 0}])
    with pytest.raises(ValueError, match="isthing"):
        panoptic_metadata_from_categories([{"id": 1, "name": "x"}])


def _panoptic_dataset(tmp_path, bad_category=None):
    """Two 4 x 6 images: left half road (segment 5), right half a car (9) and a person (12)."""
    ids = np.zeros((4, 6), np.int32)
    ids[:, :3] = 5
    ids[:, 3:] = 9
    ids[2:, 5] = 12
    segments_info = [
        {"id": 5, "category_id": 3, "area": 12, "bbox": [0, 0, 3, 4], "iscrowd": 0},
        {"id": 9, "category_id": 7, "area": 10, "bbox": [3, 0, 3, 4], "iscrowd": 0},
        {"id": 12, "category_id": bad_category or 2, "area": 2, "bbox": [5, 2, 1, 2], "iscrowd": 0},
    ]
    images, annotations = [], []
    for image_id, stem in ((4, "first"), (8, "second")):
        _save(id2rgb(ids), str(tmp_path / "panoptic" / f"{stem}.png"))
        _save(np.zeros((4, 6, 3), np.uint8), str(tmp_path / "images" / f"{stem}.jpg"))
        _save(np.zeros((4, 6), np.uint8), str(tmp_path / "semantic" / f"{stem}.png"))
        images.append({"id": image_id, "file_name": f"{stem}.jpg", "height": 4, "width": 6})
        annotations.append(
            {"image_id": image_id, "file_name": f"{stem}.png", "segments_info": segments_info}
        )
    json_file = tmp_path / "panoptic.json"
    json_file.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES})
    )
    return {
        "image_root": str(tmp_path / "images"),
        "panoptic_root": str(tmp_path / "panoptic"),
        "panoptic_json": str(json_file),
        "sem_seg_root": str(tmp_path / "semantic"),
    }


def test_coco_panoptic_json(tmp_path, unique_name):
    paths = _panoptic_dataset(tmp_path)
    instances_json = str(tmp_path / "instances.json")
    register_coco_panoptic_json(unique_name, instances_json=instances_json, **paths)
    meta = MetadataCatalog.get(unique_name)
    assert meta.evaluator_type == "coco_panoptic_seg"
    assert (meta.ignore_label, meta.label_divisor) == (255, 1000)
    assert meta.thing_classes == ["person", "car"]
    assert meta.stuff_classes == ["person", "car", "road", "sky"]
    assert meta.thing_dataset_id_to_contiguous_id == THING_MAP
    assert meta.stuff_dataset_id_to_contiguous_id == ALL_MAP
    assert meta.json_file == instances_json
    for key, value in paths.items():
        assert getattr(meta, key) == value

    dicts = DatasetCatalog.get(unique_name)
    assert [d["image_id"] for d in dicts] == [4, 8]
    first = dicts[0]
    assert first["file_name"] == os.path.join(paths["image_root"], "first.jpg")
    assert first["pan_seg_file_name"] == os.path.join(paths["panoptic_root"], "first.png")
    assert first["sem_seg_file_name"] == os.path.join(paths["sem_seg_root"], "first.png")
    assert (first["height"], first["width"]) == (4, 6)
    got = [(s["id"], s["category_id"], s["isthing"], s["area"]) for s in first["segments_info"]]
    assert got == [(5, 2, False, 12), (9, 1, True, 10), (12, 0, True, 2)]


def test_coco_panoptic_json_optional_parts(tmp_path, unique_name):
    paths = _panoptic_dataset(tmp_path)
    sem_seg_root = paths.pop("sem_seg_root")
    # categories given: the json is not read at registration, so it may appear later
    os.rename(paths["panoptic_json"], paths["panoptic_json"] + ".later")
    register_coco_panoptic_json(unique_name, categories=CATEGORIES, **paths)
    meta = MetadataCatalog.get(unique_name)
    assert not hasattr(meta, "json_file") and not hasattr(meta, "sem_seg_root")
    assert meta.stuff_dataset_id_to_contiguous_id == ALL_MAP
    with pytest.raises(FileNotFoundError, match="panoptic.json"):
        DatasetCatalog.get(unique_name)
    os.rename(paths["panoptic_json"] + ".later", paths["panoptic_json"])
    assert all("sem_seg_file_name" not in d for d in DatasetCatalog.get(unique_name))
    assert os.path.isdir(sem_seg_root)


def test_coco_panoptic_json_errors(tmp_path, unique_name):
    with pytest.raises(FileNotFoundError, match="absent.json"):
        register_coco_panoptic_json(
            unique_name, str(tmp_path), str(tmp_path), str(tmp_path / "absent.json")
        )

    paths = _panoptic_dataset(tmp_path, bad_category=77)
    register_coco_panoptic_json(unique_name, **dict(paths, image_root=str(tmp_path / "no_images")))
    with pytest.raises(FileNotFoundError, match="no_images"):
        DatasetCatalog.get(unique_name)

    meta = panoptic_metadata_from_categories(CATEGORIES)
    with pytest.raises(ValueError, match=r"panoptic\.json.*category_id 77"):
        load_coco_panoptic_json(
            paths["panoptic_json"], paths["image_root"], paths["panoptic_root"], meta
        )
    with pytest.raises(FileNotFoundError, match="no_semantic"):
        load_coco_panoptic_json(
            paths["panoptic_json"],
            paths["image_root"],
            paths["panoptic_root"],
            meta,
            str(tmp_path / "no_semantic"),
        )
