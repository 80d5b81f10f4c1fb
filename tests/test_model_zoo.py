"""Model-zoo configs: every one builds; published checkpoint layouts load key for key."""
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.engine import DefaultTrainer
from detectron2.modeling import META_ARCH_REGISTRY, build_model

from mask_former.checkpoint import MaskFormerCheckpointer
from mask_former.data.datasets.command_line import resolve_num_classes
from model_utils import CONFIG_DIR, zoo_cfg

ZOO_CONFIGS = sorted(
    str(p.relative_to(CONFIG_DIR)) for p in CONFIG_DIR.rglob("*.yaml")
    if not p.name.startswith("Base-") and not str(p.relative_to(CONFIG_DIR)).startswith("synthetic")
)

# reference file -> config that has that architecture
REFERENCE_CONFIGS = {
    "ade20k-150__maskformer_R50_bs16_160k.txt": "ade20k-150/maskformer_R50_bs16_160k.yaml",
    "ade20k-150__maskformer_R101c_bs16_160k.txt": "ade20k-150/maskformer_R101c_bs16_160k.yaml",
    "ade20k-150__per_pixel_baseline_plus_R50_bs16_160k.txt":
        "ade20k-150/per_pixel_baseline_plus_R50_bs16_160k.yaml",
    "ade20k-150__swin__maskformer_swin_tiny_bs16_160k.txt":
        "ade20k-150/swin/maskformer_swin_tiny_bs16_160k.yaml",
    "coco-panoptic__maskformer_panoptic_R50_bs64_554k.txt":
        "coco-panoptic/maskformer_panoptic_R50_bs64_554k.yaml",
    "coco-panoptic__swin__maskformer_panoptic_swin_base_IN21k_384_bs64_554k.txt":
        "coco-panoptic/swin/maskformer_panoptic_swin_base_IN21k_384_bs64_554k.yaml",
}


def build_on_meta(cfg):
    """Build the model's modules without allocating or initializing real weights."""
    with torch.device("meta"):
        return META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)(cfg)


def expected_module_key(key: str) -> str:
    """Published checkpoints keep pixel-decoder weights directly under sem_seg_head; this project
    keeps them in sem_seg_head.pixel_decoder."""
    head = "sem_seg_head."
    if key.startswith(head) and not key[len(head):].startswith("predictor."):
        return head + "pixel_decoder." + key[len(head):]
    return key


# configs of this project beyond the published MaskFormer model zoo
PROJECT_CONFIGS = {
    "ade20k-150/maskformer_R50_msdeform_bs16_160k.yaml",
    "coco-panoptic/panoptic_segformer_R50_12e.yaml",
    "coco-panoptic/panoptic_segformer_R50_24e.yaml",
    "coco-panoptic/panoptic_segformer_R101_24e.yaml",
    "coco-panoptic/panoptic_segformer_swin_large_24e.yaml",
    "coco-instance/maskformer_instance_R50_bs64_554k.yaml",
    "custom/maskformer_R50_semantic.yaml",
    "custom/maskformer_R50_instance.yaml",
    "custom/maskformer_R50_panoptic.yaml",
}

# The configs for the user's own data (configs/custom/) leave MODEL.SEM_SEG_HEAD.NUM_CLASSES at -1,
# "the class count of DATASETS.TRAIN[0]", and name datasets registered on the command line
# (my_train, my_val). They are built here as tools/train_net.py builds them: on registered datasets
# of their format (the built-in synthetic ones, registered on import, whose metadata needs no
# file), with NUM_CLASSES filled from the training dataset's metadata by the function the tools use.
SYNTHETIC_DATASETS_OF_MAPPER = {
    "mask_former_semantic": "synthetic_sem_seg",
    "mask_former_instance": "synthetic_instance",
    "mask_former_panoptic": "synthetic_panoptic",
}


def buildable_cfg(relpath: str):
    """The config of ``relpath``, with the datasets and class count of a -1 config filled in."""
    cfg = zoo_cfg(relpath)
    if cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == -1:
        prefix = SYNTHETIC_DATASETS_OF_MAPPER[cfg.INPUT.DATASET_MAPPER_NAME]
        cfg.DATASETS.TRAIN = (f"{prefix}_train",)
        cfg.DATASETS.TEST = (f"{prefix}_val",)
        assert resolve_num_classes(cfg) == cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES > 0
    return cfg


def test_all_model_zoo_configs_are_present():
    # the published model zoo's configs (README.md, "Model zoo"), plus this project's own
    assert PROJECT_CONFIGS <= set(ZOO_CONFIGS)
    assert len(set(ZOO_CONFIGS) - PROJECT_CONFIGS) == 30, ZOO_CONFIGS


@pytest.mark.parametrize("relpath", ZOO_CONFIGS)
def test_model_zoo_config_builds(relpath):
    cfg = buildable_cfg(relpath)
    model = build_on_meta(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params > 20e6, f"{relpath}: {n_params} parameters"
    # no python tags: the YAML files are plain
    assert "!!python" not in (CONFIG_DIR / relpath).read_text()


@pytest.mark.parametrize("ref_name", sorted(REFERENCE_CONFIGS))
def test_state_dict_layout_matches_published(ref_name, reference_layout):
    reference = reference_layout(ref_name)
    expected = {expected_module_key(k): v for k, v in reference.items()}
    model = build_on_meta(zoo_cfg(REFERENCE_CONFIGS[ref_name]))
    actual = {k: (tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(actual))
    unexpected = sorted(set(actual) - set(expected))
    assert not missing and not unexpected, f"missing {missing[:10]}, unexpected {unexpected[:10]}"
    wrong = {k: (actual[k], expected[k]) for k in expected if actual[k] != expected[k]}
    assert not wrong, wrong


def write_published_style_pkl(layout, path: Path, seed: int = 0):
    rng = np.random.default_rng(seed)
    model = {}
    for key, (shape, dtype) in layout.items():
        if dtype == "int64":
            model[key] = rng.integers(0, 100, size=shape, dtype=np.int64)
        else:
            model[key] = rng.standard_normal(size=shape).astype(dtype)
    with open(path, "wb") as f:
        pickle.dump({"model": model, "__author__": "MaskFormer model zoo (test copy)"}, f)
    return model


@pytest.mark.parametrize("ref_name", [
    "ade20k-150__maskformer_R50_bs16_160k.txt",
    "ade20k-150__per_pixel_baseline_plus_R50_bs16_160k.txt",
    "ade20k-150__swin__maskformer_swin_tiny_bs16_160k.txt",
])
def test_published_pkl_loads_through_checkpointer(ref_name, reference_layout, tmp_path):
    layout = reference_layout(ref_name)
    weights = write_published_style_pkl(layout, tmp_path / "model_final.pkl")
    cfg = zoo_cfg(REFERENCE_CONFIGS[ref_name])
    model = build_model(cfg)
    checkpointer = MaskFormerCheckpointer(model)
    incompatible = checkpointer._load_model(checkpointer._load_file(str(tmp_path / "model_final.pkl")))
    assert incompatible.missing_keys == []
    assert incompatible.unexpected_keys == []
    state = model.state_dict()
    for key in ("sem_seg_head.adapter_1.weight", "sem_seg_head.predictor.query_embed.weight",
                "backbone.patch_embed.proj.weight", "backbone.stem.conv1.weight"):
        if key in weights:
            np.testing.assert_array_equal(state[expected_module_key(key)].numpy(), weights[key])


def test_published_pkl_as_model_weights(reference_layout, tmp_path):
    """MODEL.WEIGHTS pointing at a published-style .pkl just works (no missing keys logged)."""
    ref_name = "ade20k-150__maskformer_R50_bs16_160k.txt"
    weights = write_published_style_pkl(reference_layout(ref_name), tmp_path / "m.pkl", seed=1)
    cfg = zoo_cfg(REFERENCE_CONFIGS[ref_name])
    model = build_model(cfg)
    MaskFormerCheckpointer(model).resume_or_load(str(tmp_path / "m.pkl"), resume=False)
    np.testing.assert_array_equal(
        model.state_dict()["sem_seg_head.pixel_decoder.layer_4.weight"].numpy(),
        weights["sem_seg_head.layer_4.weight"],
    )
    np.testing.assert_array_equal(model.criterion.empty_weight.numpy(), weights["criterion.empty_weight"])


def test_r50_ade20k_parameter_count():
    model = build_on_meta(zoo_cfg("ade20k-150/maskformer_R50_bs16_160k.yaml"))
    n_params = sum(p.numel() for p in model.parameters())
    assert abs(n_params / 1e6 - 41.25) <= 0.01, n_params


PUBLISHED_CONFIGS = sorted(set(ZOO_CONFIGS) - PROJECT_CONFIGS)


@pytest.mark.parametrize("relpath", PUBLISHED_CONFIGS + ["coco-instance/maskformer_instance_R50_bs64_554k.yaml"])
def test_published_recipes_scale_to_other_gpu_counts(relpath):
    """SOLVER.REFERENCE_WORLD_SIZE is the published GPU count (64 for COCO, 8 otherwise), so that
    detectron2's DefaultTrainer.auto_scale_workers keeps the per-GPU batch on other counts."""
    cfg = zoo_cfg(relpath)
    reference = 64 if relpath.startswith(("coco-panoptic/maskformer", "coco-panoptic/swin", "coco-instance")) else 8
    assert cfg.SOLVER.REFERENCE_WORLD_SIZE == reference
    assert cfg.SOLVER.IMS_PER_BATCH % reference == 0
    scaled = DefaultTrainer.auto_scale_workers(cfg, reference // 2)
    assert scaled.SOLVER.IMS_PER_BATCH == cfg.SOLVER.IMS_PER_BATCH // 2
    assert scaled.SOLVER.BASE_LR == pytest.approx(cfg.SOLVER.BASE_LR / 2)
    assert scaled.SOLVER.MAX_ITER == 2 * cfg.SOLVER.MAX_ITER


def test_built_in_and_custom_recipes_do_not_scale():
    for relpath in ("synthetic/maskformer_panoptic_R18.yaml", "custom/maskformer_R50_semantic.yaml"):
        cfg = zoo_cfg(relpath)
        assert cfg.SOLVER.REFERENCE_WORLD_SIZE == 0
        assert DefaultTrainer.auto_scale_workers(cfg, 2) is cfg
