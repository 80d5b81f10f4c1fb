"""Datasets registered from the command line (``--dataset NAME FORMAT ARG...``): parsing, the error
of each kind of bad argument, registration with complete class metadata, config overrides around
``--dataset``, ``MODEL.SEM_SEG_HEAD.NUM_CLASSES -1``, every process of a distributed run, and
fine-tuning from a model of another class count."""
import argparse
import logging
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from PIL import Image

from mask_former.checkpoint import MaskFormerCheckpointer
from mask_former.cli import train_net
from mask_former.data.datasets import command_line
from mask_former.data.datasets.command_line import (
    DatasetArgumentError,
    check_datasets_registered,
    normalize_dataset_arguments,
    num_classes_from_metadata,
    parse_dataset_specs,
    register_datasets_from_args,
    resolve_num_classes,
)
from mask_former.data.datasets.synthetic import SYNTHETIC_METADATA
from model_utils import tiny_cfg
from train_utils import REPO_ROOT, TINY_OPTS, train_net_env

CLASSES = SYNTHETIC_METADATA["stuff_classes"]  # 5 things then 3 stuff classes
THINGS = SYNTHETIC_METADATA["thing_classes"]


@pytest.fixture(scope="module")
def data(tiny_synthetic_root) -> Path:
    """The tiny synthetic dataset, in the layout of README.md's "Train on your own data"."""
    folder = Path(tiny_synthetic_root) / "synthetic"
    (folder / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return folder


@pytest.fixture
def names():
    """Fresh dataset names; whatever got registered under them is removed afterwards."""
    made = []

    def new():
        made.append(f"test_cli_{uuid.uuid4().hex[:8]}")
        return made[-1]

    yield new
    for name in made:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
        if name in MetadataCatalog.list():
            MetadataCatalog.remove(name)
        command_line._REGISTERED.pop(name, None)


def semantic_args(data, name, split="train"):
    return [name, "semantic", f"{data}/images/{split}", f"{data}/semantic_{split}", f"{data}/classes.txt"]


def instance_args(data, name, split="train"):
    return [name, "coco_instances", f"{data}/instances_{split}.json", f"{data}/images/{split}"]


def panoptic_args(data, name, split="train"):
    return [name, "coco_panoptic", f"{data}/images/{split}", f"{data}/panoptic_{split}",
            f"{data}/panoptic_{split}.json"]


# ------------------------------------------------------------------------------ parsing


def test_the_three_forms_parse(data):
    semantic, instances, panoptic = parse_dataset_specs([
        semantic_args(data, "a"), instance_args(data, "b"),
        panoptic_args(data, "c") + [f"{data}/instances_train.json", f"{data}/semantic_train"],
    ])
    assert semantic.format == "semantic" and semantic.classes == tuple(CLASSES)
    # the one image extension of IMAGE_DIR (the synthetic images are PNGs), and the defaults
    assert semantic.options == {"image_ext": ".png", "label_ext": ".png", "ignore_label": 255}
    assert instances.paths == {"JSON": f"{data}/instances_train.json", "IMAGE_DIR": f"{data}/images/train"}
    # the optional panoptic arguments are told apart by kind, in any order
    assert panoptic.paths["SEMANTIC_DIR"] == f"{data}/semantic_train"
    assert panoptic.paths["INSTANCES_JSON"] == f"{data}/instances_train.json"


def test_semantic_options(data):
    (spec,) = parse_dataset_specs([semantic_args(data, "a") + ["image_ext=png", "ignore_label=200"]])
    assert spec.options == {"image_ext": ".png", "label_ext": ".png", "ignore_label": 200}


def _write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("make_args, expected", [
    (lambda d, t: ["x"], r"--dataset x: expected NAME FORMAT ARG\.\.\., one of: NAME semantic IMAGE_DIR"),
    (lambda d, t: ["x", "cocoinstances", "a", "b"],
     r"unknown FORMAT 'cocoinstances' \(did you mean 'coco_instances'\?\); expected one of semantic, "
     r"coco_instances, coco_panoptic"),
    (lambda d, t: semantic_args(d, "x")[:4],
     r"expected NAME semantic IMAGE_DIR LABEL_DIR CLASSES_TXT \[image_ext=.EXT\] .* \(3 paths\), got 2: "),
    (lambda d, t: instance_args(d, "x") + ["extra"],
     r"expected NAME coco_instances JSON IMAGE_DIR \(2 paths\), got 3: "),
    (lambda d, t: panoptic_args(d, "x")[:4], r"\(3 to 5 paths\), got 2"),
    (lambda d, t: [*semantic_args(d, "x")[:2], str(t / "nowhere"), *semantic_args(d, "x")[3:]],
     r"IMAGE_DIR '.*nowhere' does not exist; expected a directory"),
    (lambda d, t: instance_args(d, "x", "train")[:2] + [f"{d}/images/train", f"{d}/images/train"],
     r"JSON '.*images/train' is a directory, not a file; expected a file"),
    (lambda d, t: panoptic_args(d, "x") + [str(t / "missing")],
     r"'.*missing' does not exist; expected SEMANTIC_DIR \(a directory of semantic PNGs\) or INSTANCES_JSON"),
    (lambda d, t: panoptic_args(d, "x") + [f"{d}/semantic_train", f"{d}/semantic_val"],
     r"two SEMANTIC_DIR given"),
    (lambda d, t: semantic_args(d, "x") + ["colour=red"],
     r"unknown option 'colour=red'; semantic takes image_ext=.EXT, label_ext=.EXT, ignore_label=N"),
    (lambda d, t: semantic_args(d, "x") + ["ignore_label=none"], r"ignore_label='none': expected an integer"),
    (lambda d, t: semantic_args(d, "x") + ["ignore_label=3"],
     r"ignore_label=3 must be in \[8, 255\]: no class id of the 8 classes of CLASSES_TXT"),
    (lambda d, t: semantic_args(d, "x")[:4] + [_write(t / "empty.txt", "\n\n")],
     r"CLASSES_TXT '.*empty.txt' is empty; expected one class name per line"),
    (lambda d, t: semantic_args(d, "x")[:4] + [_write(t / "gap.txt", "road\n\ncar\n")],
     r"CLASSES_TXT '.*gap.txt' line 2 is empty; every line names one class"),
    (lambda d, t: semantic_args(d, "x")[:4] + [_write(t / "twice.txt", "road\ncar\nroad\n")],
     r"CLASSES_TXT '.*twice.txt' names 'road' more than once"),
    (lambda d, t: semantic_args(d, "coco_2017_train"),
     r"NAME 'coco_2017_train' is already registered .*; expected a new name"),
])
def test_bad_arguments_name_the_argument_and_what_was_expected(data, tmp_path, make_args, expected):
    args = make_args(data, tmp_path)
    with pytest.raises(DatasetArgumentError, match=expected) as error:
        parse_dataset_specs([args])
    assert str(error.value).startswith("--dataset " + " ".join(args[:2]))


def test_image_dir_with_several_image_types_or_none(data, tmp_path):
    mixed = tmp_path / "mixed"
    shutil.copytree(f"{data}/images/val", mixed)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(mixed / "extra.jpg")
    with pytest.raises(DatasetArgumentError, match=r"holds images with several extensions \(1 \.jpg, 4 \.png\); "
                       r"say which are the images with image_ext=.EXT"):
        parse_dataset_specs([["x", "semantic", str(mixed), f"{data}/semantic_val", f"{data}/classes.txt"]])
    (spec,) = parse_dataset_specs([["x", "semantic", str(mixed), f"{data}/semantic_val",
                                    f"{data}/classes.txt", "image_ext=.png"]])
    assert spec.options["image_ext"] == ".png"
    (tmp_path / "no_images").mkdir()
    with pytest.raises(DatasetArgumentError, match=r"IMAGE_DIR '.*no_images' holds no image files"):
        parse_dataset_specs([["x", "semantic", str(tmp_path / "no_images"), f"{data}/semantic_val",
                              f"{data}/classes.txt"]])


def test_a_name_given_twice(data):
    with pytest.raises(DatasetArgumentError, match=r"NAME 'a' is given twice \(also by --dataset a semantic"):
        parse_dataset_specs([semantic_args(data, "a"), instance_args(data, "a")])


# ------------------------------------------------------------------------------ the command line


@pytest.mark.parametrize("argv, datasets, opts", [
    # overrides after the last --dataset
    (["--dataset", "a", "semantic", "i", "l", "c.txt", "OUTPUT_DIR", "out", "SOLVER.MAX_ITER", "5"],
     [["a", "semantic", "i", "l", "c.txt"]], ["OUTPUT_DIR", "out", "SOLVER.MAX_ITER", "5"]),
    # overrides first, then --dataset (argparse puts the --dataset into the overrides)
    (["SOLVER.MAX_ITER", "5", "--dataset", "a", "coco_instances", "j", "i", "--dataset", "b",
      "coco_instances", "k", "i", "OUTPUT_DIR", "out"],
     [["a", "coco_instances", "j", "i"], ["b", "coco_instances", "k", "i"]],
     ["SOLVER.MAX_ITER", "5", "OUTPUT_DIR", "out"]),
    # overrides on both sides of another option, in command-line order
    (["--dataset", "a", "coco_instances", "j", "i", "SEED", "1", "--resume", "OUTPUT_DIR", "out"],
     [["a", "coco_instances", "j", "i"]], ["SEED", "1", "OUTPUT_DIR", "out"]),
    # "--" after a --dataset
    (["--dataset", "a", "coco_instances", "j", "i", "--", "OUTPUT_DIR", "out"],
     [["a", "coco_instances", "j", "i"]], ["OUTPUT_DIR", "out"]),
])
def test_config_overrides_around_dataset_arguments(argv, datasets, opts):
    args = train_net.argument_parser().parse_args(["--config-file", "c.yaml", *argv])
    normalize_dataset_arguments(args)
    assert (args.dataset, args.opts) == (datasets, opts)
    normalize_dataset_arguments(args)  # idempotent
    assert (args.dataset, args.opts) == (datasets, opts)


def test_an_upper_case_path_that_exists_stays_in_the_dataset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "SEMANTIC").mkdir()
    args = argparse.Namespace(dataset=[["a", "coco_panoptic", "i", "p", "p.json", "SEMANTIC", "SEED", "1"]], opts=[])
    normalize_dataset_arguments(args)
    assert args.dataset == [["a", "coco_panoptic", "i", "p", "p.json", "SEMANTIC"]]
    assert args.opts == ["SEED", "1"]


def test_train_net_rejects_bad_dataset_arguments_with_a_usage_error(data, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_net.parse_args(["--config-file", "c.yaml", "--dataset", "my_train", "semantic",
                              f"{data}/images/train", f"{data}/classes.txt", "OUTPUT_DIR", "out"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err
    assert (f"error: --dataset my_train semantic {data}/images/train {data}/classes.txt: expected NAME "
            "semantic IMAGE_DIR LABEL_DIR CLASSES_TXT") in err


def test_train_net_help_lists_the_forms(capsys):
    with pytest.raises(SystemExit):
        train_net.parse_args(["--help"])
    out = capsys.readouterr().out
    for form in ("--dataset NAME semantic IMAGE_DIR LABEL_DIR CLASSES_TXT [image_ext=.EXT]",
                 "--dataset NAME coco_instances JSON IMAGE_DIR",
                 "--dataset NAME coco_panoptic IMAGE_DIR PANOPTIC_DIR PANOPTIC_JSON [SEMANTIC_DIR] [INSTANCES_JSON]",
                 "MODEL.SEM_SEG_HEAD.NUM_CLASSES -1"):
        assert form in out


def test_demo_parser_takes_dataset_arguments(data):
    from mask_former.cli import demo

    parser = demo.get_parser()
    args = parser.parse_args(["--config-file", "c.yaml", "--input", "x.png", "--dataset", *semantic_args(data, "v"),
                              "--opts", "MODEL.WEIGHTS", "m.pth"])
    demo.check_args(parser, args)
    assert args.dataset == [semantic_args(data, "v")] and args.opts == ["MODEL.WEIGHTS", "m.pth"]
    args = parser.parse_args(["--config-file", "c.yaml", "--input", "x.png", "--dataset", "v", "semantic"])
    with pytest.raises(SystemExit):
        demo.check_args(parser, args)


# ------------------------------------------------------------------------------ registration


def test_registration_gives_complete_class_metadata_before_loading(data, names):
    semantic, instances, panoptic = names(), names(), names()
    registered = register_datasets_from_args([
        semantic_args(data, semantic), instance_args(data, instances),
        panoptic_args(data, panoptic, "val") + [f"{data}/semantic_val", f"{data}/instances_val.json"],
    ])
    assert registered == [semantic, instances, panoptic]

    meta = MetadataCatalog.get(semantic)
    assert meta.stuff_classes == CLASSES and meta.ignore_label == 255 and meta.evaluator_type == "sem_seg"
    meta = MetadataCatalog.get(instances)
    assert meta.thing_classes == THINGS and meta.evaluator_type == "coco"
    assert meta.thing_dataset_id_to_contiguous_id == {1: 0, 2: 1, 3: 2, 4: 3, 5: 4}
    meta = MetadataCatalog.get(panoptic)
    assert meta.stuff_classes == CLASSES and meta.thing_classes == THINGS
    assert meta.sem_seg_root == f"{data}/semantic_val" and meta.json_file == f"{data}/instances_val.json"
    assert [num_classes_from_metadata(n) for n in registered] == [8, 5, 8]

    # loading agrees with what was registered (detectron2 would refuse other thing classes)
    records = DatasetCatalog.get(semantic)
    assert len(records) == 16 and records[0]["sem_seg_file_name"].endswith("semantic_train/000001.png")
    assert len(DatasetCatalog.get(instances)) == 16
    assert MetadataCatalog.get(instances).thing_classes == THINGS
    assert "sem_seg_file_name" in DatasetCatalog.get(panoptic)[0]


def test_registering_the_same_arguments_again_does_nothing(data, names):
    name = names()
    register_datasets_from_args([semantic_args(data, name)])
    register_datasets_from_args([semantic_args(data, name)])  # e.g. run() twice in a process
    with pytest.raises(DatasetArgumentError, match=f"NAME '{name}' is already registered"):
        register_datasets_from_args([instance_args(data, name)])


def test_a_broken_json_is_reported_with_its_dataset_argument(data, names, tmp_path):
    name = names()
    broken = _write(tmp_path / "broken.json", '{"images": [], "categ')
    with pytest.raises(DatasetArgumentError, match=rf"--dataset {name} coco_instances .*broken.json .*: JSON "
                       r".*broken.json: not valid JSON"):
        register_datasets_from_args([[name, "coco_instances", broken, f"{data}/images/train"]])
    no_categories = _write(tmp_path / "none.json", '{"images": [], "annotations": []}')
    with pytest.raises(DatasetArgumentError, match=r"has no 'categories' list; expected a COCO instance"):
        register_datasets_from_args([[name, "coco_instances", no_categories, f"{data}/images/train"]])
    with pytest.raises(DatasetArgumentError, match=rf"--dataset {name} coco_panoptic .*: .*not valid JSON"):
        register_datasets_from_args([[name, "coco_panoptic", f"{data}/images/train", f"{data}/panoptic_train",
                                      broken]])
    assert name not in DatasetCatalog.list()


# ------------------------------------------------------------------------------ NUM_CLASSES -1


def test_num_classes_minus_one_is_filled_from_the_training_dataset(data, names):
    train, val = names(), names()
    register_datasets_from_args([instance_args(data, train), instance_args(data, val, "val")])
    cfg = tiny_cfg(num_classes=-1)
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (train,), (val,)
    check_datasets_registered(cfg)
    assert resolve_num_classes(cfg) == 5 and cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == 5
    assert resolve_num_classes(cfg) is None  # a number is left as it is (and checked by the trainer)


@pytest.mark.parametrize("train, expected", [
    ((), r"MODEL.SEM_SEG_HEAD.NUM_CLASSES is -1 \(take the class count from DATASETS.TRAIN\[0\]\), but "
         r"DATASETS.TRAIN is empty"),
    (("not_registered_x",), r"but dataset 'not_registered_x' is not registered: register it with --dataset "
                            r"not_registered_x FORMAT ARG\.\.\."),
])
def test_num_classes_minus_one_without_a_dataset(train, expected):
    cfg = tiny_cfg(num_classes=-1)
    cfg.DATASETS.TRAIN = train
    with pytest.raises(ValueError, match=expected):
        resolve_num_classes(cfg)


def test_datasets_of_the_config_must_be_registered():
    cfg = tiny_cfg()
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = ("synthetic_panoptic_train",), ("my_val",)
    check_datasets_registered(cfg, ("DATASETS.TRAIN",))
    with pytest.raises(ValueError, match=r"DATASETS.TEST names dataset 'my_val', which is not registered: register "
                       r"your data with --dataset my_val FORMAT ARG\.\.\. \(see --help\), or set DATASETS.TEST"):
        check_datasets_registered(cfg)


# ------------------------------------------------------------------------------ every process


def test_every_process_of_a_distributed_run_registers_the_datasets(data, tmp_path):
    """Two CPU processes (Gloo) evaluate on a --dataset: each must have registered it, and the
    class count of NUM_CLASSES -1 comes from it."""
    config = tmp_path / "semantic.yaml"
    config.write_text(
        f"_BASE_: {REPO_ROOT}/configs/synthetic/maskformer_panoptic_R18.yaml\n"
        "MODEL:\n  SEM_SEG_HEAD:\n    NUM_CLASSES: -1\n"
        "  MASK_FORMER:\n    TEST:\n      PANOPTIC_ON: False\n      INSTANCE_ON: False\n"
        "INPUT:\n  DATASET_MAPPER_NAME: mask_former_semantic\n"
    )
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools" / "train_net.py"), "--config-file", str(config), "--num-gpus", "2",
         "--eval-only", "--dataset", *semantic_args(data, "my_val", "val"),
         *TINY_OPTS, "DATASETS.TEST", "('my_val',)", "OUTPUT_DIR", str(tmp_path / "out")],
        cwd=REPO_ROOT, env=train_net_env(tmp_path), capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    log = (tmp_path / "out" / "log.txt").read_text()
    assert "MODEL.SEM_SEG_HEAD.NUM_CLASSES: -1 in the config, so 8: the classes of dataset 'my_val' " \
           "(DATASETS.TEST[0])" in log
    assert "mIoU" in (tmp_path / "out" / "eval_results.json").read_text()


# ------------------------------------------------------------------------------ fine-tuning


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_fine_tuning_drops_and_logs_the_class_head_of_another_class_count(tmp_path):
    torch.manual_seed(0)
    source = build_model(tiny_cfg(num_classes=8))
    torch.save({"model": source.state_dict()}, tmp_path / "eight_classes.pth")
    model = build_model(tiny_cfg(num_classes=3))
    before = {k: v.clone() for k, v in model.state_dict().items()}

    checkpointer = MaskFormerCheckpointer(model)  # allow_mismatch=True, as in training
    records = _Records()
    checkpointer.logger.addHandler(records)
    try:
        checkpointer.resume_or_load(str(tmp_path / "eight_classes.pth"), resume=False)
    finally:
        checkpointer.logger.removeHandler(records)

    dropped = {"sem_seg_head.predictor.class_embed.weight", "sem_seg_head.predictor.class_embed.bias",
               "criterion.empty_weight"}
    log = "\n".join(records.messages)
    assert "Skip loading parameter 'sem_seg_head.predictor.class_embed.weight' to the model due to " \
           "incompatible shapes: (9, 32) in the checkpoint but (4, 32) in the model" in log
    for key in dropped:
        assert f"Skip loading parameter '{key}'" in log
    state, loaded = model.state_dict(), source.state_dict()
    for key, value in state.items():
        expected = before[key] if key in dropped else loaded[key]
        torch.testing.assert_close(value, expected, rtol=0, atol=0, msg=key)
    assert len(state) > 100  # the rest: backbone, pixel decoder, transformer decoder, mask head
