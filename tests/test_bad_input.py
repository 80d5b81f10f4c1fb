"""Bad input gets a clear error (or a named skip) everywhere, not only in the training mapper:
evaluation labels, NUM_CLASSES against the dataset, weights files, unreadable datasets,
degenerate polygons in evaluation JSONs, 16-bit images in the demo, mismatching checkpoints and
config files with Python tags. Every test writes its own files and checks that the message names
the file / key / value."""
import contextlib
import importlib.util
import json
import logging
import os
import pickle
import uuid
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY, build_model
from detectron2.structures import BitMasks, Instances
from PIL import Image
from torch import nn
from torch.nn import functional as F

from mask_former.checkpoint import MaskFormerCheckpointer
from mask_former.checkpoint.checkpointer import CheckpointLoadError, save_weights_file
from mask_former.config import merge_config_file
from mask_former.data.dataset_mappers import ImageReadError, NoReadableSampleError, build_dataset_mapper
from mask_former.data.datasets import register_coco_instance_json, register_coco_panoptic_json, register_semantic_folder
from mask_former.engine import Trainer
from mask_former.evaluation import CheckedSemSegEvaluator, InstanceSegEvaluator, build_evaluator
from model_utils import base_cfg, tiny_cfg

REPO_ROOT = Path(__file__).resolve().parents[1]
SIZE = 16
CLASSES = ["sky", "road", "tree"]


def load_tool(name):
    spec = importlib.util.spec_from_file_location(f"bad_input_{name.replace('-', '_')}", REPO_ROOT / "tools" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def captured(logger_name, level=logging.WARNING):
    """Records of a logger, whatever its propagation settings (detectron2's setup_logger)."""
    records = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record)

    logger = logging.getLogger(logger_name)
    handler = Collect(level=level)
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(min(previous or level, level))
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


def good_label(seed=0):
    label = np.random.default_rng(seed).integers(0, len(CLASSES), (SIZE, SIZE)).astype(np.uint8)
    label[0, :4] = 255  # a few ignored pixels
    return label


def register_semantic(tmp_path, labels, images=None):
    """A sem_seg dataset of len(labels) images; labels[i] is an array (saved as PNG) or a path.
    Returns (name, records)."""
    name = f"_bad_input_sem_{uuid.uuid4().hex[:8]}"
    records = []
    for i, label in enumerate(labels):
        image = tmp_path / f"img{i}.png"
        if images is None or images[i] is None:
            Image.fromarray(np.full((SIZE, SIZE, 3), 40 * i, np.uint8)).save(image)
        else:
            image = images[i]
        if isinstance(label, np.ndarray):
            path = tmp_path / f"label{i}.png"
            Image.fromarray(label).save(path)
            label = path
        records.append({"file_name": str(image), "sem_seg_file_name": str(label), "image_id": i})
    DatasetCatalog.register(name, lambda: [dict(r) for r in records])
    MetadataCatalog.get(name).set(stuff_classes=list(CLASSES), ignore_label=255, evaluator_type="sem_seg")
    return name, records


def one_hot_scores(label):
    """Model scores whose argmax is ``label`` (ignored pixels predicted as class 0)."""
    label = torch.from_numpy(np.where(label == 255, 0, label).astype(np.int64))
    return F.one_hot(label, len(CLASSES)).permute(2, 0, 1).float()


def evaluate_semantic(name, records, predictions):
    evaluator = CheckedSemSegEvaluator(name, distributed=False)
    evaluator.reset()
    for record, prediction in zip(records, predictions):
        inputs = {"file_name": record["file_name"], "image_id": record["image_id"], "height": SIZE, "width": SIZE}
        evaluator.process([inputs], [{"sem_seg": prediction}])
    return evaluator.evaluate()


# ------------------------------------------------------------------ 1. evaluation checks labels


def test_evaluation_scores_good_labels(tmp_path):
    labels = [good_label(0), good_label(1)]
    name, records = register_semantic(tmp_path, labels)
    results = evaluate_semantic(name, records, [one_hot_scores(label) for label in labels])
    assert results["sem_seg"]["mIoU"] == pytest.approx(100.0)


@pytest.mark.parametrize("kind", ["value_77", "rgb", "other_size", "numbered_from_1"])
def test_evaluation_checks_labels_like_training_and_names_the_file(tmp_path, kind):
    bad = good_label(1)
    expected = []
    if kind == "value_77":
        bad[5, 5] = 77
        expected = ["77", "[0, 3)", "stuff_classes", "ignore value 255"]
    elif kind == "rgb":
        bad = np.repeat(bad[:, :, None], 3, axis=2)
        expected = ["single-channel"]
    elif kind == "other_size":
        bad = bad[:, :-2]
        expected = ["14x16", "16x16", "img1.png"]
    else:
        bad = np.where(bad == 255, 255, bad + 1).astype(np.uint8)  # classes written as 1..3
        expected = ["3", "numbered 1..3", "start at 0"]
    name, records = register_semantic(tmp_path, [good_label(0), bad])
    prediction = one_hot_scores(good_label(0))
    with pytest.raises(ValueError) as e:
        evaluate_semantic(name, records, [prediction, prediction])
    message = str(e.value)
    assert "label1.png" in message, message
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"


def test_evaluation_errors_on_a_missing_label_among_good_ones(tmp_path):
    """Evaluation does not skip: a missing ground-truth file is an error naming it."""
    name, records = register_semantic(tmp_path, [good_label(0), tmp_path / "missing_label.png"])
    prediction = one_hot_scores(good_label(0))
    with pytest.raises(ImageReadError, match="missing_label.png"):
        evaluate_semantic(name, records, [prediction, prediction])


def test_eval_only_path_uses_the_checked_evaluator(tmp_path):
    name, _ = register_semantic(tmp_path, [good_label(0)])
    evaluators = build_evaluator(tiny_cfg(num_classes=len(CLASSES)), name, str(tmp_path))
    assert [type(e).__name__ for e in evaluators._evaluators] == ["CheckedSemSegEvaluator"]


# ------------------------------------------------------------------ 2. NUM_CLASSES vs the dataset


def test_num_classes_disagreeing_with_the_test_dataset_is_named(tmp_path):
    name, _ = register_semantic(tmp_path, [good_label(0)])
    with pytest.raises(ValueError) as e:
        build_evaluator(tiny_cfg(num_classes=8), name, str(tmp_path))
    message = str(e.value)
    for part in ("MODEL.SEM_SEG_HEAD.NUM_CLASSES=8", repr(name), "DATASETS.TEST", "has 3 classes"):
        assert part in message, message


def semantic_train_cfg(dataset_name, num_classes=3):
    cfg = base_cfg()
    cfg.DATASETS.TRAIN = (dataset_name,)
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = num_classes
    cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE = 255
    cfg.INPUT.DATASET_MAPPER_NAME = "mask_former_semantic"
    cfg.INPUT.MIN_SIZE_TRAIN = (SIZE,)
    cfg.INPUT.MAX_SIZE_TRAIN = 1000
    cfg.INPUT.CROP.ENABLED = False
    cfg.INPUT.RANDOM_FLIP = "none"
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.SEED = 1
    return cfg


def test_num_classes_disagreeing_with_the_train_dataset_is_named(tmp_path):
    name, _ = register_semantic(tmp_path, [good_label(0)])
    with pytest.raises(ValueError) as e:
        Trainer.build_train_loader(semantic_train_cfg(name, num_classes=8))
    message = str(e.value)
    for part in ("MODEL.SEM_SEG_HEAD.NUM_CLASSES=8", repr(name), "DATASETS.TRAIN", "has 3 classes"):
        assert part in message, message


def test_instance_dataset_with_more_things_than_the_model_predicts(tmp_path):
    name = f"_bad_input_things_{uuid.uuid4().hex[:8]}"
    record = {"file_name": "a.png", "image_id": 0, "annotations": [{"category_id": 3, "iscrowd": 0}]}
    DatasetCatalog.register(name, lambda: [dict(record)])
    MetadataCatalog.get(name).set(thing_classes=["a", "b", "c", "d"], evaluator_type="coco",
                                  thing_dataset_id_to_contiguous_id={1: 0, 2: 1, 3: 2, 4: 3})
    cfg = semantic_train_cfg(name, num_classes=3)
    with pytest.raises(ValueError, match=r"NUM_CLASSES=3 but dataset '_bad_input_things_\w+' \(DATASETS.TRAIN\) "
                                         r"has thing classes up to contiguous id 3"):
        Trainer.build_train_loader(cfg)


# ------------------------------------------------------------------ 3. weights files


class TinyNet(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = nn.Linear(4, classes)


def corrupt_file(tmp_path, kind):
    if kind == "random.pth":
        data = np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes()
    elif kind == "empty.pth":
        data = b""
    elif kind == "random.pkl":
        data = np.random.default_rng(1).integers(0, 256, 2000, dtype=np.uint8).tobytes()
    elif kind == "lfs_pointer.pth":
        data = b"version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 1000\n"
    elif kind == "page.pkl":
        data = b"<!DOCTYPE html><html><body>Not Found</body></html>"
    else:
        raise AssertionError(kind)
    path = tmp_path / kind
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("kind, hint", [
    ("random.pth", "corrupt"), ("empty.pth", "empty (0 bytes)"), ("random.pkl", "corrupt"),
    ("lfs_pointer.pth", "Git LFS pointer"), ("page.pkl", "HTML"),
])
def test_corrupt_weights_files_are_named_with_the_accepted_formats(tmp_path, kind, hint):
    path = corrupt_file(tmp_path, kind)
    with pytest.raises(CheckpointLoadError) as e:
        MaskFormerCheckpointer(TinyNet()).load(str(path))
    message = str(e.value)
    assert message.startswith(f"{path}: not a checkpoint"), message
    assert hint in message and ".safetensors" in message and ".pkl" in message and ".pth" in message
    assert "weights_only=False" not in message  # never advise the unsafe way


def test_a_pth_holding_other_objects_is_refused_without_running_them(tmp_path):
    path = tmp_path / "with_objects.pth"
    torch.save({"model": TinyNet().state_dict(), "extra": TinyNet()}, path)
    with pytest.raises(CheckpointLoadError) as e:
        MaskFormerCheckpointer(TinyNet()).load(str(path))
    message = str(e.value)
    assert str(path) in message and "weights_only=True" in message and "TinyNet" in message
    assert "weights_only=False" not in message


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "code ran"))


def test_a_pkl_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "marker.txt"
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {"head.bias": np.zeros(3, np.float32)}, "__author__": _RunsCode(marker)}, f)
    with pytest.raises(CheckpointLoadError) as e:
        MaskFormerCheckpointer(TinyNet()).load(str(path))
    assert not marker.exists(), "the pickle's code ran"
    message = str(e.value)
    assert str(path) in message and "pathlib" in message and ".safetensors" in message


def test_numpy_pickles_torch_files_and_safetensors_load(tmp_path):
    source = TinyNet()
    numpy_weights = {k: v.numpy() for k, v in source.state_dict().items()}
    with open(tmp_path / "model.pkl", "wb") as f:  # the published checkpoints' format
        pickle.dump({"model": numpy_weights, "__author__": "test", "matching_heuristics": False}, f)
    torch.save({"model": source.state_dict()}, tmp_path / "model.pth")
    save_weights_file(numpy_weights, str(tmp_path / "model.safetensors"), author="test",
                      matching_heuristics=False)
    for name in ("model.pkl", "model.pth", "model.safetensors"):
        target = TinyNet()
        MaskFormerCheckpointer(target).load(str(tmp_path / name))
        for key, value in source.state_dict().items():
            assert torch.equal(target.state_dict()[key], value), (name, key)


def test_converter_writes_safetensors_that_load_with_matching_heuristics(tmp_path):
    import torchvision

    torch.manual_seed(0)
    resnet = torchvision.models.resnet18()
    torch.save(resnet.state_dict(), tmp_path / "resnet18.pth")
    load_tool("convert-torchvision-to-d2.py").main(
        [str(tmp_path / "resnet18.pth"), str(tmp_path / "resnet18.safetensors")])
    assert (tmp_path / "resnet18.safetensors").read_bytes()[8:9] == b"{", "not a safetensors file"
    cfg = tiny_cfg()
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    model = build_model(cfg)
    MaskFormerCheckpointer(model).load(str(tmp_path / "resnet18.safetensors"))
    assert torch.equal(model.backbone.stem.conv1.weight, resnet.conv1.weight)
    assert torch.equal(model.backbone.res5[1].conv2.weight, resnet.layer4[1].conv2.weight)


# ------------------------------------------------------------------ 8. mismatching checkpoints


def test_shape_mismatch_is_refused_when_mismatches_are_not_allowed(tmp_path):
    path = tmp_path / "eight_classes.pth"
    torch.save({"model": TinyNet(classes=8).state_dict()}, path)
    # default (training, fine-tuning): skipped with detectron2's warning
    MaskFormerCheckpointer(TinyNet(classes=3)).load(str(path))
    with pytest.raises(CheckpointLoadError) as e:
        MaskFormerCheckpointer(TinyNet(classes=3), allow_mismatch=False).load(str(path))
    message = str(e.value)
    assert str(path) in message and "head.weight: (8, 4) in the file, (3, 4) in the model" in message


def test_missing_parameters_are_refused_when_mismatches_are_not_allowed(tmp_path):
    path = tmp_path / "partial.pth"
    state = TinyNet().state_dict()
    del state["head.bias"]
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointLoadError, match=r"partial.pth: .*missing from the file: head.bias"):
        MaskFormerCheckpointer(TinyNet(), allow_mismatch=False).load(str(path))


# ------------------------------------------------------------------ 5. no readable training sample


def test_no_readable_training_sample_names_the_dataset_and_files(tmp_path):
    missing = [str(tmp_path / f"gone{i}.jpg") for i in range(7)]
    name, _ = register_semantic(tmp_path, [good_label(i) for i in range(7)], images=missing)
    loader = Trainer.build_train_loader(semantic_train_cfg(name))
    with captured("mask_former.data.dataset_mappers.base"), pytest.raises(NoReadableSampleError) as e:
        next(iter(loader))
    message = str(e.value)
    assert repr(name) in message and "all 7 were skipped" in message and "and 2 more" in message
    named = [m for m in missing if m in message]
    assert len(named) == 5, message


def test_a_few_unreadable_training_samples_are_still_skipped_by_name(tmp_path):
    images = [None, str(tmp_path / "gone.jpg"), None, None]
    name, _ = register_semantic(tmp_path, [good_label(i) for i in range(4)], images=images)
    loader = Trainer.build_train_loader(semantic_train_cfg(name))
    with captured("mask_former.data.dataset_mappers.base") as records:
        stream = iter(loader)
        batches = [next(stream) for _ in range(4)]
    assert all(len(batch) == 2 for batch in batches)
    messages = [r.getMessage() for r in records]
    assert messages and all("gone.jpg" in m and "skipping sample" in m for m in messages), messages


def test_skip_warning_names_the_failed_label_first(tmp_path):
    image = tmp_path / "photo.png"
    Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(image)
    record = {"file_name": str(image), "sem_seg_file_name": str(tmp_path / "no_label.png"), "image_id": 5}
    mapper = build_dataset_mapper(semantic_train_cfg("_unregistered_"), is_train=True)
    with captured("mask_former.data.dataset_mappers.base") as records:
        assert mapper(record) is None
    message = records[0].getMessage()
    assert f"cannot read {str(tmp_path / 'no_label.png')!r} (the semantic label of image {str(image)!r}" in message
    assert message.index("no_label.png") < message.index("photo.png")


# ------------------------------------------------------------------ 6. degenerate polygons


def test_degenerate_polygon_in_an_evaluation_json_is_dropped_by_name(tmp_path):
    height, width = 20, 30
    square = [3.0, 2.0, 12.0, 2.0, 12.0, 10.0, 3.0, 10.0]
    coco = {
        "images": [{"id": 1, "file_name": "a.png", "height": height, "width": width}],
        "annotations": [
            {"id": 11, "image_id": 1, "category_id": 7, "segmentation": [square], "area": 72.0,
             "iscrowd": 0, "bbox": [3, 2, 9, 8]},
            {"id": 12, "image_id": 1, "category_id": 7, "segmentation": [[5.0, 5.0, 6.0, 6.0]], "area": 0.0,
             "iscrowd": 0, "bbox": [5, 5, 1, 1]},
        ],
        "categories": [{"id": 7, "name": "seven"}],
    }
    json_file = tmp_path / "instances.json"
    json_file.write_text(json.dumps(coco))
    name = f"_bad_input_polygons_{uuid.uuid4().hex[:8]}"
    DatasetCatalog.register(name, lambda: [])
    MetadataCatalog.get(name).set(json_file=str(json_file), thing_classes=["seven"],
                                  thing_dataset_id_to_contiguous_id={7: 0}, evaluator_type="coco")
    with captured("mask_former.evaluation.instance_evaluation") as records:
        evaluator = InstanceSegEvaluator(name, output_dir=str(tmp_path), distributed=False)
    messages = [r.getMessage() for r in records]
    assert len(messages) == 1 and "annotation id 12 of image id 1 ('a.png')" in messages[0], messages
    assert str(json_file) in messages[0] and "[4] coordinates" in messages[0]

    rle = mask_util.frPyObjects([square], height, width)
    mask = torch.from_numpy(mask_util.decode(mask_util.merge(rle)).astype(bool))[None]
    instances = Instances((height, width))
    instances.pred_masks = mask
    instances.pred_boxes = BitMasks(mask).get_bounding_boxes()
    instances.pred_classes = torch.tensor([0])
    instances.scores = torch.tensor([0.9])
    evaluator.reset()
    evaluator.process([{"image_id": 1, "file_name": "a.png", "height": height, "width": width}],
                      [{"instances": instances}])
    assert evaluator.evaluate()["segm"]["AP"] == pytest.approx(100.0)


# ------------------------------------------------------------------ 7. the demo reads like training


@META_ARCH_REGISTRY.register()
class BadInputGreyOracle(nn.Module):
    """Semantic prediction read off the grey level: class = level // 86 (0, 1 or 2)."""

    def __init__(self, cfg):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, batched_inputs):
        results = []
        for x in batched_inputs:
            image = F.interpolate(x["image"][None, :1].float(), size=(x["height"], x["width"]), mode="nearest")
            labels = (image[0, 0].round().long() // 86).clamp(0, 2)
            results.append({"sem_seg": F.one_hot(labels, len(CLASSES)).permute(2, 0, 1).float()})
        return results


demo_tool = load_tool("demo.py")


def oracle_demo_config(tmp_path):
    name = f"_bad_input_demo_{uuid.uuid4().hex[:8]}"
    MetadataCatalog.get(name).set(stuff_classes=list(CLASSES), stuff_colors=[[0, 0, 0], [255, 0, 0], [0, 255, 0]])
    cfg = base_cfg()
    cfg.MODEL.META_ARCHITECTURE = "BadInputGreyOracle"
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = len(CLASSES)
    cfg.DATASETS.TEST = (name,)
    cfg.INPUT.MIN_SIZE_TEST = 32
    cfg.INPUT.MAX_SIZE_TEST = 64
    path = tmp_path / "oracle.yaml"
    path.write_text(cfg.dump())
    return path


def test_demo_predicts_the_same_on_8_and_16_bit_versions_of_an_image(tmp_path):
    levels = np.tile(np.arange(0, 256, 8, dtype=np.uint8), (32, 1))  # 32 x 32 grey ramp
    Image.fromarray(levels, mode="L").save(tmp_path / "ramp8.png")
    Image.fromarray(levels.astype(np.uint16) * 257).save(tmp_path / "ramp16.png")
    assert Image.open(tmp_path / "ramp16.png").mode.startswith("I"), "test setup: not a 16-bit PNG"
    config = oracle_demo_config(tmp_path)
    out = tmp_path / "out"
    status = demo_tool.main(["--config-file", str(config), "--input", str(tmp_path / "ramp8.png"),
                             str(tmp_path / "ramp16.png"), "--output", str(out), "--json"])
    assert status == 0
    labels8 = np.array(Image.open(out / "ramp8_sem_seg.png"))
    labels16 = np.array(Image.open(out / "ramp16_sem_seg.png"))
    assert sorted(np.unique(labels8)) == [0, 1, 2]  # the ramp covers every class
    np.testing.assert_array_equal(labels16, labels8)


def test_demo_names_a_corrupt_weights_file(tmp_path):
    path = corrupt_file(tmp_path, "random.pth")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(CheckpointLoadError, match=f"{path}: not a checkpoint"):
        demo_tool.main(["--config-file", str(oracle_demo_config(tmp_path)), "--input", str(tmp_path / "a.png"),
                        "--output", str(tmp_path / "out"), "--opts", "MODEL.WEIGHTS", str(path)])


# ------------------------------------------------------------------ config files with Python tags


def test_config_with_python_tags_is_refused_without_running_them(tmp_path):
    marker = tmp_path / "marker.txt"
    config = tmp_path / "evil.yaml"
    config.write_text(f"MODEL:\n  DEVICE: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ValueError) as e:
        merge_config_file(base_cfg(), str(config))
    assert not marker.exists(), "the config's code ran"
    message = str(e.value)
    for part in (str(config), "line 2", "!!python/object/apply:os.system", "--allow-unsafe-config"):
        assert part in message, message


def test_python_tag_in_a_base_config_names_that_file(tmp_path):
    (tmp_path / "base.yaml").write_text("INPUT:\n  MIN_SIZE_TRAIN: !!python/tuple [64]\n")
    (tmp_path / "child.yaml").write_text("_BASE_: base.yaml\nSEED: 3\n")
    with pytest.raises(ValueError, match=r"child.yaml' \(.*base.yaml, line 2\) uses the tag !!python/tuple"):
        merge_config_file(base_cfg(), str(tmp_path / "child.yaml"))
    cfg = base_cfg()
    merge_config_file(cfg, str(tmp_path / "child.yaml"), allow_unsafe=True)
    assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == (64,) and cfg.SEED == 3


def test_demo_refuses_a_config_with_python_tags_unless_allowed(tmp_path):
    config = oracle_demo_config(tmp_path)
    tagged = tmp_path / "tagged.yaml"
    tagged.write_text(config.read_text().replace("MIN_SIZE_TEST: 32", "MIN_SIZE_TEST: !!python/int '32'"))
    assert tagged.read_text() != config.read_text(), "test setup: no tag added"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "a.png")
    argv = ["--config-file", str(tagged), "--input", str(tmp_path / "a.png"), "--output", str(tmp_path / "out")]
    with pytest.raises(ValueError, match="tagged.yaml.*--allow-unsafe-config"):
        demo_tool.main(argv)
    assert demo_tool.main(argv[:2] + ["--allow-unsafe-config"] + argv[2:]) == 0
    assert os.path.isfile(tmp_path / "out" / "a.png")


# ---------------------------------------------------------------- malformed JSON, unlabelled images
def test_malformed_coco_instance_json_names_the_file(tmp_path):
    (tmp_path / "images").mkdir()
    bad = tmp_path / "instances.json"
    bad.write_text('{"images": [}')
    register_coco_instance_json("_bad_json_instances", str(bad), str(tmp_path / "images"))
    with pytest.raises(ValueError, match=r"instances\.json: not valid JSON \(.*line 1 column"):
        DatasetCatalog.get("_bad_json_instances")


def test_malformed_coco_panoptic_json_names_the_file(tmp_path):
    for folder in ("images", "panoptic"):
        (tmp_path / folder).mkdir()
    bad = tmp_path / "panoptic.json"
    bad.write_text('{"categories": [{"id": 1,,}]}')
    with pytest.raises(ValueError, match=r"panoptic\.json: not valid JSON \(.*line 1 column"):
        register_coco_panoptic_json("_bad_json_panoptic", str(tmp_path / "images"), str(tmp_path / "panoptic"),
                                    str(bad))


def test_images_without_labels_are_named(tmp_path, caplog):
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    for name in ("a", "b", "lonely"):
        Image.new("RGB", (4, 4)).save(images / f"{name}.jpg")
    for name in ("a", "b", "orphan"):
        Image.new("L", (4, 4)).save(labels / f"{name}.png")
    register_semantic_folder("_unpaired_sem_seg", str(images), str(labels), ["x", "y"])
    with caplog.at_level("WARNING"):
        dicts = DatasetCatalog.get("_unpaired_sem_seg")
    assert len(dicts) == 2
    assert [(os.path.basename(d["file_name"]), os.path.basename(d["sem_seg_file_name"])) for d in dicts] == [
        ("a.jpg", "a.png"), ("b.jpg", "b.png")]
    assert "1 images without a label" in caplog.text and "lonely.jpg" in caplog.text
    assert "1 labels without an image" in caplog.text and "orphan.png" in caplog.text


@pytest.mark.parametrize("content, expected", [
    ([], r"panoptic\.json holds a JSON list, not an object"),
    ({"images": [{"id": 1}], "annotations": []}, r"panoptic\.json: an 'images' entry has no 'file_name'"),
    ({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1, "file_name": "a.png"}]},
     r"panoptic\.json: an annotation has no 'segments_info'"),
    ({"images": [{"id": 1, "file_name": "a.jpg"}],
      "annotations": [{"image_id": 1, "file_name": "a.png", "segments_info": [{"id": 3}]}]},
     r"panoptic\.json: a segment of a\.png has no 'category_id'"),
])
def test_incomplete_coco_panoptic_json_names_the_file_and_key(tmp_path, content, expected):
    for folder in ("images", "panoptic"):
        (tmp_path / folder).mkdir()
    (tmp_path / "panoptic.json").write_text(json.dumps(content))
    name = f"_bad_input_panoptic_{uuid.uuid4().hex[:8]}"
    register_coco_panoptic_json(name, str(tmp_path / "images"), str(tmp_path / "panoptic"),
                                str(tmp_path / "panoptic.json"), categories=[{"id": 1, "name": "a", "isthing": 1}])
    with pytest.raises(ValueError, match=expected):
        DatasetCatalog.get(name)
