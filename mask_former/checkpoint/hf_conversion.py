"""Conversion of HuggingFace ``transformers`` MaskFormer checkpoints to this project.

A directory written by ``MaskFormerForInstanceSegmentation.save_pretrained`` (or downloaded from the
hub; :func:`resolve_hf_checkpoint` finds a hub id's snapshot, in the HuggingFace cache when offline)
holds ``config.json`` and the weights (``model.safetensors``, sharded safetensors or
``pytorch_model.bin``), and may hold ``preprocessor_config.json``. This module turns it into

* a detectron2 state dict in the layout of the published MaskFormer checkpoints (pixel decoder
  weights directly under ``sem_seg_head.``, see ``tests/reference/*.txt``), and
* the config values of the matching architecture, as a nested dict that dumps to plain YAML,
  with the class names of ``id2label`` as ``MODEL.CLASS_NAMES`` (what the predictor and the demo
  label classes with when ``DATASETS.TEST`` names no dataset).

Neither ``transformers`` nor ``torch.nn`` modules of HuggingFace are needed: the weights are read
under the names they have ON DISK. In transformers 5.x those differ from some in-memory module
names (the DETR decoder saves ``out_proj``/``fc1``/``fc2`` where the module has ``o_proj``/
``mlp.fc1``/``mlp.fc2``); both spellings are accepted.

Supported: Swin (``swin`` / ``maskformer-swin``) and ResNet (``resnet``) backbones, the FPN pixel
decoder and the DETR transformer decoder of HF MaskFormer. Everything else fails with a ``ValueError``
that says what is not supported.
"""
import json
import logging
import math
import os
import re
from collections import defaultdict
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.modeling import build_model
from safetensors.torch import load_file

from ..config import add_mask_former_config
from ..modeling.backbone.swin import relative_position_index
from .published_layout import remap_published_keys

__all__ = [
    "HF_DROPPED_KEYS",
    "resolve_hf_checkpoint",
    "load_hf_maskformer",
    "hf_class_names",
    "hf_config_to_d2",
    "convert_hf_state_dict",
    "check_against_model",
    "convert_hf_maskformer",
]

logger = logging.getLogger(__name__)

# HF keys deliberately not converted, as (regex, reason).
HF_DROPPED_KEYS: List[Tuple[str, str]] = [
    (r".*\.num_batches_tracked$",
     "BatchNorm step counter; detectron2's (Frozen)BatchNorm2d has no such buffer and it does not "
     "affect inference"),
    (r"^model\.pixel_level_module\.encoder\.model\.layernorm\.(weight|bias)$",
     "final LayerNorm of HF's Swin trunk; MaskFormer's backbone outputs use the per-stage "
     "hidden_states_norms instead, so it never affects the outputs"),
]

# transformers' defaults, used for keys absent from config.json (transformers 4.x saved only the
# values that differ from these).
_MASKFORMER_DEFAULTS = dict(
    fpn_feature_size=256, mask_feature_size=256, no_object_weight=0.1, dice_weight=1.0,
    cross_entropy_weight=1.0, mask_weight=20.0, use_auxiliary_loss=False,
)
_DETR_DEFAULTS = dict(
    d_model=256, decoder_layers=6, decoder_attention_heads=8, decoder_ffn_dim=2048,
    num_queries=100, dropout=0.1, activation_function="relu", auxiliary_loss=False,
)
_SWIN_DEFAULTS = dict(
    image_size=224, patch_size=4, num_channels=3, embed_dim=96, depths=[2, 2, 6, 2],
    num_heads=[3, 6, 12, 24], window_size=7, mlp_ratio=4.0, qkv_bias=True,
    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.1,
    hidden_act="gelu", use_absolute_embeddings=False, layer_norm_eps=1e-5,
)
_RESNET_DEFAULTS = dict(
    num_channels=3, embedding_size=64, hidden_sizes=[256, 512, 1024, 2048], depths=[3, 4, 6, 3],
    layer_type="bottleneck", hidden_act="relu", downsample_in_first_stage=False,
    downsample_in_bottleneck=False,
)
# MaskFormerImageProcessor defaults: ImageNet mean/std on [0, 1] RGB images.
_IMAGENET_MEAN = [0.485, 0.456, 0.406]
_IMAGENET_STD = [0.229, 0.224, 0.225]

# detectron2 ResNet depth -> blocks per stage (build_resnet_backbone); 18/34 use BasicBlock.
_D2_RESNET_DEPTHS = {
    ("basic", (2, 2, 2, 2)): 18,
    ("basic", (3, 4, 6, 3)): 34,
    ("bottleneck", (3, 4, 6, 3)): 50,
    ("bottleneck", (3, 4, 23, 3)): 101,
    ("bottleneck", (3, 8, 36, 3)): 152,
}

_PIXEL = "model.pixel_level_module."
_BACKBONE = _PIXEL + "encoder."
_FPN = _PIXEL + "decoder."
_TRANSFORMER = "model.transformer_module."
_HEAD = "sem_seg_head."
_PREDICTOR = "sem_seg_head.predictor."


# ----------------------------------------------------------------------------- reading
# The files a conversion reads from a hub snapshot (config, preprocessor config, weights).
_HUB_FILES = ["config.json", "preprocessor_config.json", "model.safetensors", "model.safetensors.index.json",
              "model-*.safetensors"]
_HUB_LEGACY_WEIGHTS = ["pytorch_model.bin"]
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def resolve_hf_checkpoint(name_or_path: str, *, revision: Optional[str] = None, cache_dir: Optional[str] = None,
                          offline: Optional[bool] = None) -> str:
    """
    The local directory of a HuggingFace checkpoint.

    Args:
        name_or_path: a directory written by ``save_pretrained``, or a hub id (``owner/name``,
            e.g. ``facebook/maskformer-swin-base-ade``).
        revision: the hub revision (branch, tag or commit); None: "main".
        cache_dir: the HuggingFace cache; None: huggingface_hub's default (``HF_HUB_CACHE``,
            ``HF_HOME``, ``~/.cache/huggingface/hub``).
        offline: look only in the cache (``huggingface_hub.snapshot_download(...,
            local_files_only=True)``); None: offline when ``HF_HUB_OFFLINE`` is set. Online, the
            files are downloaded (the cache is used when the hub cannot be reached).
    Returns:
        a directory holding config.json and the weights (for a hub id, its snapshot in the cache).
    Raises:
        FileNotFoundError: not a directory, and not a hub id found on the hub or in the cache.
    """
    if os.path.isdir(name_or_path):
        return name_or_path
    if os.path.exists(name_or_path) or not _HUB_ID.fullmatch(name_or_path):
        raise FileNotFoundError(
            f"{name_or_path}: not a directory written by save_pretrained"
            + ("" if os.path.exists(name_or_path) else ", and not a HuggingFace hub id (owner/name)")
        )
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
    except ImportError as e:
        raise ImportError(f"{name_or_path!r} is not a local directory; reading it from the HuggingFace hub or "
                          "its cache needs `pip install huggingface_hub`") from e
    if offline is None:
        offline = bool(constants.HF_HUB_OFFLINE)
    where = cache_dir or constants.HF_HUB_CACHE
    try:
        if offline:
            directory = snapshot_download(name_or_path, revision=revision, cache_dir=cache_dir, local_files_only=True)
        else:
            directory = snapshot_download(name_or_path, revision=revision, cache_dir=cache_dir,
                                          allow_patterns=_HUB_FILES)
            if not any(name.endswith(".safetensors") for name in os.listdir(directory)):
                directory = snapshot_download(name_or_path, revision=revision, cache_dir=cache_dir,
                                              allow_patterns=_HUB_FILES + _HUB_LEGACY_WEIGHTS)
    except LocalEntryNotFoundError as e:
        raise FileNotFoundError(
            f"{name_or_path!r} is not a local directory and{' revision ' + repr(revision) if revision else ''} is "
            f"not in the HuggingFace cache {where} ({'offline' if offline else 'the hub cannot be reached'}). "
            f"Download it where the hub can be reached (`hf download {name_or_path}`, with the same "
            "HF_HOME / --cache-dir) or pass the directory of a save_pretrained copy"
        ) from e
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise FileNotFoundError(f"{name_or_path!r}: no such model (or revision) on the HuggingFace hub, or it is "
                                f"private: {type(e).__name__}: {e}") from e
    return directory

def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def _load_weights(directory: str) -> Dict[str, torch.Tensor]:
    """The state dict as saved on disk: model.safetensors, sharded safetensors or pytorch_model.bin."""
    single = os.path.join(directory, "model.safetensors")
    index = os.path.join(directory, "model.safetensors.index.json")
    legacy = os.path.join(directory, "pytorch_model.bin")
    if os.path.isfile(single) or os.path.isfile(index):
        if os.path.isfile(single):
            return load_file(single)
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        if not shards:
            raise ValueError(f"{index}: no 'weight_map' listing the safetensors shards")
        state_dict = {}
        for shard in shards:
            state_dict.update(load_file(os.path.join(directory, shard)))
        return state_dict
    if os.path.isfile(legacy):
        state_dict = torch.load(legacy, map_location="cpu", weights_only=True)
        if not isinstance(state_dict, dict):
            raise ValueError(f"{legacy}: expected a state dict, found {type(state_dict).__name__}")
        return state_dict
    found = sorted(os.listdir(directory))
    raise FileNotFoundError(
        f"{directory}: no HuggingFace weights found; expected model.safetensors, "
        f"model.safetensors.index.json or pytorch_model.bin (the directory holds {found})"
    )


def load_hf_maskformer(directory: str) -> Tuple[dict, Dict[str, torch.Tensor], Optional[dict]]:
    """
    Read a HuggingFace MaskFormer directory.

    Returns:
        (config.json as a dict, the state dict under its on-disk names,
         preprocessor_config.json as a dict or None when absent)
    """
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: not a directory (expected one written by save_pretrained)")
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{directory}: no config.json (expected a directory written by save_pretrained)")
    config = _read_json(config_path)
    if config.get("model_type") != "maskformer":
        raise ValueError(
            f"{config_path}: model_type is {config.get('model_type')!r}, expected 'maskformer' "
            "(a MaskFormerForInstanceSegmentation checkpoint; Mask2Former is not supported)"
        )
    preprocessor_path = os.path.join(directory, "preprocessor_config.json")
    preprocessor = _read_json(preprocessor_path) if os.path.isfile(preprocessor_path) else None
    return config, _load_weights(directory), preprocessor


# ----------------------------------------------------------------------------- config
def _with_defaults(section: dict, defaults: dict) -> dict:
    return {**defaults, **{k: v for k, v in section.items() if v is not None or k not in defaults}}


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _square(value, name: str) -> int:
    if isinstance(value, (list, tuple)):
        _require(len(value) == 2 and value[0] == value[1],
                 f"config.json backbone_config.{name}={value}: only square sizes are supported")
        return int(value[0])
    return int(value)


def _backbone_out_stages(backbone: dict, num_stages: int, force_all: bool) -> List[int]:
    """1-based indices of the stages whose features MaskFormer uses (HF's out_features)."""
    if force_all:
        return list(range(1, num_stages + 1))
    names = backbone.get("out_features")
    if names:
        bad = [n for n in names if not re.fullmatch(r"stage\d+", n) or not 1 <= int(n[5:]) <= num_stages]
        _require(not bad, f"config.json backbone_config.out_features={names}: {bad} are not stages "
                          f"stage1..stage{num_stages} (the stem cannot be a MaskFormer feature)")
        return sorted(int(n[5:]) for n in names)
    indices = backbone.get("out_indices")
    if indices:
        indices = [i % (num_stages + 1) for i in indices]
        _require(all(1 <= i <= num_stages for i in indices),
                 f"config.json backbone_config.out_indices={backbone['out_indices']}: index 0 is the "
                 "stem, which cannot be a MaskFormer feature")
        return sorted(indices)
    return [num_stages]  # transformers' default: the last stage only


def _swin_config(backbone: dict) -> dict:
    sw = _with_defaults(backbone, _SWIN_DEFAULTS)
    _require(not sw["use_absolute_embeddings"],
             "config.json backbone_config.use_absolute_embeddings=True is not supported: HF stores "
             "one embedding per patch plus a class token (1 x (N+1) x C), D2SwinTransformer a "
             "1 x C x H x W grid, and they are interpolated differently")
    _require(sw["hidden_act"] == "gelu",
             f"config.json backbone_config.hidden_act={sw['hidden_act']!r}: D2SwinTransformer uses "
             "exact GELU ('gelu') only")
    _require(math.isclose(sw["layer_norm_eps"], 1e-5),
             f"config.json backbone_config.layer_norm_eps={sw['layer_norm_eps']}: D2SwinTransformer's "
             "LayerNorms use eps 1e-5")
    _require(sw["num_channels"] == 3, f"config.json backbone_config.num_channels={sw['num_channels']}: "
                                      "only 3-channel (RGB) inputs are supported")
    depths, heads = list(sw["depths"]), list(sw["num_heads"])
    _require(len(depths) == len(heads), f"config.json backbone_config: depths {depths} and num_heads "
                                        f"{heads} differ in length")
    # MaskFormerPixelLevelModule forces all stages for model_type "swin" (converted on load to
    # "maskformer-swin"); a "maskformer-swin" config is used as written.
    stages = _backbone_out_stages(backbone, len(depths), force_all=backbone.get("model_type") == "swin")
    return {
        "BACKBONE": {"NAME": "D2SwinTransformer", "FREEZE_AT": 0},
        "SWIN": {
            "PRETRAIN_IMG_SIZE": _square(sw["image_size"], "image_size"),
            "PATCH_SIZE": _square(sw["patch_size"], "patch_size"),
            "EMBED_DIM": int(sw["embed_dim"]),
            "DEPTHS": [int(d) for d in depths],
            "NUM_HEADS": [int(h) for h in heads],
            "WINDOW_SIZE": int(sw["window_size"]),
            "MLP_RATIO": float(sw["mlp_ratio"]),
            "QKV_BIAS": bool(sw["qkv_bias"]),
            "QK_SCALE": None,
            "DROP_RATE": float(sw["hidden_dropout_prob"]),
            "ATTN_DROP_RATE": float(sw["attention_probs_dropout_prob"]),
            "DROP_PATH_RATE": float(sw["drop_path_rate"]),
            "APE": False,
            "PATCH_NORM": True,
            "OUT_FEATURES": [f"res{s + 1}" for s in stages],
        },
    }


def _resnet_config(backbone: dict) -> dict:
    rn = _with_defaults(backbone, _RESNET_DEFAULTS)
    _require(rn["hidden_act"] == "relu", f"config.json backbone_config.hidden_act={rn['hidden_act']!r}: "
                                         "detectron2's ResNet uses ReLU only")
    _require(not rn["downsample_in_first_stage"],
             "config.json backbone_config.downsample_in_first_stage=True is not supported: detectron2's "
             "res2 does not downsample")
    _require(rn["num_channels"] == 3, f"config.json backbone_config.num_channels={rn['num_channels']}: "
                                      "only 3-channel (RGB) inputs are supported")
    layer_type, depths, widths = rn["layer_type"], tuple(rn["depths"]), list(rn["hidden_sizes"])
    depth = _D2_RESNET_DEPTHS.get((layer_type, depths))
    if depth is None:
        known = ", ".join(f"{t} {list(d)} (R{n})" for (t, d), n in _D2_RESNET_DEPTHS.items())
        raise ValueError(
            f"config.json backbone_config: layer_type={layer_type!r} with depths={list(depths)} has no "
            f"detectron2 ResNet equivalent; supported: {known}"
        )
    _require(len(widths) == 4 and all(widths[i + 1] == 2 * widths[i] for i in range(3)),
             f"config.json backbone_config.hidden_sizes={widths}: detectron2's ResNet doubles the "
             "channels at every stage")
    resnets = {
        "DEPTH": depth,
        "STEM_TYPE": "basic",
        "STEM_OUT_CHANNELS": int(rn["embedding_size"]),
        "RES2_OUT_CHANNELS": int(widths[0]),
        "NUM_GROUPS": 1,
        "RES5_DILATION": 1,
        "DEFORM_ON_PER_STAGE": [False, False, False, False],
        "NORM": "FrozenBN",
        "OUT_FEATURES": [f"res{s + 1}" for s in _backbone_out_stages(backbone, 4, force_all=False)],
    }
    if layer_type == "bottleneck":
        _require(widths[0] % 4 == 0, f"config.json backbone_config.hidden_sizes={widths}: bottleneck "
                                     "widths must be multiples of 4")
        # HF's bottleneck width is out_channels // 4; its stride sits in the 3x3 conv unless
        # downsample_in_bottleneck, exactly detectron2's STRIDE_IN_1X1.
        resnets["WIDTH_PER_GROUP"] = widths[0] // 4
        resnets["STRIDE_IN_1X1"] = bool(rn["downsample_in_bottleneck"])
    else:
        _require(widths[0] == 64, f"config.json backbone_config.hidden_sizes={widths}: detectron2's "
                                  f"R{depth} needs 64 channels in res2")
    return {"BACKBONE": {"NAME": "build_resnet_backbone", "FREEZE_AT": 0}, "RESNETS": resnets}


def _normalization(preprocessor: Optional[dict]) -> Tuple[List[float], List[float]]:
    """PIXEL_MEAN/STD on 0-255 RGB images equivalent to the HF processor's rescale + normalize:
    (x * r - m) / s == (x - m / r) / (s / r)."""
    if preprocessor is None:
        return [round(255.0 * m, 6) for m in _IMAGENET_MEAN], [round(255.0 * s, 6) for s in _IMAGENET_STD]
    rescale = preprocessor.get("rescale_factor", 1 / 255) if preprocessor.get("do_rescale", True) else 1.0
    if preprocessor.get("do_normalize", True):
        mean = preprocessor.get("image_mean", _IMAGENET_MEAN)
        std = preprocessor.get("image_std", _IMAGENET_STD)
    else:
        mean, std = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    mean = [float(mean)] * 3 if isinstance(mean, (int, float)) else [float(m) for m in mean]
    std = [float(std)] * 3 if isinstance(std, (int, float)) else [float(s) for s in std]
    _require(len(mean) == 3 and len(std) == 3 and all(s > 0 for s in std) and rescale > 0,
             f"preprocessor_config.json: image_mean={mean}, image_std={std}, rescale_factor={rescale}; "
             "expected 3 values each, positive std and rescale factor")
    # rounded so that 0.485 * 255 reads 123.675, not 123.67499999999998
    return [round(m / rescale, 6) for m in mean], [round(s / rescale, 6) for s in std]


def _test_sizes(preprocessor: Optional[dict]) -> dict:
    """INPUT.MIN/MAX_SIZE_TEST from the processor's resize settings, when it has them."""
    if preprocessor is None:
        return {}
    size = preprocessor.get("size")
    shortest = longest = None
    if isinstance(size, dict):
        shortest, longest = size.get("shortest_edge"), size.get("longest_edge")
    elif isinstance(size, int):
        shortest = size
    longest = longest or preprocessor.get("max_size")
    out = {}
    if shortest:
        out["MIN_SIZE_TEST"] = int(shortest)
    if longest:
        out["MAX_SIZE_TEST"] = int(longest)
    return out


def hf_class_names(config: dict) -> Optional[List[str]]:
    """The class names of a HF config (``id2label``, ids 0..K-1), or None when it has none."""
    id2label = config.get("id2label")
    if not id2label:
        return None
    labels = {int(k): str(v) for k, v in id2label.items()}
    if sorted(labels) != list(range(len(labels))):
        raise ValueError(f"config.json id2label has ids {sorted(labels)}; expected 0..{len(labels) - 1}")
    return [labels[i] for i in range(len(labels))]


def _num_classes(config: dict) -> int:
    if config.get("id2label"):
        return len(config["id2label"])
    if config.get("num_labels"):
        return int(config["num_labels"])
    raise ValueError("config.json has neither id2label nor num_labels: cannot tell the number of classes")


def hf_config_to_d2(config: dict, preprocessor: Optional[dict] = None) -> dict:
    """
    Args:
        config: a HF MaskFormer config.json as a dict.
        preprocessor: its preprocessor_config.json as a dict, or None (then ImageNet mean/std).
    Returns:
        nested dict of detectron2 config values (``{"MODEL": {...}, "INPUT": {...}}``) describing
        the same architecture; plain Python types only, so it dumps to plain YAML and merges into
        ``get_cfg()`` after ``add_mask_former_config``.
    """
    mf = _with_defaults(config, _MASKFORMER_DEFAULTS)
    backbone = config.get("backbone_config")
    _require(isinstance(backbone, dict), "config.json has no backbone_config")
    if backbone.get("model_type") in ("swin", "maskformer-swin"):
        model = _swin_config(backbone)
        out_features = model["SWIN"]["OUT_FEATURES"]
    elif backbone.get("model_type") == "resnet":
        model = _resnet_config(backbone)
        out_features = model["RESNETS"]["OUT_FEATURES"]
    else:
        raise ValueError(
            f"config.json backbone_config.model_type={backbone.get('model_type')!r} is not supported; "
            "expected 'swin', 'maskformer-swin' or 'resnet' (timm backbones have no detectron2 equivalent)"
        )

    decoder = config.get("decoder_config") or {}
    _require(decoder.get("model_type", "detr") == "detr",
             f"config.json decoder_config.model_type={decoder.get('model_type')!r}: only 'detr' is supported")
    dec = _with_defaults(decoder, _DETR_DEFAULTS)
    _require(dec["activation_function"] == "relu",
             f"config.json decoder_config.activation_function={dec['activation_function']!r}: the "
             "transformer decoder's feed-forward uses ReLU")
    _require(not dec["auxiliary_loss"],
             "config.json decoder_config.auxiliary_loss=True: with it HF's DETR decoder feeds the "
             "LayerNorm-ed output of each layer into the next one, which MaskFormer's (and DETR's) "
             "decoder does not; the converted model would compute something else")
    _require(mf["fpn_feature_size"] % 32 == 0,
             f"config.json fpn_feature_size={mf['fpn_feature_size']}: GroupNorm(32) needs a multiple of 32")

    mean, std = _normalization(preprocessor)
    class_names = hf_class_names(config)
    model = {"META_ARCHITECTURE": "MaskFormer", **model}
    model.update({
        "PIXEL_MEAN": mean,
        "PIXEL_STD": std,
        "SEM_SEG_HEAD": {
            "NAME": "MaskFormerHead",
            "IN_FEATURES": list(out_features),
            "NUM_CLASSES": _num_classes(config),
            "COMMON_STRIDE": 4,
            "CONVS_DIM": int(mf["fpn_feature_size"]),
            "MASK_DIM": int(mf["mask_feature_size"]),
            "NORM": "GN",
            "PIXEL_DECODER_NAME": "BasePixelDecoder",
            "TRANSFORMER_ENC_LAYERS": 0,
        },
        "MASK_FORMER": {
            # HF's transformer decoder attends to the coarsest backbone feature
            "TRANSFORMER_IN_FEATURE": out_features[-1],
            "TRANSFORMER_DECODER_NAME": "StandardTransformerDecoder",
            "HIDDEN_DIM": int(dec["d_model"]),
            "NUM_OBJECT_QUERIES": int(dec["num_queries"]),
            "NHEADS": int(dec["decoder_attention_heads"]),
            "DROPOUT": float(dec["dropout"]),
            "DIM_FEEDFORWARD": int(dec["decoder_ffn_dim"]),
            "ENC_LAYERS": 0,
            "DEC_LAYERS": int(dec["decoder_layers"]),
            "PRE_NORM": False,
            "ENFORCE_INPUT_PROJ": False,
            "NO_OBJECT_WEIGHT": float(mf["no_object_weight"]),
            "CLASS_WEIGHT": float(mf["cross_entropy_weight"]),
            "DICE_WEIGHT": float(mf["dice_weight"]),
            "MASK_WEIGHT": float(mf["mask_weight"]),
        },
    })
    if class_names is not None:
        model["CLASS_NAMES"] = class_names  # the predictor and the demo label classes with them
    return {"MODEL": model, "INPUT": {"FORMAT": "RGB", **_test_sizes(preprocessor)}}


# ----------------------------------------------------------------------------- weights
# In-memory (transformers 5.x module) spellings -> on-disk spellings of the DETR decoder.
_DECODER_ALIASES = [
    (re.compile(r"^(model\.transformer_module\.decoder\.layers\.\d+\.(?:self_attn|encoder_attn))\.o_proj\."),
     r"\1.out_proj."),
    (re.compile(r"^(model\.transformer_module\.decoder\.layers\.\d+)\.mlp\.(fc[12])\."), r"\1.\2."),
]

_DECODER_LAYER_RENAMES = {
    "self_attn.out_proj": "self_attn.out_proj",
    "encoder_attn.out_proj": "multihead_attn.out_proj",
    "self_attn_layer_norm": "norm1",
    "encoder_attn_layer_norm": "norm2",
    "final_layer_norm": "norm3",
    "fc1": "linear1",
    "fc2": "linear2",
}

_SWIN_BLOCK_RENAMES = {
    "layernorm_before": "norm1",
    "attention.self.relative_position_bias_table": "attn.relative_position_bias_table",
    "attention.self.relative_position_index": "attn.relative_position_index",
    "attention.output.dense": "attn.proj",
    "layernorm_after": "norm2",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}


def _fpn_rules(num_levels: int) -> List[Tuple[str, object]]:
    """HF FPN -> BasePixelDecoder in the published flat layout. HF's stem is the coarsest level
    (``layer_{n}``); HF's ``fpn.layers.j`` handles the (j+1)-th coarsest lateral (``_{n-1-j}``)."""
    n = num_levels

    def lateral(m, kind, ours):
        j = int(m.group(1))
        _require(j < n - 1, f"HF key {m.group(0)}: FPN layer {j} but the backbone has {n} output stages")
        return f"{_HEAD}{ours}_{n - 1 - j}{kind}"

    return [
        (rf"^{re.escape(_FPN)}fpn\.stem\.0\.weight$", f"{_HEAD}layer_{n}.weight"),
        (rf"^{re.escape(_FPN)}fpn\.stem\.1\.(weight|bias)$", lambda m: f"{_HEAD}layer_{n}.norm.{m.group(1)}"),
        (rf"^{re.escape(_FPN)}fpn\.layers\.(\d+)\.proj\.0\.weight$", lambda m: lateral(m, ".weight", "adapter")),
        (rf"^{re.escape(_FPN)}fpn\.layers\.(\d+)\.proj\.1\.(weight|bias)$",
         lambda m: lateral(m, f".norm.{m.group(2)}", "adapter")),
        (rf"^{re.escape(_FPN)}fpn\.layers\.(\d+)\.block\.0\.weight$", lambda m: lateral(m, ".weight", "layer")),
        (rf"^{re.escape(_FPN)}fpn\.layers\.(\d+)\.block\.1\.(weight|bias)$",
         lambda m: lateral(m, f".norm.{m.group(2)}", "layer")),
        (rf"^{re.escape(_FPN)}mask_projection\.(weight|bias)$", lambda m: f"{_HEAD}mask_features.{m.group(1)}"),
    ]


def _predictor_rules() -> List[Tuple[str, object]]:
    dec = re.escape(_TRANSFORMER + "decoder.")
    layer_names = "|".join(re.escape(k) for k in _DECODER_LAYER_RENAMES)
    return [
        (rf"^{dec}layers\.(\d+)\.({layer_names})\.(weight|bias)$",
         lambda m: f"{_PREDICTOR}transformer.decoder.layers.{m.group(1)}."
                   f"{_DECODER_LAYER_RENAMES[m.group(2)]}.{m.group(3)}"),
        (rf"^{dec}layernorm\.(weight|bias)$", lambda m: f"{_PREDICTOR}transformer.decoder.norm.{m.group(1)}"),
        (rf"^{re.escape(_TRANSFORMER)}queries_embedder\.weight$", f"{_PREDICTOR}query_embed.weight"),
        (rf"^{re.escape(_TRANSFORMER)}input_projection\.(weight|bias)$",
         lambda m: f"{_PREDICTOR}input_proj.{m.group(1)}"),
        (r"^class_predictor\.(weight|bias)$", lambda m: f"{_PREDICTOR}class_embed.{m.group(1)}"),
        (r"^mask_embedder\.(\d+)\.0\.(weight|bias)$",
         lambda m: f"{_PREDICTOR}mask_embed.layers.{m.group(1)}.{m.group(2)}"),
        (r"^criterion\.empty_weight$", "criterion.empty_weight"),
    ]


def _swin_rules(out_stages: List[int]) -> List[Tuple[str, object]]:
    sw = re.escape(_BACKBONE + "model.")
    block_names = "|".join(re.escape(k) for k in _SWIN_BLOCK_RENAMES)

    def stage_norm(m):
        i = int(m.group(1))
        if i + 1 not in out_stages:
            # a "maskformer-swin" config whose out_features omit this stage: HF computes the
            # norm but discards its output, and D2SwinTransformer has no norm there
            return None
        return f"backbone.norm{i}.{m.group(2)}"

    return [
        (rf"^{sw}embeddings\.patch_embeddings\.projection\.(weight|bias)$",
         lambda m: f"backbone.patch_embed.proj.{m.group(1)}"),
        (rf"^{sw}embeddings\.norm\.(weight|bias)$", lambda m: f"backbone.patch_embed.norm.{m.group(1)}"),
        (rf"^{sw}encoder\.layers\.(\d+)\.blocks\.(\d+)\.({block_names})(\.weight|\.bias|)$",
         lambda m: f"backbone.layers.{m.group(1)}.blocks.{m.group(2)}."
                   f"{_SWIN_BLOCK_RENAMES[m.group(3)]}{m.group(4)}"),
        (rf"^{sw}encoder\.layers\.(\d+)\.downsample\.(reduction\.weight|norm\.weight|norm\.bias)$",
         lambda m: f"backbone.layers.{m.group(1)}.downsample.{m.group(2)}"),
        (rf"^{re.escape(_BACKBONE)}hidden_states_norms\.(\d+)\.(weight|bias)$", stage_norm),
    ]


def _resnet_rules() -> List[Tuple[str, object]]:
    rn = re.escape(_BACKBONE)
    bn = r"(weight|bias|running_mean|running_var)"
    return [
        (rf"^{rn}embedder\.embedder\.convolution\.weight$", "backbone.stem.conv1.weight"),
        (rf"^{rn}embedder\.embedder\.normalization\.{bn}$", lambda m: f"backbone.stem.conv1.norm.{m.group(1)}"),
        (rf"^{rn}encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.convolution\.weight$",
         lambda m: f"backbone.res{int(m.group(1)) + 2}.{m.group(2)}.conv{int(m.group(3)) + 1}.weight"),
        (rf"^{rn}encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.normalization\.{bn}$",
         lambda m: f"backbone.res{int(m.group(1)) + 2}.{m.group(2)}.conv{int(m.group(3)) + 1}.norm.{m.group(4)}"),
        (rf"^{rn}encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.convolution\.weight$",
         lambda m: f"backbone.res{int(m.group(1)) + 2}.{m.group(2)}.shortcut.weight"),
        (rf"^{rn}encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.normalization\.{bn}$",
         lambda m: f"backbone.res{int(m.group(1)) + 2}.{m.group(2)}.shortcut.norm.{m.group(3)}"),
    ]


# Groups of separate q/k/v projections fused into one, as (regex with the q/k/v name as group
# "part", order of the parts, target).
def _fused_rules() -> List[Tuple[re.Pattern, Tuple[str, str, str], object]]:
    dec = re.escape(_TRANSFORMER + "decoder.")
    sw = re.escape(_BACKBONE + "model.")
    attn = {"self_attn": "self_attn", "encoder_attn": "multihead_attn"}
    return [
        # DETR decoder: nn.MultiheadAttention keeps q, k, v stacked in in_proj_weight/bias.
        (re.compile(rf"^{dec}layers\.(?P<l>\d+)\.(?P<a>self_attn|encoder_attn)\."
                    r"(?P<part>[qkv])_proj\.(?P<p>weight|bias)$"),
         ("q", "k", "v"),
         lambda m: f"{_PREDICTOR}transformer.decoder.layers.{m['l']}.{attn[m['a']]}.in_proj_{m['p']}"),
        # Swin: one qkv Linear whose outputs are laid out (3, heads, head_dim).
        (re.compile(rf"^{sw}encoder\.layers\.(?P<s>\d+)\.blocks\.(?P<b>\d+)\.attention\.self\."
                    r"(?P<part>query|key|value)\.(?P<p>weight|bias)$"),
         ("query", "key", "value"),
         lambda m: f"backbone.layers.{m['s']}.blocks.{m['b']}.attn.qkv.{m['p']}"),
    ]


def _to_numpy(value: torch.Tensor, key: str) -> np.ndarray:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"HF weight {key!r} is a {type(value).__name__}, not a tensor")
    value = value.detach().cpu()
    if value.is_floating_point():
        value = value.float()
    return value.numpy()


def _backbone_out_stages_from(d2_model_cfg: dict) -> List[int]:
    features = d2_model_cfg["SEM_SEG_HEAD"]["IN_FEATURES"]
    return [int(f[3:]) - 1 for f in features]


def convert_hf_state_dict(state_dict: Dict[str, torch.Tensor], d2_config: dict,
                          source: str = "HF checkpoint") -> Dict[str, np.ndarray]:
    """
    Rename (and fuse q/k/v of) a HF MaskFormer state dict into the published MaskFormer layout.

    Args:
        state_dict: HF weights under their on-disk (or transformers 5.x in-memory) names.
        d2_config: what :func:`hf_config_to_d2` returned for the same checkpoint.
        source: name of the checkpoint, for error messages.
    Returns:
        detectron2 key -> numpy array (floats as float32).
    Raises:
        KeyError: listing every HF key that maps to nothing (other than :data:`HF_DROPPED_KEYS`),
            or incomplete q/k/v groups.
    """
    model_cfg = d2_config["MODEL"]
    out_stages = _backbone_out_stages_from(model_cfg)
    if model_cfg["BACKBONE"]["NAME"] == "D2SwinTransformer":
        backbone_rules = _swin_rules(out_stages)
    else:
        backbone_rules = _resnet_rules()
    rules = [(re.compile(p), t) for p, t in
             backbone_rules + _fpn_rules(len(out_stages)) + _predictor_rules()]
    dropped = [(re.compile(p), reason) for p, reason in HF_DROPPED_KEYS]
    fused = _fused_rules()

    weights: Dict[str, np.ndarray] = {}
    groups: Dict[str, Dict[str, Tuple[str, torch.Tensor]]] = defaultdict(dict)
    group_order: Dict[str, Tuple[str, ...]] = {}
    unmapped = []

    def put(d2_key: str, value: np.ndarray, hf_key: str):
        if d2_key in weights:
            raise KeyError(f"{source}: HF key {hf_key!r} maps to {d2_key!r}, which another HF key already filled")
        weights[d2_key] = value

    for key in sorted(state_dict):
        value = state_dict[key]
        hf_key = key
        for pattern, replacement in _DECODER_ALIASES:
            hf_key = pattern.sub(replacement, hf_key)
        if any(p.match(hf_key) for p, _ in dropped):
            continue
        if hf_key.startswith(_BACKBONE + "model.embeddings.position_embeddings"):
            raise ValueError(f"{source}: {key!r}: Swin absolute position embeddings are not supported")
        for pattern, order, target in fused:
            m = pattern.match(hf_key)
            if m:
                d2_key = target(m)
                groups[d2_key][m["part"]] = (key, value)
                group_order[d2_key] = order
                break
        else:
            for pattern, target in rules:
                m = pattern.match(hf_key)
                if m:
                    d2_key = target(m) if callable(target) else target
                    if d2_key is not None:  # None: a Swin stage norm whose output HF discards too
                        put(d2_key, _to_numpy(value, key), key)
                    break
            else:
                unmapped.append(key)

    incomplete = []
    for d2_key, parts in sorted(groups.items()):
        order = group_order[d2_key]
        missing = [p for p in order if p not in parts]
        if missing:
            incomplete.append(f"{d2_key} (have {sorted(k for k, _ in parts.values())}, missing the {missing} parts)")
            continue
        put(d2_key, np.concatenate([_to_numpy(parts[p][1], parts[p][0]) for p in order], axis=0), parts[order[0]][0])
    if unmapped or incomplete:
        lines = [f"{source}: cannot convert every HuggingFace weight."]
        if unmapped:
            lines.append(f"{len(unmapped)} HF keys map to no detectron2 key: " + ", ".join(unmapped))
        if incomplete:
            lines.append("incomplete q/k/v groups: " + "; ".join(incomplete))
        raise KeyError("\n".join(lines))
    return weights


def _fill_derived(weights: Dict[str, np.ndarray], d2_config: dict) -> List[str]:
    """Add the buffers that follow from the config when a checkpoint lacks them (older
    transformers versions did not always save them). Returns the keys added."""
    model_cfg, added = d2_config["MODEL"], []
    if "criterion.empty_weight" not in weights:
        empty_weight = np.ones(model_cfg["SEM_SEG_HEAD"]["NUM_CLASSES"] + 1, dtype=np.float32)
        empty_weight[-1] = model_cfg["MASK_FORMER"]["NO_OBJECT_WEIGHT"]
        weights["criterion.empty_weight"] = empty_weight
        added.append("criterion.empty_weight")
    if model_cfg["BACKBONE"]["NAME"] == "D2SwinTransformer":
        swin = model_cfg["SWIN"]
        index = relative_position_index(swin["WINDOW_SIZE"]).numpy()
        for stage, depth in enumerate(swin["DEPTHS"]):
            for block in range(depth):
                key = f"backbone.layers.{stage}.blocks.{block}.attn.relative_position_index"
                if key not in weights:
                    weights[key] = index.copy()
                    added.append(key)
    return added


# ----------------------------------------------------------------------------- checking
def check_against_model(weights: Dict[str, np.ndarray], d2_config: dict) -> None:
    """
    Build the model that ``d2_config`` describes and require the converted weights to fill it
    exactly: no missing keys, no unexpected keys, same shapes (the published flat pixel-decoder
    layout is remapped as the model's checkpoint loading does).

    Raises:
        KeyError: listing missing and unexpected keys; ValueError: listing shape mismatches.
    """
    cfg = get_cfg()
    add_mask_former_config(cfg)
    cfg.merge_from_other_cfg(CfgNode(d2_config))
    cfg.MODEL.DEVICE = "cpu"
    cfg.DATASETS.TEST = ()
    model = build_model(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}

    converted = {k: v for k, v in weights.items()}
    remap_published_keys(converted, expected)
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    if missing or unexpected:
        raise KeyError(
            f"converted weights do not match the model built from the converted config: "
            f"{len(missing)} missing ({', '.join(missing)}), {len(unexpected)} unexpected "
            f"({', '.join(unexpected)})"
        )
    wrong = [f"{k}: converted {tuple(converted[k].shape)} vs model {expected[k]}"
             for k in sorted(expected) if tuple(converted[k].shape) != expected[k]]
    if wrong:
        raise ValueError("converted weights have the wrong shape for the model built from the converted "
                         "config: " + "; ".join(wrong))
    _check_swin_index(converted)


def _check_swin_index(weights: Dict[str, np.ndarray]) -> None:
    """HF and this project compute the relative position index the same way; refuse a checkpoint
    whose stored index says otherwise (its bias table would be read in another order)."""
    for key, value in weights.items():
        if key.endswith("attn.relative_position_index"):
            window = int(round(math.sqrt(value.shape[0])))
            if not np.array_equal(value, relative_position_index(window).numpy()):
                raise ValueError(f"{key}: the checkpoint's relative position index differs from "
                                 f"D2SwinTransformer's for window size {window}")


def convert_hf_maskformer(directory: str, verify: bool = True) -> Tuple[Dict[str, np.ndarray], dict]:
    """
    Convert a HF MaskFormer directory.

    Args:
        directory: written by ``save_pretrained`` (config.json + weights, optionally
            preprocessor_config.json).
        verify: build the model from the converted config and check the weights fill it exactly.
    Returns:
        (detectron2 weights key -> numpy array in the published layout, nested config dict)
    """
    config, state_dict, preprocessor = load_hf_maskformer(directory)
    d2_config = hf_config_to_d2(config, preprocessor)
    weights = convert_hf_state_dict(state_dict, d2_config, source=directory)
    added = _fill_derived(weights, d2_config)
    if added:
        logger.info(f"{directory}: computed {len(added)} buffers the checkpoint lacks from its config: "
                    + ", ".join(added))
    if verify:
        check_against_model(weights, d2_config)
    return weights, d2_config
