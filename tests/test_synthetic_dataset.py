"""The built-in synthetic dataset: determinism, agreement of its three annotation formats,
scene statistics, registration without files, and detectron2's evaluators on its ground truth."""

import filecmp
import importlib.util
import json
import os
import uuid

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, Instances
from panopticapi.utils import rgb2id
from PIL import Image
from pycocotools import mask as mask_util

from mask_former.data.datasets.synthetic import (
    MARKER_FILE,
    NUM_CLASSES,
    SYNTHETIC_CATEGORIES,
    generate_synthetic_dataset,
    register_synthetic_split,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(num_train=8, num_val=4, image_size=64, seed=0)

# written out by hand: things first (dataset ids 1..5), then stuff (101..103)
THING_NAMES = ["circle", "square", "triangle", "cross", "ring"]
ALL_NAMES = THING_NAMES + ["sky", "grass", "water"]
DATASET_ID_TO_CONTIGUOUS = {1: 0, 2: 1, 3: 2, 4: 3, 5: 4, 101: 5, 102: 6, 103: 7}


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    return generate_synthetic_dataset(str(tmp_path_factory.mktemp("synthetic_root")), **SMALL)


@pytest.fixture
def registered(dataset_dir):
    """Register the generated splits under a unique prefix; unregister afterwards."""
    prefix = f"test_synthetic_{uuid.uuid4().hex[:8]}"
    for split in ("train", "val"):
        register_synthetic_split(dataset_dir, split, prefix=prefix)
    yield prefix
    for name in list(DatasetCatalog.list()):
        if name.startswith(prefix):
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


def _relative_files(folder):
    return sorted(
        os.path.relpath(os.path.join(dirpath, f), folder)
        for dirpath, _, files in os.walk(folder)
        for f in files
    )


def _read_split(dataset_dir, split):
    """Per image: (panoptic id map, segments_info, semantic map, instance annotations)."""
    with open(os.path.join(dataset_dir, f"panoptic_{split}.json")) as f:
        panoptic = json.load(f)
    with open(os.path.join(dataset_dir, f"instances_{split}.json")) as f:
        instances = json.load(f)
    images = []
    for ann in panoptic["annotations"]:
        pan = rgb2id(
            np.array(Image.open(os.path.join(dataset_dir, f"panoptic_{split}", ann["file_name"])))
        )
        sem = np.array(Image.open(os.path.join(dataset_dir, f"semantic_{split}", ann["file_name"])))
        inst = [a for a in instances["annotations"] if a["image_id"] == ann["image_id"]]
        images.append((pan, ann["segments_info"], sem, inst))
    return panoptic, instances, images


def _adjacent(mask_a, mask_b):
    """Whether two disjoint H x W bool masks share an edge (4-neighbourhood)."""
    grown = mask_a.copy()
    grown[1:] |= mask_a[:-1]
    grown[:-1] |= mask_a[1:]
    grown[:, 1:] |= mask_a[:, :-1]
    grown[:, :-1] |= mask_a[:, 1:]
    return bool((grown & mask_b).any())


def test_categories_things_first_with_noncontiguous_ids():
    assert [c["name"] for c in SYNTHETIC_CATEGORIES] == ALL_NAMES
    assert {c["id"]: i for i, c in enumerate(SYNTHETIC_CATEGORIES)} == DATASET_ID_TO_CONTIGUOUS
    assert [bool(c["isthing"]) for c in SYNTHETIC_CATEGORIES] == [True] * 5 + [False] * 3
    assert NUM_CLASSES == 8


def test_generation_is_deterministic_and_seeded(dataset_dir, tmp_path):
    same = generate_synthetic_dataset(str(tmp_path / "same"), **SMALL)
    files = _relative_files(dataset_dir)
    assert files == _relative_files(same)
    assert len([f for f in files if f.startswith("images")]) == 12
    _, mismatch, errors = filecmp.cmpfiles(dataset_dir, same, files, shallow=False)
    assert mismatch == [] and errors == []

    other = generate_synthetic_dataset(str(tmp_path / "other"), **dict(SMALL, seed=1))
    for split, count in (("train", 8), ("val", 4)):
        for index in range(1, count + 1):
            name = os.path.join("images", split, f"{index:06d}.png")
            a = np.array(Image.open(os.path.join(dataset_dir, name)))
            b = np.array(Image.open(os.path.join(other, name)))
            assert not np.array_equal(a, b), name
    # train and val are not copies of each other
    a = np.array(Image.open(os.path.join(dataset_dir, "images", "train", "000001.png")))
    b = np.array(Image.open(os.path.join(dataset_dir, "images", "val", "000001.png")))
    assert not np.array_equal(a, b)


def test_generation_is_idempotent_and_replaces_other_parameters(tmp_path):
    params = dict(num_train=3, num_val=2, image_size=32, seed=5)
    dataset_dir = generate_synthetic_dataset(str(tmp_path), **params)
    image = os.path.join(dataset_dir, "images", "train", "000003.png")
    os.utime(image, (1, 1))  # a rewrite would change the mtime
    assert generate_synthetic_dataset(str(tmp_path), **params) == dataset_dir
    assert os.stat(image).st_mtime == 1
    with open(os.path.join(dataset_dir, MARKER_FILE)) as f:
        assert {k: v for k, v in json.load(f).items() if k in params} == params

    generate_synthetic_dataset(str(tmp_path), **dict(params, num_train=2))
    assert sorted(os.listdir(os.path.join(dataset_dir, "images", "train"))) == [
        "000001.png",
        "000002.png",
    ]
    assert sorted(os.listdir(os.path.join(dataset_dir, "semantic_train"))) == [
        "000001.png",
        "000002.png",
    ]
    # no temporary folders left next to the dataset
    assert os.listdir(str(tmp_path)) == ["synthetic"]


def test_the_three_formats_agree_pixel_for_pixel(dataset_dir):
    for split, count in (("train", 8), ("val", 4)):
        panoptic, instances, images = _read_split(dataset_dir, split)
        assert [c["id"] for c in panoptic["categories"]] == [1, 2, 3, 4, 5, 101, 102, 103]
        assert [c["id"] for c in instances["categories"]] == [1, 2, 3, 4, 5]
        assert [img["id"] for img in panoptic["images"]] == list(range(1, count + 1))
        assert instances["images"] == panoptic["images"]
        for pan, segments_info, sem, inst in images:
            assert pan.shape == sem.shape == (64, 64)
            ids = [s["id"] for s in segments_info]
            assert len(set(ids)) == len(ids)
            # every pixel belongs to a listed segment (no void), and each segment has pixels
            assert set(np.unique(pan).tolist()) == set(ids)

            expected_sem = np.full(pan.shape, -1)
            for segment in segments_info:
                mask = pan == segment["id"]
                expected_sem[mask] = DATASET_ID_TO_CONTIGUOUS[segment["category_id"]]
                assert segment["area"] == mask.sum()
                rows, cols = np.nonzero(mask)
                bbox = [
                    cols.min(),
                    rows.min(),
                    cols.max() - cols.min() + 1,
                    rows.max() - rows.min() + 1,
                ]
                assert segment["bbox"] == bbox
                assert segment["iscrowd"] == 0
            np.testing.assert_array_equal(sem, expected_sem)

            things = [s for s in segments_info if s["category_id"] < 100]
            assert len(inst) == len(things)
            matched = set()
            for ann in inst:
                decoded = mask_util.decode(ann["segmentation"]).astype(bool)
                same = [s for s in things if np.array_equal(decoded, pan == s["id"])]
                assert len(same) == 1, f"instance {ann['id']} matches no panoptic segment"
                assert same[0]["category_id"] == ann["category_id"]
                assert ann["area"] == decoded.sum() and ann["iscrowd"] == 0
                assert ann["bbox"] == same[0]["bbox"]
                matched.add(same[0]["id"])
            assert len(matched) == len(things)


def test_scenes_have_something_to_learn(dataset_dir):
    num_things, adjacent_pairs, seen = [], 0, set()
    for split in ("train", "val"):
        _, _, images = _read_split(dataset_dir, split)
        for pan, segments_info, _sem, _ in images:
            stuff = [s for s in segments_info if s["category_id"] > 100]
            things = [s for s in segments_info if s["category_id"] < 100]
            assert len({s["category_id"] for s in stuff}) >= 2
            assert len(things) >= 1
            assert all(s["area"] >= 30 * (64 / 128) ** 2 for s in things)  # 30 px at 128 x 128
            num_things.append(len(things))
            seen.update(s["category_id"] for s in segments_info)
            masks = [pan == s["id"] for s in things]
            adjacent_pairs += sum(
                _adjacent(masks[i], masks[j])
                for i in range(len(masks))
                for j in range(i + 1, len(masks))
            )
    assert np.mean(num_things) >= 2.0
    assert adjacent_pairs >= 3  # overlapping or touching instances
    assert seen == set(DATASET_ID_TO_CONTIGUOUS)

    image = np.array(Image.open(os.path.join(dataset_dir, "images", "train", "000001.png")))
    assert image.dtype == np.uint8 and image.shape == (64, 64, 3)
    # textured: neighbouring pixels inside a region differ
    assert np.abs(np.diff(image.astype(int), axis=1)).mean() > 2


def test_registered_datasets_load(registered):
    prefix = registered
    dicts = DatasetCatalog.get(f"{prefix}_panoptic_val")
    assert [d["image_id"] for d in dicts] == [1, 2, 3, 4]
    for d in dicts:
        assert (d["height"], d["width"]) == (64, 64)
        for key in ("file_name", "pan_seg_file_name", "sem_seg_file_name"):
            assert os.path.isfile(d[key]), key
        assert os.path.basename(d["file_name"]) == os.path.basename(d["sem_seg_file_name"])
        pan = rgb2id(np.array(Image.open(d["pan_seg_file_name"])))
        sem = np.array(Image.open(d["sem_seg_file_name"]))
        for segment in d["segments_info"]:
            mask = pan == segment["id"]
            # contiguous id, the one the semantic PNG has there
            assert np.all(sem[mask] == segment["category_id"])
            assert segment["isthing"] == (segment["category_id"] < 5)

    sem_dicts = DatasetCatalog.get(f"{prefix}_sem_seg_train")
    assert len(sem_dicts) == 8
    assert all(
        os.path.basename(d["file_name"]) == os.path.basename(d["sem_seg_file_name"])
        for d in sem_dicts
    )

    inst_dicts = DatasetCatalog.get(f"{prefix}_instance_val")
    assert len(inst_dicts) == 4
    for d, pan_d in zip(sorted(inst_dicts, key=lambda d: d["image_id"]), dicts):
        things = sorted(s["category_id"] for s in pan_d["segments_info"] if s["isthing"])
        assert sorted(a["category_id"] for a in d["annotations"]) == things
    # loading the instance json keeps the metadata that registration set
    assert MetadataCatalog.get(f"{prefix}_instance_val").thing_classes == THING_NAMES


def test_metadata_complete_without_files(tmp_path):
    missing_root = tmp_path / "does_not_exist"
    prefix = f"test_synthetic_missing_{uuid.uuid4().hex[:8]}"
    register_synthetic_split(str(missing_root / "synthetic"), "val", prefix=prefix)
    try:
        pan = MetadataCatalog.get(f"{prefix}_panoptic_val")
        assert pan.evaluator_type == "coco_panoptic_seg"
        assert pan.thing_classes == THING_NAMES and pan.stuff_classes == ALL_NAMES
        assert pan.thing_dataset_id_to_contiguous_id == {i: i - 1 for i in range(1, 6)}
        assert pan.stuff_dataset_id_to_contiguous_id == DATASET_ID_TO_CONTIGUOUS
        assert len(pan.thing_colors) == 5 and len(pan.stuff_colors) == 8
        assert (pan.ignore_label, pan.label_divisor) == (255, 1000)
        assert pan.panoptic_json == str(missing_root / "synthetic" / "panoptic_val.json")
        assert pan.json_file == str(missing_root / "synthetic" / "instances_val.json")
        for key in ("panoptic_root", "image_root", "sem_seg_root"):
            assert getattr(pan, key).startswith(str(missing_root))

        sem = MetadataCatalog.get(f"{prefix}_sem_seg_val")
        assert (sem.evaluator_type, sem.stuff_classes, sem.ignore_label) == (
            "sem_seg",
            ALL_NAMES,
            255,
        )
        inst = MetadataCatalog.get(f"{prefix}_instance_val")
        assert (inst.evaluator_type, inst.thing_classes) == ("coco", THING_NAMES)
        assert inst.thing_dataset_id_to_contiguous_id == {i: i - 1 for i in range(1, 6)}

        for kind in ("panoptic", "sem_seg", "instance"):
            with pytest.raises(FileNotFoundError) as excinfo:
                DatasetCatalog.get(f"{prefix}_{kind}_val")
            assert str(missing_root) in str(excinfo.value)
            assert "prepare_synthetic.py" in str(excinfo.value)
        assert not missing_root.exists()
    finally:
        for kind in ("panoptic", "sem_seg", "instance"):
            DatasetCatalog.remove(f"{prefix}_{kind}_val")
            MetadataCatalog.remove(f"{prefix}_{kind}_val")


def test_import_registers_standard_names_under_env_root():
    # registered when the module was imported, with the root the environment gave then
    root = os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))
    for kind in ("panoptic", "sem_seg", "instance"):
        for split in ("train", "val"):
            assert f"synthetic_{kind}_{split}" in DatasetCatalog.list()
    meta = MetadataCatalog.get("synthetic_panoptic_train")
    assert meta.panoptic_json == os.path.join(root, "synthetic", "panoptic_train.json")
    assert meta.stuff_classes == ALL_NAMES
    assert MetadataCatalog.get("synthetic_instance_val").json_file == os.path.join(
        root, "synthetic", "instances_val.json"
    )


def test_prepare_script(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "prepare_synthetic", os.path.join(REPO_ROOT, "datasets", "prepare_synthetic.py")
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    argv = [
        "--root",
        str(tmp_path),
        "--num-train",
        "2",
        "--num-val",
        "1",
        "--size",
        "32",
        "--seed",
        "3",
    ]
    dataset_dir = script.main(argv)
    assert dataset_dir == os.path.join(str(tmp_path), "synthetic")
    assert sorted(os.listdir(os.path.join(dataset_dir, "panoptic_train"))) == [
        "000001.png",
        "000002.png",
    ]
    assert os.listdir(os.path.join(dataset_dir, "panoptic_val")) == ["000001.png"]
    image = Image.open(os.path.join(dataset_dir, "images", "val", "000001.png"))
    assert image.size == (32, 32) and image.mode == "RGB"


def test_evaluators_score_ground_truth_perfectly(registered):
    """train_net's evaluators work from the registered metadata: ground truth scores 100."""
    from detectron2.evaluation import COCOEvaluator, COCOPanopticEvaluator, SemSegEvaluator

    name = f"{registered}_panoptic_val"
    dicts = DatasetCatalog.get(name)
    evaluators = [
        COCOPanopticEvaluator(name),
        SemSegEvaluator(name, distributed=False),
        COCOEvaluator(name, tasks=("segm",), distributed=False, use_fast_impl=False),
    ]
    for evaluator in evaluators:
        evaluator.reset()
    for d in dicts:
        pan = rgb2id(np.array(Image.open(d["pan_seg_file_name"])))
        sem = torch.as_tensor(np.array(Image.open(d["sem_seg_file_name"])).astype(np.int64))
        things = [s for s in d["segments_info"] if s["isthing"]]
        instances = Instances((d["height"], d["width"]))
        masks = torch.stack([torch.as_tensor(pan == s["id"]) for s in things])
        instances.pred_masks = masks
        instances.pred_classes = torch.tensor([s["category_id"] for s in things])
        instances.scores = torch.ones(len(things))
        instances.pred_boxes = Boxes(torch.tensor([[0.0, 0.0, 1.0, 1.0]] * len(things)))
        output = {
            "panoptic_seg": (
                torch.as_tensor(pan.astype(np.int32)),
                [
                    dict(id=s["id"], category_id=s["category_id"], isthing=s["isthing"])
                    for s in d["segments_info"]
                ],
            ),
            "sem_seg": torch.nn.functional.one_hot(sem, NUM_CLASSES).permute(2, 0, 1).float(),
            "instances": instances,
        }
        inputs = [
            {"file_name": d["file_name"], "image_id": d["image_id"], "height": 64, "width": 64}
        ]
        for evaluator in evaluators:
            evaluator.process(inputs, [output])
    panoptic, semantic, instance = [evaluator.evaluate() for evaluator in evaluators]
    assert panoptic["panoptic_seg"]["PQ"] == pytest.approx(100.0)
    assert semantic["sem_seg"]["mIoU"] == pytest.approx(100.0)
    assert instance["segm"]["AP"] == pytest.approx(100.0)


@pytest.mark.parametrize(
    "bad", [dict(image_size=8), dict(num_train=-1), dict(max_instances=0), dict(seed=1.5)]
)
def test_generation_rejects_bad_parameters(tmp_path, bad):
    key = next(iter(bad))
    with pytest.raises(ValueError, match=key):
        generate_synthetic_dataset(str(tmp_path / "root"), **dict(SMALL, **bad))
    assert not (tmp_path / "root").exists()
