"""tools/demo.py and mask_former.demo.

Most tests run the demo on an "oracle" meta-architecture registered here, whose predictions are a
known function of the image (grey level -> class, each grey level of a thing -> one instance whose
score is level / 255), so every expected file content is worked out by hand from the drawn
rectangles. One test runs the real tiny MaskFormer against detectron2's DefaultPredictor, and one
runs the script as a subprocess.
"""
import importlib.util
import json
import logging
import os
import subprocess
import sys
import uuid
from pathlib import Path

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultPredictor
from detectron2.modeling import META_ARCH_REGISTRY, build_model
from detectron2.structures import BitMasks, Instances
from panopticapi.utils import rgb2id
from PIL import Image
from torch import nn
from torch.nn import functional as F

from model_utils import base_cfg, tiny_cfg

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO = REPO_ROOT / "tools" / "demo.py"

THING_CLASSES = ["cat", "dog"]
STUFF_CLASSES = ["cat", "dog", "sky"]  # all classes, things first (contiguous ids 0, 1, 2)
SKY = 2


def load_demo():
    spec = importlib.util.spec_from_file_location("maskformer_demo_tool", DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


demo_tool = load_demo()


def grey_level_class(level: int) -> int:
    """The oracle's rule: dark is sky (stuff), mid grey is cat, light grey is dog."""
    if level < 64:
        return SKY
    return 0 if level < 192 else 1


@META_ARCH_REGISTRY.register()
class DemoTestOracle(nn.Module):
    """Predictions read off a grey image: class by grey level (grey_level_class); all sky pixels
    are one stuff segment; each thing grey level is one instance with score level / 255."""

    def __init__(self, cfg):
        super().__init__()
        test = cfg.MODEL.MASK_FORMER.TEST
        self.on = {"sem_seg": test.SEMANTIC_ON, "panoptic_seg": test.PANOPTIC_ON, "instances": test.INSTANCE_ON}
        self.register_buffer("dummy", torch.zeros(1), False)

    def forward(self, batched_inputs):
        results = []
        for x in batched_inputs:
            image = x["image"][None, :1]  # grey image: any channel
            image = F.interpolate(image, size=(x["height"], x["width"]), mode="nearest")[0, 0]
            levels = image.round().long()
            labels = levels.clone().apply_(grey_level_class)
            result = {}
            if self.on["sem_seg"]:
                result["sem_seg"] = F.one_hot(labels, len(STUFF_CLASSES)).permute(2, 0, 1).float()
            thing_levels = [v for v in levels.unique().tolist() if grey_level_class(v) != SKY]
            if self.on["panoptic_seg"]:
                panoptic = torch.zeros_like(levels, dtype=torch.int32)
                panoptic[labels == SKY] = 1
                info = [{"id": 1, "isthing": False, "category_id": SKY, "area": int((labels == SKY).sum())}]
                for i, v in enumerate(thing_levels):
                    panoptic[levels == v] = i + 2
                    info.append({"id": i + 2, "isthing": True, "category_id": grey_level_class(v),
                                 "area": int((levels == v).sum()), "score": v / 255})
                result["panoptic_seg"] = (panoptic, info)
            if self.on["instances"]:
                inst = Instances(tuple(levels.shape))
                masks = torch.stack([levels == v for v in thing_levels])
                inst.pred_masks = masks
                inst.pred_boxes = BitMasks(masks).get_bounding_boxes()
                inst.pred_classes = torch.tensor([grey_level_class(v) for v in thing_levels])
                inst.scores = torch.tensor([v / 255 for v in thing_levels])
                result["instances"] = inst
            results.append(result)
        return results


# Image "a" (64 x 80): rectangles (level, class, rows, cols) on a black (sky) background.
IMAGE_A_SHAPE = (64, 80)
IMAGE_A_THINGS = [
    (100, "cat", (4, 20), (6, 22)),  # 16 x 16 = 256 px, score 0.392
    (150, "cat", (30, 50), (4, 24)),  # 20 x 20 = 400 px, score 0.588
    (200, "dog", (30, 60), (40, 76)),  # 30 x 36 = 1080 px, score 0.784
]
IMAGE_B_SHAPE = (64, 96)
IMAGE_B_THINGS = [(255, "dog", (10, 20), (50, 90))]  # 400 px, score 1.0


def draw_image(path, shape, things):
    image = np.zeros(shape, np.uint8)
    for level, _, (r0, r1), (c0, c1) in things:
        image[r0:r1, c0:c1] = level
    cv2.imwrite(str(path), np.repeat(image[:, :, None], 3, axis=2))
    return image


@pytest.fixture(scope="module")
def metadata_name():
    name = f"demo_test_{uuid.uuid4().hex[:8]}"
    MetadataCatalog.get(name).set(
        thing_classes=THING_CLASSES,
        stuff_classes=STUFF_CLASSES,
        thing_colors=[[220, 20, 60], [0, 0, 230]],
        stuff_colors=[[220, 20, 60], [0, 0, 230], [70, 130, 180]],
        thing_dataset_id_to_contiguous_id={1: 0, 2: 1},
    )
    return name


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    draw_image(folder / "a.png", IMAGE_A_SHAPE, IMAGE_A_THINGS)
    draw_image(folder / "b.png", IMAGE_B_SHAPE, IMAGE_B_THINGS)
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)
    (folder / "notes.txt").write_text("not an image\n")
    return folder


def oracle_config(tmp_path, metadata_name, semantic=True, panoptic=False, instance=False):
    cfg = base_cfg()
    cfg.MODEL.META_ARCHITECTURE = "DemoTestOracle"
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = len(STUFF_CLASSES)
    cfg.MODEL.MASK_FORMER.TEST.SEMANTIC_ON = semantic
    cfg.MODEL.MASK_FORMER.TEST.PANOPTIC_ON = panoptic
    cfg.MODEL.MASK_FORMER.TEST.INSTANCE_ON = instance
    cfg.DATASETS.TEST = (metadata_name,)
    cfg.INPUT.MIN_SIZE_TEST = 64  # the images' short side: no resizing
    cfg.INPUT.MAX_SIZE_TEST = 128
    path = tmp_path / f"oracle_{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(cfg.dump())
    return str(path)


def run_demo(config, inputs, output, *extra, caplog=None):
    argv = ["--config-file", config, "--input", *map(str, inputs), "--output", str(output), *extra]
    if caplog is None:
        return demo_tool.main(argv)
    with caplog.at_level(logging.INFO, logger="mask_former.demo"):
        return demo_tool.main(argv)


def rectangle_mask(shape, rows, cols):
    mask = np.zeros(shape, bool)
    mask[rows[0]:rows[1], cols[0]:cols[1]] = True
    return mask


def assert_visualization(path, input_path):
    assert path.is_file(), f"missing visualization {path}"
    vis = cv2.imread(str(path))
    original = cv2.imread(str(input_path))
    assert vis.shape == original.shape
    assert np.abs(vis.astype(int) - original).sum() > 0, "nothing was drawn"


@pytest.mark.parametrize("task", ["semantic", "panoptic", "instance"])
def test_demo_writes_each_task_and_reports_bad_inputs(tmp_path, inputs, metadata_name, caplog, task):
    # the config has only semantic on: --task turns the others on for the run
    config = oracle_config(tmp_path, metadata_name)
    files = [inputs / "a.png", inputs / "corrupt.png", inputs / "notes.txt", inputs / "b.png"]
    out = tmp_path / "out"
    status = run_demo(config, files, out, "--task", task, "--json", "--confidence-threshold", "0.5",
                      caplog=caplog)

    assert status == 1, "bad inputs must make the exit status non-zero"
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    for bad in ("corrupt.png", "notes.txt"):
        assert any(bad in message for message in errors), f"{bad} not reported in {errors}"
    map_suffix = {"semantic": ["_sem_seg.png"], "panoptic": ["_panoptic.png"], "instance": []}[task]
    expected_files = [f"{n}{suffix}" for n in ("a", "b") for suffix in [".json", ".png", *map_suffix]]
    assert sorted(p.name for p in out.iterdir()) == sorted(expected_files)
    for name in ("a", "b"):
        assert_visualization(out / f"{name}.png", inputs / f"{name}.png")

    # per-image log line; the 0.39 cat of image a is below the threshold
    summary = {"semantic": "3 classes", "panoptic": "3 segments (1 more below the confidence threshold)",
               "instance": "2 instances (1 more below the confidence threshold)"}[task]
    assert any(f"a.png: {summary} in " in r.getMessage() for r in caplog.records), summary

    results = {name: json.loads((out / f"{name}.json").read_text()) for name in ("a", "b")}
    for name, result in results.items():
        assert result["task"] == task
        assert result["file_name"] == str(inputs / f"{name}.png")
    a, b = results["a"], results["b"]
    assert (a["height"], a["width"]) == IMAGE_A_SHAPE

    if task == "semantic":
        assert a["label_map"] == "a_sem_seg.png"
        label_map = np.array(Image.open(out / "a_sem_seg.png"))
        expected = np.full(IMAGE_A_SHAPE, SKY)
        for level, _, rows, cols in IMAGE_A_THINGS:
            expected[rectangle_mask(IMAGE_A_SHAPE, rows, cols)] = grey_level_class(level)
        np.testing.assert_array_equal(label_map, expected)
        # 256 + 400 cat pixels, 1080 dog, the rest of 64 * 80 sky
        assert a["classes"] == [
            {"id": 0, "name": "cat", "pixel_count": 656},
            {"id": 1, "name": "dog", "pixel_count": 1080},
            {"id": 2, "name": "sky", "pixel_count": 64 * 80 - 656 - 1080},
        ]
        assert b["classes"] == [{"id": 1, "name": "dog", "pixel_count": 400},
                                {"id": 2, "name": "sky", "pixel_count": 64 * 96 - 400}]

    elif task == "panoptic":
        ids = rgb2id(np.array(Image.open(out / a["panoptic_png"]).convert("RGB")))
        by_name = {}
        for segment in a["segments_info"]:
            mask = ids == segment["id"]
            assert segment["area"] == mask.sum()
            by_name.setdefault(segment["category_name"], []).append((segment, mask))
        # the 0.39 cat is below the threshold: dropped, its pixels void
        cat_a = rectangle_mask(IMAGE_A_SHAPE, (4, 20), (6, 22))
        assert (ids[cat_a] == 0).all()
        assert sorted(by_name) == ["cat", "dog", "sky"]
        ((cat, cat_mask),), ((dog, dog_mask),), ((sky, sky_mask),) = (by_name[n] for n in ("cat", "dog", "sky"))
        np.testing.assert_array_equal(cat_mask, rectangle_mask(IMAGE_A_SHAPE, (30, 50), (4, 24)))
        np.testing.assert_array_equal(dog_mask, rectangle_mask(IMAGE_A_SHAPE, (30, 60), (40, 76)))
        assert (cat["isthing"], cat["category_id"], cat["score"]) == (True, 0, pytest.approx(150 / 255))
        assert (dog["isthing"], dog["category_id"], dog["score"]) == (True, 1, pytest.approx(200 / 255))
        assert (sky["isthing"], sky["category_id"], sky["area"]) == (False, SKY, 64 * 80 - 1736)
        assert "score" not in sky
        assert (ids == 0).sum() == 256

    else:
        # the 0.39 cat is below the threshold
        found = sorted(a["instances"], key=lambda i: i["score"])
        assert [(i["class"], i["category_id"]) for i in found] == [("cat", 0), ("dog", 1)]
        assert [i["score"] for i in found] == [pytest.approx(150 / 255), pytest.approx(200 / 255)]
        for instance, (rows, cols) in zip(found, [((30, 50), (4, 24)), ((30, 60), (40, 76))]):
            mask = mask_util.decode({"size": instance["mask"]["size"],
                                     "counts": instance["mask"]["counts"].encode()})
            np.testing.assert_array_equal(mask.astype(bool), rectangle_mask(IMAGE_A_SHAPE, rows, cols))
            # XYXY, x1 / y1 one past the last pixel
            assert instance["box"] == [cols[0], rows[0], cols[1], rows[1]]
        assert [(i["class"], i["box"]) for i in b["instances"]] == [("dog", [50, 10, 90, 20])]


def test_confidence_threshold_zero_keeps_every_instance(tmp_path, inputs, metadata_name):
    config = oracle_config(tmp_path, metadata_name, instance=True)
    status = run_demo(config, [inputs / "a.png"], tmp_path / "out", "--json", "--confidence-threshold", "0")
    assert status == 0
    result = json.loads((tmp_path / "out" / "a.json").read_text())
    scores = sorted(round(i["score"] * 255) for i in result["instances"])
    assert scores == [100, 150, 200]


@pytest.mark.parametrize("flags,expected_task", [
    (dict(semantic=True, panoptic=True, instance=True), "panoptic"),
    (dict(semantic=True, panoptic=False, instance=True), "instance"),
    (dict(semantic=True, panoptic=False, instance=False), "semantic"),
])
def test_default_task_is_the_first_enabled_of_panoptic_instance_semantic(
    tmp_path, inputs, metadata_name, flags, expected_task
):
    config = oracle_config(tmp_path, metadata_name, **flags)
    assert run_demo(config, [inputs / "b.png"], tmp_path / "out", "--json") == 0
    assert json.loads((tmp_path / "out" / "b.json").read_text())["task"] == expected_task


def test_single_input_may_name_an_output_file(tmp_path, inputs, metadata_name):
    config = oracle_config(tmp_path, metadata_name)
    out = tmp_path / "deep" / "result.jpg"
    assert run_demo(config, [inputs / "a.png"], out, "--json") == 0
    assert_visualization(out, inputs / "a.png")
    assert json.loads((tmp_path / "deep" / "result.json").read_text())["visualization"] == "result.jpg"
    assert (tmp_path / "deep" / "result_sem_seg.png").is_file()


def test_directories_globs_and_missing_inputs(tmp_path, inputs, metadata_name, caplog):
    config = oracle_config(tmp_path, metadata_name)
    folder = tmp_path / "images"
    folder.mkdir()
    draw_image(folder / "c.png", IMAGE_A_SHAPE, IMAGE_A_THINGS)
    (folder / "README.md").write_text("not an image, skipped as the folder is listed by extension\n")
    missing = tmp_path / "missing.png"
    out = tmp_path / "out"
    status = run_demo(config, [folder, str(inputs / "b.p?g"), missing, str(tmp_path / "*.jpeg")], out,
                      caplog=caplog)
    assert status == 1
    assert sorted(p.name for p in out.iterdir()) == ["b.png", "c.png"]
    errors = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    assert "missing.png" in errors and "*.jpeg" in errors
    assert "README.md" not in errors


def test_an_output_file_name_needs_a_single_input(tmp_path, inputs, metadata_name):
    config = oracle_config(tmp_path, metadata_name)
    with pytest.raises(ValueError, match="2 inputs"):
        run_demo(config, [inputs / "a.png", inputs / "b.png"], tmp_path / "result.png")


def test_inputs_with_the_same_name_are_refused(tmp_path, inputs, metadata_name):
    config = oracle_config(tmp_path, metadata_name)
    other = tmp_path / "other"
    other.mkdir()
    draw_image(other / "a.png", IMAGE_A_SHAPE, [])
    with pytest.raises(ValueError, match="a.png"):
        run_demo(config, [inputs / "a.png", other / "a.png"], tmp_path / "out")


@pytest.mark.parametrize("argv,message", [
    (["--input", "x.png", "--json"], "--output"),
    (["--webcam", "--output", "out"], "--webcam"),
    (["--video-input", "no_such_video.mp4"], "no_such_video.mp4"),
    (["--input", "x.png", "--webcam"], "not allowed"),
    (["--input", "x.png", "--output", "o", "--confidence-threshold", "1.5"], "1.5"),
    (["--video-input", __file__, "--json", "--output", "o"], "--json"),
    (["--input", "x.png", "--task", "depth"], "depth"),
])
def test_bad_arguments_exit_with_a_message(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        demo_tool.main(["--config-file", "unused.yaml", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_metadata_must_match_the_number_of_classes(tmp_path, inputs, metadata_name):
    config = oracle_config(tmp_path, metadata_name)
    with pytest.raises(ValueError, match="NUM_CLASSES=5"):
        run_demo(config, [inputs / "a.png"], tmp_path / "out", "--opts", "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "5")


def test_missing_weights_file_is_named(tmp_path, inputs, metadata_name):
    config = oracle_config(tmp_path, metadata_name)
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        run_demo(config, [inputs / "a.png"], tmp_path / "out", "--opts", "MODEL.WEIGHTS",
                 str(tmp_path / "nowhere.pth"))


def test_video_input(tmp_path, metadata_name):
    config = oracle_config(tmp_path, metadata_name, panoptic=True)
    video = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 5, (80, 64))
    assert writer.isOpened(), "OpenCV cannot write mp4v here"
    for level in (0, 100, 200):
        writer.write(np.full((64, 80, 3), level, np.uint8))
    writer.release()
    status = demo_tool.main(
        ["--config-file", config, "--video-input", str(video), "--output", str(tmp_path / "out")]
    )
    assert status == 0
    capture = cv2.VideoCapture(str(tmp_path / "out" / "clip.mp4"))
    frames = 0
    while capture.read()[0]:
        frames += 1
    capture.release()
    assert frames == 3


def real_model_files(tmp_path, metadata_name):
    cfg = tiny_cfg(num_classes=len(STUFF_CLASSES))
    cfg.DATASETS.TEST = (metadata_name,)
    cfg.INPUT.MIN_SIZE_TEST = 32
    cfg.INPUT.MAX_SIZE_TEST = 64
    cfg.MODEL.MASK_FORMER.TEST.PANOPTIC_ON = True
    cfg.MODEL.MASK_FORMER.TEST.INSTANCE_ON = True
    cfg.MODEL.MASK_FORMER.TEST.DETECTIONS_PER_IMAGE = 4
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():  # make "no object" unlikely so that panoptic keeps segments
        model.sem_seg_head.predictor.class_embed.bias[-1] = -5.0
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("model")
    cfg.MODEL.WEIGHTS = str(tmp_path / "model.pth")
    config = tmp_path / "tiny.yaml"
    config.write_text(cfg.dump())
    return cfg, str(config)


def test_real_maskformer_outputs_reach_the_json(tmp_path, inputs, metadata_name, one_thread):
    """The tiny MaskFormer, resized input (64 -> 32): the JSON holds what DefaultPredictor gives."""
    cfg, config = real_model_files(tmp_path, metadata_name)
    image = cv2.imread(str(inputs / "a.png"))
    expected = DefaultPredictor(cfg)(image)

    for task in ("semantic", "panoptic", "instance"):
        out = tmp_path / task
        assert run_demo(config, [inputs / "a.png"], out, "--json", "--task", task,
                        "--confidence-threshold", "0") == 0
        assert_visualization(out / "a.png", inputs / "a.png")
        result = json.loads((out / "a.json").read_text())
        if task == "semantic":
            labels = expected["sem_seg"].argmax(0).numpy()
            np.testing.assert_array_equal(np.array(Image.open(out / "a_sem_seg.png")), labels)
            values, counts = np.unique(labels, return_counts=True)
            assert [(c["id"], c["pixel_count"]) for c in result["classes"]] == list(zip(values, counts))
        elif task == "panoptic":
            panoptic_seg, segments_info = expected["panoptic_seg"]
            assert segments_info, "test setup: panoptic kept no segment"
            ids = rgb2id(np.array(Image.open(out / "a_panoptic.png").convert("RGB")))
            np.testing.assert_array_equal(ids, panoptic_seg.numpy())
            assert [(s["id"], s["category_id"], s["category_name"]) for s in result["segments_info"]] == [
                (s["id"], s["category_id"], STUFF_CLASSES[s["category_id"]]) for s in segments_info]
        else:
            instances = expected["instances"]
            assert len(result["instances"]) == len(instances) == 4
            for found, mask, score in zip(result["instances"], instances.pred_masks, instances.scores):
                rle = {"size": found["mask"]["size"], "counts": found["mask"]["counts"].encode()}
                decoded = mask_util.decode(rle)
                np.testing.assert_array_equal(decoded.astype(bool), mask.numpy())
                assert found["score"] == pytest.approx(float(score))


def test_demo_script_runs_as_a_subprocess(tmp_path, inputs):
    """The synthetic dataset's metadata is registered by `import mask_former`, so the script finds it."""
    from mask_former.data.datasets.synthetic import NUM_CLASSES

    cfg = tiny_cfg(num_classes=NUM_CLASSES)
    cfg.DATASETS.TEST = ("synthetic_panoptic_val",)
    cfg.INPUT.MIN_SIZE_TEST = 64
    cfg.INPUT.MAX_SIZE_TEST = 128
    cfg.MODEL.MASK_FORMER.TEST.PANOPTIC_ON = True
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():  # make "no object" unlikely so that something is drawn
        model.sem_seg_head.predictor.class_embed.bias[-1] = -5.0
    torch.save({"model": model.state_dict()}, tmp_path / "weights.pth")
    config = tmp_path / "synthetic_tiny.yaml"
    config.write_text(cfg.dump())
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")  # tiny model: one thread is faster on shared cores
    proc = subprocess.run(
        [sys.executable, str(DEMO), "--config-file", str(config), "--input", str(inputs / "a.png"),
         "--output", str(out), "--json", "--confidence-threshold", "0",
         "--opts", "MODEL.WEIGHTS", str(tmp_path / "weights.pth")],
        capture_output=True, text=True, timeout=300, cwd=str(tmp_path), env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads((out / "a.json").read_text())["task"] == "panoptic"
    assert_visualization(out / "a.png", inputs / "a.png")


@pytest.mark.parametrize("task", ["semantic", "panoptic", "instance"])
def test_scale_enlarges_the_drawing_not_the_prediction(tmp_path, inputs, metadata_name, task):
    config = oracle_config(tmp_path, metadata_name)
    plain, scaled = tmp_path / "plain", tmp_path / "scaled"
    for out, extra in ((plain, []), (scaled, ["--scale", "3"])):
        assert run_demo(config, [inputs / "a.png"], out, "--task", task, "--json",
                        "--confidence-threshold", "0", *extra) == 0
    vis = cv2.imread(str(scaled / "a.png"))
    assert vis.shape == (IMAGE_A_SHAPE[0] * 3, IMAGE_A_SHAPE[1] * 3, 3)
    original = cv2.imread(str(inputs / "a.png"))
    enlarged = original.repeat(3, axis=0).repeat(3, axis=1)
    assert np.abs(vis.astype(int) - enlarged).sum() > 0, "nothing was drawn"
    # the prediction is made on the original image: the JSON (and its maps) are the same
    expected, found = (json.loads((folder / "a.json").read_text()) for folder in (plain, scaled))
    expected.pop("file_name"), found.pop("file_name")
    assert found == expected
    assert (found["height"], found["width"]) == IMAGE_A_SHAPE
    for suffix in ("_sem_seg.png", "_panoptic.png"):
        if (plain / f"a{suffix}").exists():
            np.testing.assert_array_equal(np.array(Image.open(scaled / f"a{suffix}")),
                                          np.array(Image.open(plain / f"a{suffix}")))


def test_scale_must_be_a_positive_integer(capsys):
    for value in ("0", "1.5"):
        with pytest.raises(SystemExit) as exit_info:
            demo_tool.main(["--config-file", "unused.yaml", "--input", "x.png", "--scale", value])
        assert exit_info.value.code == 2
        assert "--scale" in capsys.readouterr().err


def test_scale_applies_to_video_frames(tmp_path, metadata_name):
    config = oracle_config(tmp_path, metadata_name, instance=True)
    video = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 5, (80, 64))
    assert writer.isOpened(), "OpenCV cannot write mp4v here"
    for level in (100, 200):
        writer.write(np.full((64, 80, 3), level, np.uint8))
    writer.release()
    assert demo_tool.main(["--config-file", config, "--video-input", str(video), "--output",
                           str(tmp_path / "out"), "--scale", "2"]) == 0
    capture = cv2.VideoCapture(str(tmp_path / "out" / "clip.mp4"))
    ok, frame = capture.read()
    capture.release()
    assert ok and frame.shape == (128, 160, 3)


def test_class_names_of_the_config_label_the_classes(tmp_path, inputs):
    """A config without a test dataset (e.g. a converted HuggingFace model) names its classes in
    MODEL.CLASS_NAMES."""
    cfg_path = oracle_config(tmp_path, "unused")
    out = tmp_path / "out"
    status = run_demo(cfg_path, [inputs / "b.png"], out, "--json", "--opts", "DATASETS.TEST", "()",
                      "MODEL.CLASS_NAMES", "['Katze', 'Hund', 'Himmel']")
    assert status == 0
    classes = json.loads((out / "b.json").read_text())["classes"]
    assert [(c["id"], c["name"]) for c in classes] == [(1, "Hund"), (2, "Himmel")]
    with pytest.raises(ValueError, match="MODEL.CLASS_NAMES"):
        run_demo(cfg_path, [inputs / "b.png"], out, "--opts", "DATASETS.TEST", "()")


def test_the_tool_is_the_console_script():
    from mask_former.cli import demo as cli_demo

    assert demo_tool.main is cli_demo.main
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    assert 'maskformer-demo = "mask_former.cli.demo:main"' in pyproject


def test_run_demo_announces_numbered_timed_steps():
    import io

    spec = importlib.util.spec_from_file_location("maskformer_run_demo", REPO_ROOT / "tools" / "run_demo.py")
    run_demo_tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_demo_tool)
    times = iter([0.0, 0.0, 65.0, 65.0, 3725.0, 3725.0, 3726.0])
    out = io.StringIO()
    steps = run_demo_tool.Steps(3, out=out, clock=lambda: next(times))
    with steps.step("generate the data"):
        pass
    with steps.step("train"):
        pass
    with pytest.raises(RuntimeError):
        with steps.step("plot"):
            raise RuntimeError("boom")
    assert out.getvalue().splitlines() == [
        "", "[step 1/3] generate the data (at 0s)",
        "[step 1/3] done in 1m 05s (1m 05s since the start)",
        "", "[step 2/3] train (at 1m 05s)",
        "[step 2/3] done in 1h 01m 00s (1h 02m 05s since the start)",
        "", "[step 3/3] plot (at 1h 02m 05s)",
        "[step 3/3] failed after 1s",
    ]
