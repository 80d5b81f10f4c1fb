"""Tests of tools/convert-hf-to-d2.py: HuggingFace transformers MaskFormer -> this project.

Small randomly initialised HF models (Swin and ResNet backbones) are saved with save_pretrained,
converted with the tool, loaded into ``build_model(cfg)`` and run on the same normalized image:
class logits, mask logits and the semantic segmentation must match HuggingFace's own outputs.
The tool also reads hub ids from a HuggingFace cache (written here in the cache's layout) and
writes the class names into the converted config, where ``mask_former.demo.Predictor`` finds them.
"""
import importlib.util
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

# transformers is pinned in requirements.txt: a missing install fails here instead of skipping
from transformers import (
    MaskFormerConfig,
    MaskFormerDetrConfig,
    MaskFormerForInstanceSegmentation,
    MaskFormerImageProcessor,
    ResNetConfig,
    SwinConfig,
)

import mask_former  # noqa: F401  (registers the meta-architecture, heads and backbones)
from mask_former.checkpoint import MaskFormerCheckpointer
from mask_former.checkpoint.hf_conversion import (
    convert_hf_maskformer,
    convert_hf_state_dict,
    hf_config_to_d2,
    load_hf_maskformer,
    resolve_hf_checkpoint,
)
from mask_former.config import add_mask_former_config
from mask_former.demo import Predictor

TOOL = Path(__file__).resolve().parents[1] / "tools" / "convert-hf-to-d2.py"
HEIGHT, WIDTH = 64, 96  # multiples of 32: neither model pads
CLASS_NAMES = ["wall", "sky", "tree"]  # id2label of the small models


def load_tool():
    spec = importlib.util.spec_from_file_location("convert_hf_to_d2", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def small_decoder_config(**kwargs):
    return MaskFormerDetrConfig(d_model=32, decoder_layers=2, decoder_attention_heads=4,
                                decoder_ffn_dim=64, num_queries=5, **kwargs)


def small_maskformer_config(backbone_config, decoder_config=None):
    return MaskFormerConfig(
        backbone_config=backbone_config,
        decoder_config=decoder_config or small_decoder_config(),
        fpn_feature_size=32,
        mask_feature_size=32,
        id2label=dict(enumerate(CLASS_NAMES)),
        label2id={name: i for i, name in enumerate(CLASS_NAMES)},
        no_object_weight=0.2,
    )


def small_swin_config(**kwargs):
    keys = dict(embed_dim=32, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8], window_size=4, image_size=64,
                drop_path_rate=0.0, out_features=["stage1", "stage2", "stage3", "stage4"])
    keys.update(kwargs)
    return SwinConfig(**keys)


def small_resnet_config():
    # ResNet-50 layout (bottleneck blocks 3-4-6-3), few channels
    return ResNetConfig(embedding_size=16, hidden_sizes=[32, 64, 128, 256], depths=[3, 4, 6, 3],
                        layer_type="bottleneck", out_features=["stage1", "stage2", "stage3", "stage4"])


def randomize_(model: nn.Module, seed: int) -> None:
    """Give every norm, bias, the query embeddings and the Swin position-bias tables non-trivial
    values (HF initialises them to 1 / 0 or, for the queries, all alike), so that a weight mapped
    to the wrong place changes the outputs."""
    g = torch.Generator().manual_seed(seed)

    def rand(t, scale, offset=0.0):
        t.copy_(offset + scale * torch.randn(t.shape, generator=g))

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d)):
                rand(module.weight, 0.2, 1.0)
                rand(module.bias, 0.2)
                if isinstance(module, nn.BatchNorm2d):
                    rand(module.running_mean, 0.2)
                    module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=g))
            elif isinstance(module, (nn.Linear, nn.Conv2d)) and module.bias is not None:
                rand(module.bias, 0.1)
        # HF draws the query decoder's projections from N(0, 0.02): attention is then nearly
        # uniform and all queries predict the same; use unit-gain weights instead
        for module in model.model.transformer_module.decoder.modules():
            if isinstance(module, nn.Linear):
                rand(module.weight, module.in_features ** -0.5)
        for name, param in model.named_parameters():
            if name.endswith("relative_position_bias_table") or name.endswith("queries_embedder.weight"):
                rand(param, 3.0 if name.endswith("queries_embedder.weight") else 0.5)
            # sharper class and mask predictions, so that the semantic map is not one class
            elif name == "class_predictor.weight":
                rand(param, 1.0)
            elif name == "mask_embedder.2.0.weight":
                param.mul_(5.0)


def save_hf_model(config, directory: Path, seed: int, preprocessor=None) -> MaskFormerForInstanceSegmentation:
    torch.manual_seed(seed)
    model = MaskFormerForInstanceSegmentation(config)
    randomize_(model, seed)
    model.eval()
    model.save_pretrained(str(directory))
    if preprocessor is not None:
        preprocessor.save_pretrained(str(directory))
    return model


@pytest.fixture(scope="module")
def hf_swin(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf_swin")
    return directory, save_hf_model(small_maskformer_config(small_swin_config()), directory, seed=0)


@pytest.fixture(scope="module")
def hf_resnet(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf_resnet")
    processor = MaskFormerImageProcessor(image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3],
                                         size={"shortest_edge": 512, "longest_edge": 2048})
    model = save_hf_model(small_maskformer_config(small_resnet_config()), directory, seed=1,
                          preprocessor=processor)
    return directory, model


def convert_with_tool(hf_dir: Path, out_dir: Path):
    pkl, yaml_path = out_dir / "model.pkl", out_dir / "model.yaml"
    load_tool().main([str(hf_dir), str(pkl)])
    return pkl, yaml_path


def build_converted(pkl: Path, yaml_path: Path):
    """Model built from the converted YAML, with the converted weights loaded; the weights must
    fill it exactly."""
    cfg = get_cfg()
    add_mask_former_config(cfg)
    cfg.merge_from_file(str(yaml_path))
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg).eval()
    checkpointer = MaskFormerCheckpointer(model)
    incompatible = checkpointer._load_model(checkpointer._load_file(str(pkl)))
    assert not incompatible.missing_keys, f"missing keys: {incompatible.missing_keys}"
    assert not incompatible.unexpected_keys, f"unexpected keys: {incompatible.unexpected_keys}"
    assert not incompatible.incorrect_shapes, f"wrong shapes: {incompatible.incorrect_shapes}"
    return cfg, model


def expected_sem_seg(class_logits: torch.Tensor, mask_logits: torch.Tensor, size) -> torch.Tensor:
    """Semantic scores K x H x W from one image's HF outputs (Q x (K+1), Q x h x w): mask logits
    upsampled to the (unpadded) input size, then sum over queries of P(class) * sigmoid(mask)."""
    masks = F.interpolate(mask_logits[None], size=size, mode="bilinear", align_corners=False)[0]
    return torch.einsum("qc,qhw->chw", class_logits.softmax(-1)[:, :-1], masks.sigmoid())


def make_test_image() -> torch.Tensor:
    """3 x HEIGHT x WIDTH RGB in 0-255, as the dataset mappers give it: noisy colour blocks."""
    g = torch.Generator().manual_seed(2)
    image = torch.rand(3, HEIGHT, WIDTH, generator=g) * 60
    image[:, : HEIGHT // 2, : WIDTH // 3] += torch.tensor([180.0, 20.0, 20.0])[:, None, None]
    image[:, HEIGHT // 2 :, WIDTH // 3 :] += torch.tensor([20.0, 180.0, 150.0])[:, None, None]
    image[:, :, 2 * WIDTH // 3 :] += torch.tensor([10.0, 10.0, 190.0])[:, None, None]
    return image.clamp(0, 255)


def compare_with_hf(hf_model, model):
    image = make_test_image()
    # the normalization the converted model applies, fed to HF as its pixel_values
    pixel_values = ((image - model.pixel_mean) / model.pixel_std)[None]
    with torch.no_grad():
        hf_out = hf_model(pixel_values=pixel_values)
        ours = model.sem_seg_head(model.backbone(pixel_values))
        sem_seg = model([{"image": image, "height": HEIGHT, "width": WIDTH}])[0]["sem_seg"]

    hf_logits, hf_masks = hf_out.class_queries_logits, hf_out.masks_queries_logits
    assert ours["pred_logits"].shape == hf_logits.shape == (1, 5, 4)
    assert ours["pred_masks"].shape == hf_masks.shape == (1, 5, HEIGHT // 4, WIDTH // 4)
    # the outputs must carry signal, or matching them would prove little
    assert hf_logits.std() > 0.05 and hf_masks.std() > 0.05
    assert (ours["pred_logits"] - hf_logits).abs().max() <= 1e-4
    assert (ours["pred_masks"] - hf_masks).abs().max() <= 1e-4

    expected = expected_sem_seg(hf_logits[0], hf_masks[0], (HEIGHT, WIDTH))
    assert sem_seg.shape == expected.shape == (3, HEIGHT, WIDTH)
    assert (sem_seg - expected).abs().max() <= 1e-4
    assert torch.equal(sem_seg.argmax(0), expected.argmax(0))
    # the classes' scores must differ, or comparing them would prove little
    assert (expected.max(0).values - expected.min(0).values).mean() > 0.05


def test_swin_model_matches_hf(hf_swin, tmp_path):
    hf_dir, hf_model = hf_swin
    pkl, yaml_path = convert_with_tool(hf_dir, tmp_path)
    with open(pkl, "rb") as f:
        checkpoint = pickle.load(f)
    assert checkpoint["__author__"] == "huggingface-converted"
    assert checkpoint["matching_heuristics"] is False
    assert all(isinstance(v, np.ndarray) for v in checkpoint["model"].values())
    assert "!!python" not in yaml_path.read_text()
    _, model = build_converted(pkl, yaml_path)
    compare_with_hf(hf_model, model)


def test_resnet_model_matches_hf(hf_resnet, tmp_path):
    hf_dir, hf_model = hf_resnet
    pkl, yaml_path = convert_with_tool(hf_dir, tmp_path)
    cfg, model = build_converted(pkl, yaml_path)
    # HF: (x / 255 - mean) / std == (x - 255 mean) / (255 std)
    assert np.allclose(cfg.MODEL.PIXEL_MEAN, [127.5, 102.0, 76.5])
    assert np.allclose(cfg.MODEL.PIXEL_STD, [51.0, 63.75, 76.5])
    assert (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST) == (512, 2048)
    compare_with_hf(hf_model, model)


def test_swin_config_values(hf_swin):
    config, _, preprocessor = load_hf_maskformer(str(hf_swin[0]))
    assert preprocessor is None
    model = hf_config_to_d2(config, preprocessor)["MODEL"]
    assert model["META_ARCHITECTURE"] == "MaskFormer"
    assert model["BACKBONE"]["NAME"] == "D2SwinTransformer"
    swin = model["SWIN"]
    assert (swin["EMBED_DIM"], swin["DEPTHS"], swin["NUM_HEADS"], swin["WINDOW_SIZE"], swin["PATCH_SIZE"]) == (
        32, [1, 1, 2, 1], [1, 2, 4, 8], 4, 4)
    assert swin["OUT_FEATURES"] == ["res2", "res3", "res4", "res5"]
    head, mf = model["SEM_SEG_HEAD"], model["MASK_FORMER"]
    assert (head["NUM_CLASSES"], head["CONVS_DIM"], head["MASK_DIM"], head["PIXEL_DECODER_NAME"]) == (
        3, 32, 32, "BasePixelDecoder")
    assert (mf["HIDDEN_DIM"], mf["DEC_LAYERS"], mf["NHEADS"], mf["DIM_FEEDFORWARD"], mf["NUM_OBJECT_QUERIES"]) == (
        32, 2, 4, 64, 5)
    assert mf["TRANSFORMER_IN_FEATURE"] == "res5"
    assert mf["NO_OBJECT_WEIGHT"] == pytest.approx(0.2)
    # no preprocessor_config.json: ImageNet mean/std of MaskFormerImageProcessor, on 0-255 RGB
    assert np.allclose(model["PIXEL_MEAN"], [123.675, 116.28, 103.53])
    assert np.allclose(model["PIXEL_STD"], [58.395, 57.12, 57.375])


def test_resnet_config_values(hf_resnet):
    config, _, preprocessor = load_hf_maskformer(str(hf_resnet[0]))
    resnets = hf_config_to_d2(config, preprocessor)["MODEL"]["RESNETS"]
    # bottleneck width = hidden_size // 4 = 8; stride in the 3x3 conv
    assert (resnets["DEPTH"], resnets["STEM_OUT_CHANNELS"], resnets["RES2_OUT_CHANNELS"],
            resnets["WIDTH_PER_GROUP"], resnets["STRIDE_IN_1X1"]) == (50, 16, 32, 8, False)


def test_disk_names_differ_from_module_names_and_both_convert(hf_swin):
    hf_dir, hf_model = hf_swin
    config, on_disk, _ = load_hf_maskformer(str(hf_dir))
    in_memory = hf_model.state_dict()
    # transformers 5.x renames DETR decoder weights on save (o_proj -> out_proj, mlp.fc1 -> fc1)
    assert any(".o_proj." in k for k in in_memory) and not any(".o_proj." in k for k in on_disk)
    assert any(".out_proj." in k for k in on_disk)
    d2_config = hf_config_to_d2(config)
    from_disk = convert_hf_state_dict(on_disk, d2_config)
    from_memory = convert_hf_state_dict(in_memory, d2_config)
    assert sorted(from_disk) == sorted(from_memory)
    for key in from_disk:
        np.testing.assert_array_equal(from_disk[key], from_memory[key], err_msg=key)


def test_qkv_fused_in_projection_order(hf_swin):
    config, on_disk, _ = load_hf_maskformer(str(hf_swin[0]))
    weights = convert_hf_state_dict(on_disk, hf_config_to_d2(config))
    layer = "model.transformer_module.decoder.layers.1.encoder_attn."
    fused = weights["sem_seg_head.predictor.transformer.decoder.layers.1.multihead_attn.in_proj_weight"]
    expected = torch.cat([on_disk[layer + f"{p}_proj.weight"] for p in "qkv"]).numpy()
    np.testing.assert_array_equal(fused, expected)
    block = "model.pixel_level_module.encoder.model.encoder.layers.2.blocks.1.attention.self."
    fused = weights["backbone.layers.2.blocks.1.attn.qkv.bias"]
    expected = torch.cat([on_disk[block + f"{p}.bias"] for p in ("query", "key", "value")]).numpy()
    np.testing.assert_array_equal(fused, expected)


def test_class_names_reach_the_predictor(hf_swin, tmp_path):
    """The converted config names the classes (MODEL.CLASS_NAMES, from id2label); the predictor built
    from it labels them and gives HuggingFace's logits for the same image."""
    hf_dir, hf_model = hf_swin
    pkl, yaml_path = convert_with_tool(hf_dir, tmp_path)
    assert "CLASS_NAMES: [wall, sky, tree]" in yaml_path.read_text()
    predictor = Predictor(str(yaml_path), device="cpu",
                          opts=["INPUT.MIN_SIZE_TEST", str(HEIGHT), "INPUT.MAX_SIZE_TEST", str(WIDTH)])
    assert predictor.class_names == CLASS_NAMES
    image = make_test_image().round().to(torch.uint8)  # RGB, 3 x H x W
    (raw,) = predictor.raw_outputs([image.permute(1, 2, 0).numpy()])
    assert raw.padded_size == raw.image_size == raw.original_size == (HEIGHT, WIDTH)
    pixel_values = ((image.float() - predictor.model.pixel_mean) / predictor.model.pixel_std)[None]
    with torch.no_grad():
        hf_out = hf_model(pixel_values=pixel_values)
    assert (raw.class_logits - hf_out.class_queries_logits[0]).abs().max() <= 1e-4
    assert (raw.mask_logits - hf_out.masks_queries_logits[0]).abs().max() <= 1e-4


def write_hub_cache(cache: Path, repo_id: str, files: Path, commit: str = "0123456789abcdef" * 2 + "01234567"):
    """``files`` as the snapshot of ``repo_id`` (branch main) in a HuggingFace cache, in the layout
    huggingface_hub's downloads leave (models--OWNER--NAME/{refs/main, snapshots/COMMIT/})."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(files, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


def test_hub_id_is_read_from_the_cache_offline(hf_swin, tmp_path):
    hf_dir, _ = hf_swin
    snapshot = write_hub_cache(tmp_path / "cache", "someone/maskformer-tiny", hf_dir)
    assert resolve_hf_checkpoint("someone/maskformer-tiny", cache_dir=str(tmp_path / "cache"),
                                 offline=True) == str(snapshot)
    out = tmp_path / "out"
    load_tool().main(["someone/maskformer-tiny", str(out / "model.pkl"), "--offline",
                      "--cache-dir", str(tmp_path / "cache")])
    yaml_text = (out / "model.yaml").read_text()
    assert "converted from the HuggingFace checkpoint someone/maskformer-tiny" in yaml_text
    assert "CLASS_NAMES: [wall, sky, tree]" in yaml_text
    with open(out / "model.pkl", "rb") as f:
        from_hub = pickle.load(f)["model"]
    from_folder, _ = convert_hf_maskformer(str(hf_dir), verify=False)
    assert sorted(from_hub) == sorted(from_folder)
    for key, value in from_folder.items():
        np.testing.assert_array_equal(from_hub[key], value, err_msg=key)


def test_hub_id_missing_from_the_cache_is_named(tmp_path):
    (tmp_path / "cache").mkdir()
    with pytest.raises(FileNotFoundError, match=r"'someone/absent' is not a local directory and is not in the "
                       r"HuggingFace cache .*cache \(offline\)"):
        load_tool().main(["someone/absent", str(tmp_path / "model.pkl"), "--offline",
                          "--cache-dir", str(tmp_path / "cache")])
    with pytest.raises(FileNotFoundError, match="not a directory written by save_pretrained, and not a "
                       "HuggingFace hub id"):
        resolve_hf_checkpoint(str(tmp_path / "no" / "such" / "dir"))


# ------------------------------------------------------------------------------------- errors
def copy_checkpoint(hf_dir: Path, out: Path, edit_weights=None, edit_config=None) -> Path:
    out.mkdir()
    config = json.loads((hf_dir / "config.json").read_text())
    if edit_config:
        edit_config(config)
    (out / "config.json").write_text(json.dumps(config))
    weights = load_file(str(hf_dir / "model.safetensors"))
    if edit_weights:
        edit_weights(weights)
    save_file(weights, str(out / "model.safetensors"))
    return out


def test_unmapped_hf_key_is_an_error(hf_swin, tmp_path):
    def add_key(weights):
        weights["model.transformer_module.extra_head.weight"] = torch.zeros(2)

    directory = copy_checkpoint(hf_swin[0], tmp_path / "ckpt", edit_weights=add_key)
    with pytest.raises(KeyError, match=r"model\.transformer_module\.extra_head\.weight"):
        convert_hf_maskformer(str(directory))


def test_incomplete_qkv_group_is_an_error(hf_swin, tmp_path):
    def drop_key(weights):
        del weights["model.transformer_module.decoder.layers.0.self_attn.k_proj.weight"]

    directory = copy_checkpoint(hf_swin[0], tmp_path / "ckpt", edit_weights=drop_key)
    with pytest.raises(KeyError, match=r"layers\.0\.self_attn\.in_proj_weight.*missing the \['k'\]"):
        convert_hf_maskformer(str(directory))


def test_missing_hf_weight_is_reported_as_missing_d2_key(hf_swin, tmp_path):
    def drop_key(weights):
        del weights["model.pixel_level_module.decoder.mask_projection.bias"]

    directory = copy_checkpoint(hf_swin[0], tmp_path / "ckpt", edit_weights=drop_key)
    with pytest.raises(KeyError, match=r"missing \(sem_seg_head\.pixel_decoder\.mask_features\.bias\)"):
        convert_hf_maskformer(str(directory))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c["decoder_config"].update(auxiliary_loss=True), "auxiliary_loss=True"),
        (lambda c: c["backbone_config"].update(use_absolute_embeddings=True), "use_absolute_embeddings"),
        (lambda c: c["decoder_config"].update(activation_function="gelu"), "activation_function='gelu'"),
        (lambda c: c["backbone_config"].update(model_type="convnext"), "model_type='convnext'"),
        (lambda c: c.update(model_type="mask2former"), "model_type is 'mask2former'"),
    ],
)
def test_unsupported_configs_are_errors(hf_swin, tmp_path, edit, message):
    directory = copy_checkpoint(hf_swin[0], tmp_path / "ckpt", edit_config=edit)
    with pytest.raises(ValueError, match=message):
        convert_hf_maskformer(str(directory))


def test_directory_without_weights_is_an_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "maskformer"}))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_hf_maskformer(str(tmp_path))


# ------------------------------------------------------------------ published checkpoint layout
@pytest.mark.parametrize(
    "reference, backbone_config, num_labels",
    [
        ("ade20k-150__maskformer_R50_bs16_160k.txt",
         lambda: ResNetConfig(out_features=["stage1", "stage2", "stage3", "stage4"]), 150),
        # transformers' default MaskFormer backbone: Swin-B, window 12, 384 pre-training
        ("coco-panoptic__swin__maskformer_panoptic_swin_base_IN21k_384_bs64_554k.txt", lambda: None, 133),
    ],
)
def test_full_size_conversion_has_published_layout(reference_layout, reference, backbone_config, num_labels):
    """A full-size HF MaskFormer (R50 / Swin-B, as on the hub) converts to exactly the keys,
    shapes and dtypes of the published MaskFormer checkpoint of that architecture."""
    config = MaskFormerConfig(backbone_config=backbone_config(), num_labels=num_labels)
    with torch.device("meta"):  # shapes only; no memory, no initialisation
        hf_model = MaskFormerForInstanceSegmentation(config)
    # in-memory names (accepted like the on-disk ones); the Swin position index is an int64 buffer
    hf_weights = {
        key: torch.zeros(value.shape, dtype=torch.int64) if key.endswith("relative_position_index")
        else torch.empty(value.shape)
        for key, value in hf_model.state_dict().items()
    }
    hf_config = json.loads(config.to_json_string())
    weights = convert_hf_state_dict(hf_weights, hf_config_to_d2(hf_config))
    converted = {k: (tuple(v.shape), str(v.dtype)) for k, v in weights.items()}
    expected = reference_layout(reference)
    assert sorted(set(expected) - set(converted)) == []
    assert sorted(set(converted) - set(expected)) == []
    assert {k: v for k, v in converted.items() if expected[k] != v} == {}
