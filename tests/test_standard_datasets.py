"""Registration of the standard datasets: complete metadata without any file, loaders on tiny
hand-made datasets, FileNotFoundError on a missing root."""
import contextlib
import json
import os

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import builtin
from detectron2.data.datasets.builtin_meta import ADE20K_SEM_SEG_CATEGORIES

from mask_former.data.datasets import standard
from mask_former.data.datasets.registration import datasets_root, load_sem_seg_checked
from mask_former.data.datasets.standard import (
    get_ade20k_panoptic_metadata,
    get_coco_panoptic_metadata,
    register_ade20k_panoptic,
    register_coco_panoptic_with_sem_seg,
)

# name -> (number of classes, ignore_label, evaluator_type), from the MaskFormer paper / configs.
EXPECTED = {
    "ade20k_sem_seg_train": (150, 255, "sem_seg"),
    "ade20k_sem_seg_val": (150, 255, "sem_seg"),
    "ade20k_panoptic_train": (150, 255, "ade20k_panoptic_seg"),
    "ade20k_panoptic_val": (150, 255, "ade20k_panoptic_seg"),
    "ade20k_full_sem_seg_train": (847, 65535, "sem_seg"),
    "ade20k_full_sem_seg_val": (847, 65535, "sem_seg"),
    "coco_2017_train_stuff_10k_sem_seg": (171, 255, "sem_seg"),
    "coco_2017_test_stuff_10k_sem_seg": (171, 255, "sem_seg"),
    "mapillary_vistas_sem_seg_train": (65, 65, "sem_seg"),
    "mapillary_vistas_sem_seg_val": (65, 65, "sem_seg"),
    "coco_2017_train_panoptic": (133, 255, "coco_panoptic_seg"),
    "coco_2017_val_panoptic": (133, 255, "coco_panoptic_seg"),
    "cityscapes_fine_sem_seg_train": (19, 255, "cityscapes_sem_seg"),
    "cityscapes_fine_sem_seg_val": (19, 255, "cityscapes_sem_seg"),
    "cityscapes_fine_sem_seg_test": (19, 255, "cityscapes_sem_seg"),
}

# Train / test sets named by the model-zoo configs (README.md, "Model zoo").
MODEL_ZOO_DATASETS = [
    "ade20k_panoptic_train", "ade20k_panoptic_val", "ade20k_sem_seg_train", "ade20k_sem_seg_val",
    "ade20k_full_sem_seg_train", "ade20k_full_sem_seg_val", "cityscapes_fine_sem_seg_train",
    "cityscapes_fine_sem_seg_val", "coco_2017_train_panoptic", "coco_2017_val_panoptic",
    "coco_2017_train_stuff_10k_sem_seg", "coco_2017_test_stuff_10k_sem_seg",
    "mapillary_vistas_sem_seg_train", "mapillary_vistas_sem_seg_val",
]  # fmt: skip


def test_every_model_zoo_dataset_is_registered():
    registered = set(DatasetCatalog.list())
    assert set(MODEL_ZOO_DATASETS) <= registered
    assert set(standard.STANDARD_DATASET_NAMES) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_metadata_is_complete(name):
    num_classes, ignore_label, evaluator_type = EXPECTED[name]
    meta = MetadataCatalog.get(name)
    assert len(meta.stuff_classes) == num_classes
    assert len(meta.stuff_colors) == num_classes
    for color in meta.stuff_colors:
        assert len(color) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in color), color
    assert meta.ignore_label == ignore_label
    assert meta.evaluator_type == evaluator_type
    if hasattr(meta, "stuff_dataset_id_to_contiguous_id"):
        mapping = meta.stuff_dataset_id_to_contiguous_id
        assert sorted(mapping.values()) == list(range(num_classes))


@pytest.mark.parametrize("name", ["ade20k_panoptic_val", "coco_2017_val_panoptic"])
def test_panoptic_metadata_id_maps(name):
    meta = MetadataCatalog.get(name)
    num_classes, num_things = {
        "ade20k_panoptic_val": (150, 100),
        "coco_2017_val_panoptic": (133, 80),
    }[name]
    assert meta.thing_classes == meta.stuff_classes
    assert len(meta.thing_colors) == num_classes
    assert len(meta.thing_dataset_id_to_contiguous_id) == num_things
    assert len(meta.stuff_dataset_id_to_contiguous_id) == num_classes
    # things are a subset of all categories, with the same contiguous ids
    for dataset_id, contiguous_id in meta.thing_dataset_id_to_contiguous_id.items():
        assert meta.stuff_dataset_id_to_contiguous_id[dataset_id] == contiguous_id
    assert meta.label_divisor == 1000
    for key in ["image_root", "panoptic_root", "panoptic_json", "sem_seg_root", "json_file"]:
        assert isinstance(getattr(meta, key), str)


def test_ade20k_facts():
    sem = MetadataCatalog.get("ade20k_sem_seg_val")
    pan = MetadataCatalog.get("ade20k_panoptic_val")
    # same 150 names as detectron2's own ADE20K list, and the same colours for both tasks
    assert pan.stuff_classes == list(ADE20K_SEM_SEG_CATEGORIES)
    assert sem.stuff_colors == pan.stuff_colors
    assert sem.stuff_colors[0] == [120, 120, 120] and sem.stuff_colors[149] == [92, 0, 255]
    # ids 0..149 map to themselves; things by name
    assert pan.stuff_dataset_id_to_contiguous_id == {i: i for i in range(150)}
    things = pan.thing_dataset_id_to_contiguous_id
    names = pan.stuff_classes
    for thing in ["bed", "person", "car", "trash can", "flag", "window "]:
        assert names.index(thing) in things, thing
    for stuff in ["wall", "sky", "floor", "road, route", "grass", "pier"]:
        assert names.index(stuff) not in things, stuff
    assert pan.json_file.endswith(os.path.join("ADEChallengeData2016", "ade20k_instance_val.json"))
    assert pan.sem_seg_root.endswith(os.path.join("annotations_detectron2", "validation"))


def test_ade20k_full_facts():
    meta = MetadataCatalog.get("ade20k_full_sem_seg_val")
    assert meta.stuff_classes[0] == "wall"
    assert meta.stuff_classes[11] == "person, individual, someone, somebody, mortal, soul"
    assert meta.stuff_classes[846] == "adding machine, totalizer, totaliser"
    assert len(set(meta.stuff_classes)) == 847
    mapping = meta.stuff_dataset_id_to_contiguous_id
    assert len(mapping) == 847
    assert (mapping[2978], mapping[1831], mapping[3148]) == (0, 11, 846)
    assert meta.sem_seg_root.endswith(
        os.path.join("ADE20K_2021_17_01", "annotations_detectron2", "validation")
    )


def test_coco_stuff_10k_facts():
    meta = MetadataCatalog.get("coco_2017_test_stuff_10k_sem_seg")
    mapping = meta.stuff_dataset_id_to_contiguous_id
    # 80 things (COCO ids 1..90 with gaps) then 91 stuff (92..182)
    assert (mapping[1], mapping[90], mapping[92], mapping[182]) == (0, 79, 80, 170)
    assert 12 not in mapping and 91 not in mapping
    names = meta.stuff_classes
    assert [names[i] for i in (0, 79, 80, 170)] == ["person", "toothbrush", "banner", "wood"]
    assert len(set(names)) == 171
    assert meta.stuff_colors[0] == [220, 20, 60]  # detectron2's COCO colour of "person"


def test_mapillary_and_cityscapes_facts():
    mapillary = MetadataCatalog.get("mapillary_vistas_sem_seg_train")
    assert mapillary.stuff_classes[0] == "Bird" and mapillary.stuff_classes[64] == "Ego Vehicle"
    assert mapillary.stuff_colors[13] == [128, 64, 128]  # Road
    cityscapes = MetadataCatalog.get("cityscapes_fine_sem_seg_val")
    assert cityscapes.stuff_classes[0] == "road" and cityscapes.stuff_colors[0] == [128, 64, 128]
    assert cityscapes.stuff_classes[18] == "bicycle"
    assert cityscapes.stuff_colors[18] == [119, 11, 32]


def test_coco_panoptic_facts():
    meta = MetadataCatalog.get("coco_2017_val_panoptic")
    mapping = meta.stuff_dataset_id_to_contiguous_id
    # things first (ids 1..90), then stuff (92..200), in id order
    assert (mapping[1], mapping[3], mapping[90], mapping[92], mapping[200]) == (0, 2, 79, 80, 132)
    assert sorted(meta.thing_dataset_id_to_contiguous_id.values()) == list(range(80))
    names = meta.stuff_classes
    assert (names[0], names[80], names[132]) == ("person", "banner", "rug-merged")
    assert meta.sem_seg_root.endswith(os.path.join("coco", "panoptic_semseg_val2017"))
    assert meta.json_file.endswith(os.path.join("annotations", "instances_val2017.json"))


# ---------------------------------------------------------------- loaders on tiny datasets
def _write_panoptic_layout(root, image_ids, segments_info, image_ext=".jpg"):
    """Empty stand-in files are enough: the loaders do not decode images."""
    layout = {key: root / key for key in ["images", "panoptic", "semantic"]}
    for folder in layout.values():
        folder.mkdir(parents=True)
    annotations = []
    for image_id, stem in image_ids:
        (layout["images"] / (stem + image_ext)).write_bytes(b"")
        (layout["panoptic"] / (stem + ".png")).write_bytes(b"")
        (layout["semantic"] / (stem + ".png")).write_bytes(b"")
        annotations.append(
            {"image_id": image_id, "file_name": stem + ".png", "segments_info": segments_info}
        )
    json_file = root / "panoptic.json"
    json_file.write_text(json.dumps({"images": [], "annotations": annotations, "categories": []}))
    return json_file, layout


def test_ade20k_panoptic_loader(tmp_path):
    segments = [
        {"id": 1000, "category_id": 0, "area": 10, "bbox": [0, 0, 2, 5], "iscrowd": 0},  # wall
        {"id": 13001, "category_id": 12, "area": 4, "bbox": [2, 2, 2, 2], "iscrowd": 0},  # person
    ]
    stem = "ADE_val_00000001"
    json_file, layout = _write_panoptic_layout(tmp_path, [(stem, stem)], segments)
    name = "_test_ade20k_panoptic_loader"
    register_ade20k_panoptic(
        name, get_ade20k_panoptic_metadata(), str(layout["images"]), str(layout["panoptic"]),
        str(json_file), str(layout["semantic"]), str(tmp_path / "instances.json"),
    )  # fmt: skip
    try:
        (record,) = DatasetCatalog.get(name)
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    assert record["file_name"] == str(layout["images"] / "ADE_val_00000001.jpg")
    assert record["pan_seg_file_name"] == str(layout["panoptic"] / "ADE_val_00000001.png")
    assert record["sem_seg_file_name"] == str(layout["semantic"] / "ADE_val_00000001.png")
    assert record["image_id"] == "ADE_val_00000001"
    got = [(s["id"], s["category_id"], s["isthing"], s["area"]) for s in record["segments_info"]]
    assert got == [(1000, 0, False, 10), (13001, 12, True, 4)]


def _register_tiny_coco(tmp_path, name, segments):
    json_file, layout = _write_panoptic_layout(tmp_path, [(139, "000000000139")], segments)
    register_coco_panoptic_with_sem_seg(
        name, get_coco_panoptic_metadata(), str(layout["images"]), str(layout["panoptic"]),
        str(json_file), str(layout["semantic"]), str(tmp_path / "instances.json"),
    )  # fmt: skip
    return layout


def test_coco_panoptic_loader(tmp_path):
    segments = [
        {"id": 5, "category_id": 1, "area": 3, "bbox": [0, 0, 1, 3], "iscrowd": 0},  # person
        {"id": 6, "category_id": 3, "area": 2, "bbox": [1, 0, 1, 2], "iscrowd": 1},  # car, crowd
        {"id": 7, "category_id": 92, "area": 8, "bbox": [0, 0, 4, 2], "iscrowd": 0},  # banner
        {"id": 8, "category_id": 200, "area": 1, "bbox": [3, 3, 1, 1], "iscrowd": 0},  # rug-merged
    ]
    name = "_test_coco_panoptic_loader"
    layout = _register_tiny_coco(tmp_path, name, segments)
    try:
        (record,) = DatasetCatalog.get(name)
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    assert record["image_id"] == 139
    assert record["file_name"] == str(layout["images"] / "000000000139.jpg")
    assert record["sem_seg_file_name"] == str(layout["semantic"] / "000000000139.png")
    got = [(s["id"], s["category_id"], s["isthing"], s["iscrowd"]) for s in record["segments_info"]]
    assert got == [(5, 0, True, 0), (6, 2, True, 1), (7, 80, False, 0), (8, 132, False, 0)]


def test_coco_panoptic_loader_rejects_unknown_category(tmp_path):
    name = "_test_coco_panoptic_unknown"
    _register_tiny_coco(tmp_path, name, [{"id": 5, "category_id": 12, "area": 1, "iscrowd": 0}])
    try:
        with pytest.raises(ValueError, match="category_id 12"):
            DatasetCatalog.get(name)
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_coco_panoptic_loader_names_missing_semantic_folder(tmp_path):
    name = "_test_coco_panoptic_no_semantic"
    layout = _register_tiny_coco(tmp_path, name, [])
    for f in layout["semantic"].iterdir():
        f.unlink()
    layout["semantic"].rmdir()
    try:
        with pytest.raises(FileNotFoundError) as error:
            DatasetCatalog.get(name)
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    message = str(error.value)
    assert str(layout["semantic"]) in message
    assert "prepare_coco_panoptic_sem_seg.py" in message and "datasets/README.md" in message


# ---------------------------------------------------------------- missing root
@contextlib.contextmanager
def _empty_catalogs():
    """Run with empty DatasetCatalog / MetadataCatalog, restoring them afterwards."""
    saved = [(catalog, dict(catalog.data)) for catalog in (DatasetCatalog, MetadataCatalog)]
    try:
        for catalog, _ in saved:
            catalog.data.clear()
        yield
    finally:
        for catalog, data in saved:
            catalog.data.clear()
            catalog.data.update(data)


def test_registration_reads_the_datasets_root_from_the_environment(monkeypatch):
    # the catalog was registered at import under the root conftest.py exported
    expected_root = os.path.join(os.environ["DETECTRON2_DATASETS"], "ADEChallengeData2016")
    assert MetadataCatalog.get("ade20k_panoptic_val").image_root.startswith(expected_root)
    monkeypatch.setenv("DETECTRON2_DATASETS", "/some/where")
    assert datasets_root() == "/some/where"
    monkeypatch.delenv("DETECTRON2_DATASETS")
    assert datasets_root() == "datasets"


def test_missing_root_raises_file_not_found_naming_the_path(tmp_path):
    root = str(tmp_path / "no_datasets_here")
    with _empty_catalogs():
        # detectron2's builtin registrations of the names we only complete, then ours
        builtin.register_all_ade20k(root)
        builtin.register_all_cityscapes(root)
        standard.register_all_standard(root)
        assert set(EXPECTED) <= set(DatasetCatalog.list())
        for name, (num_classes, _, _) in EXPECTED.items():
            meta = MetadataCatalog.get(name)
            assert len(meta.stuff_classes) == len(meta.stuff_colors) == num_classes, name
            with pytest.raises(FileNotFoundError) as error:
                DatasetCatalog.get(name)
            assert root in str(error.value), (name, str(error.value))
            if not name.startswith(("ade20k_sem_seg", "cityscapes")):  # detectron2's loaders
                assert "datasets/README.md" in str(error.value), (name, str(error.value))
    assert not os.path.exists(root), "registration and loading must not create the root"


def test_loading_a_real_semantic_layout(tmp_path):
    """Mapillary-style folders with two images load as two (image, label) pairs."""
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    for stem in ["b", "a"]:
        (images / f"{stem}.jpg").write_bytes(b"")
        (labels / f"{stem}.png").write_bytes(b"")
    records = load_sem_seg_checked("_test", str(labels), str(images))
    assert [(r["file_name"], r["sem_seg_file_name"]) for r in records] == [
        (str(images / "a.jpg"), str(labels / "a.png")),
        (str(images / "b.jpg"), str(labels / "b.png")),
    ]
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "missing")):
        load_sem_seg_checked("_test", str(tmp_path / "missing"), str(images))
