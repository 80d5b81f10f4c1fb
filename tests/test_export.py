"""tools/export_model.py and mask_former.export: the exported TorchScript and ONNX networks give the
PyTorch model's class and mask logits (to 1e-4, onnxruntime for ONNX) at several image sizes, and
their outputs post-process in Python to the model's own results.

Two models with random weights: the built-in synthetic config (exported by the tool, weights
through a checkpoint file) and the ADE20K R50 config (exported with the library functions)."""
import importlib.util
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model

from mask_former.export import (
    ExportableMaskFormer,
    Postprocessor,
    build_exportable_model,
    example_image,
    export_onnx,
    load_torchscript,
    max_abs_diffs,
    onnx_runner,
    pad_image,
    save_torchscript,
    trace_torchscript,
)
from model_utils import CONFIG_DIR, zoo_cfg

TOOL = Path(__file__).resolve().parents[1] / "tools" / "export_model.py"
SYNTHETIC = "synthetic/maskformer_panoptic_R18.yaml"
R50 = "ade20k-150/maskformer_R50_bs16_160k.yaml"
TOLERANCE = 1e-4
# (H, W) multiples of 32 other than the export example's, to show the sizes are not baked in
SYNTHETIC_SIZES = [(128, 128), (96, 160), (64, 64), (192, 96)]
R50_SIZES = [(128, 128), (96, 160)]


def load_tool():
    spec = importlib.util.spec_from_file_location("tool_export_model", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


export_model_tool = load_tool()


def assert_parity(module, run, sizes, what):
    """The exported ``run`` against the PyTorch ``module`` on a random image of each size."""
    for seed, (height, width) in enumerate(sizes):
        image = example_image(height, width, seed=seed)
        with torch.no_grad():
            expected = module(image)
            actual = run(image)
        diffs = max_abs_diffs(expected, actual)
        print(f"{what} {height}x{width}: max abs diff pred_logits {diffs[0]:.2e}, pred_masks {diffs[1]:.2e}")
        assert tuple(actual[1].shape[-2:]) == (height // 4, width // 4)
        assert max(diffs) <= TOLERANCE, f"{what} at {height}x{width}: {diffs}"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The test machine's cores are shared: one thread each is much faster than two contended ones."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """The synthetic model with random weights, saved as a checkpoint and exported by the tool.
    Its queries are made to differ (a randomly initialized decoder gives nearly equal queries), so
    that the panoptic results have several segments; the logits stay of order 10."""
    out = tmp_path_factory.mktemp("export_synthetic")
    torch.manual_seed(0)
    cfg = zoo_cfg(SYNTHETIC)
    cfg.MODEL.WEIGHTS = ""
    model = build_model(cfg).eval()
    predictor = model.sem_seg_head.predictor
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        predictor.query_embed.weight.normal_(0, 5, generator=generator)
        predictor.class_embed.weight.normal_(0, 0.5, generator=generator)
        predictor.mask_embed.layers[-1].weight.normal_(0, 0.2, generator=generator)
        predictor.mask_embed.layers[-1].bias.zero_()
    weights = out / "model.pth"
    torch.save({"model": model.state_dict()}, weights)
    start = time.perf_counter()
    rc = export_model_tool.main(["--config-file", str(CONFIG_DIR / SYNTHETIC), "--output", str(out),
                                 "--input-size", "128", "128", "MODEL.WEIGHTS", str(weights)])
    print(f"tools/export_model.py (synthetic, onnx + torchscript): {time.perf_counter() - start:.1f} s")
    assert rc == 0
    return model, ExportableMaskFormer(model), out


@pytest.fixture(scope="module")
def r50():
    torch.manual_seed(0)
    cfg = zoo_cfg(R50)
    cfg.MODEL.WEIGHTS = ""
    module, model = build_exportable_model(cfg)
    return model, module


def test_tool_writes_the_files_and_the_specification(synthetic):
    model, module, out = synthetic
    info = json.loads((out / "export.json").read_text())
    assert info["files"] == {"onnx": "model.onnx", "torchscript": "model.ts"}
    assert (out / "model.onnx").is_file() and (out / "model.ts").is_file()
    assert not (out / "model.onnx.data").exists()  # one self-contained file
    assert info["input"]["format"] == "RGB" and info["input"]["size_divisibility"] == 32
    assert info["outputs"]["pred_logits"] == [1, 20, 9]
    assert Postprocessor(**info["postprocessing"]) == Postprocessor.from_model(model)
    assert info["postprocessing"]["thing_ids"] == [0, 1, 2, 3, 4]
    # the tool's own checks: two sizes per format, within its tolerance
    for fmt in ("onnx", "torchscript"):
        assert set(info["checks"][fmt]) == {"128x128", "160x192"}
        assert max(max(d) for d in info["checks"][fmt].values()) <= TOLERANCE


def test_tool_rejects_an_input_size_that_is_not_a_multiple(tmp_path):
    with pytest.raises(ValueError, match="--input-size 100 128: both must be positive multiples of 32"):
        export_model_tool.main(["--config-file", str(CONFIG_DIR / SYNTHETIC), "--output", str(tmp_path),
                                "--input-size", "100", "128", "MODEL.WEIGHTS", ""])


def test_network_is_the_models_network(synthetic):
    """The wrapper (normalization inside, padding by pad_image) gives what MaskFormer's own
    preprocessing and network give, for an image whose size is not a multiple of 32."""
    model, module, _ = synthetic
    image = torch.rand(3, 100, 120, generator=torch.Generator().manual_seed(3)) * 255
    padded, image_size = pad_image(image, module.size_divisibility, model.pixel_mean.flatten().tolist())
    assert padded.shape == (1, 3, 128, 128) and image_size == (100, 120)
    with torch.no_grad():
        images = model.preprocess_images([{"image": image}])
        expected = model.sem_seg_head(model.backbone(images.tensor))
        actual = module(padded)
    assert torch.equal((padded - module.pixel_mean) / module.pixel_std, images.tensor)
    torch.testing.assert_close(actual[0], expected["pred_logits"], rtol=0, atol=1e-5)
    torch.testing.assert_close(actual[1], expected["pred_masks"], rtol=0, atol=1e-5)


def test_pad_image_takes_numpy_images_and_checks_shapes(synthetic):
    _, module, _ = synthetic
    hwc = (np.arange(40 * 50 * 3) % 256).astype(np.uint8).reshape(40, 50, 3)
    padded, size = pad_image(hwc, 32, [1.0, 2.0, 3.0])
    assert padded.shape == (1, 3, 64, 64) and padded.dtype == torch.float32 and size == (40, 50)
    assert torch.equal(padded[0, :, :40, :50], torch.from_numpy(hwc.transpose(2, 0, 1)).float())
    assert torch.equal(padded[0, :, 40:, :], torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1).expand(3, 24, 64))
    with pytest.raises(ValueError, match="H x W x 3"):
        pad_image(hwc[:, :, :2], 32, [0, 0, 0])
    with pytest.raises(ValueError, match="multiples of 32"):
        trace_torchscript(module, example_image(100, 128))


def test_torchscript_parity_synthetic(synthetic):
    _, module, out = synthetic
    assert_parity(module, load_torchscript(str(out / "model.ts")), SYNTHETIC_SIZES, "torchscript synthetic")


def test_onnx_parity_synthetic(synthetic):
    _, module, out = synthetic
    run = onnx_runner(str(out / "model.onnx"), num_threads=1)
    assert_parity(module, run, SYNTHETIC_SIZES, "onnx synthetic")

    import onnxruntime

    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (image,) = session.get_inputs()
    logits, masks = session.get_outputs()
    assert (image.name, logits.name, masks.name) == ("image", "pred_logits", "pred_masks")
    assert image.shape[:2] == [1, 3] and all(isinstance(d, str) for d in image.shape[2:])  # symbolic H, W
    assert logits.shape == [1, 20, 9]


def test_exported_outputs_postprocess_to_the_models_results(synthetic):
    """pad_image -> exported network -> Postprocessor gives the model's semantic, panoptic and
    instance results (the model's reference path; exactly with TorchScript, to 1e-4 with ONNX)."""
    model, module, out = synthetic
    image = torch.rand(3, 100, 120, generator=torch.Generator().manual_seed(4)) * 255
    output_size = (150, 180)
    # the model's reference path; every query that wins a pixel makes a panoptic segment
    previous = model.optimize_inference, model.overlap_threshold
    model.optimize_inference, model.overlap_threshold = False, 0.0
    try:
        with torch.no_grad():
            expected = model([{"image": image, "height": output_size[0], "width": output_size[1]}])[0]
        postprocess = Postprocessor.from_model(model)
    finally:
        model.optimize_inference, model.overlap_threshold = previous
    padded, image_size = pad_image(image, module.size_divisibility, model.pixel_mean.flatten().tolist())

    with torch.no_grad():
        logits, masks = load_torchscript(str(out / "model.ts"))(padded)
    result = postprocess(logits, masks, padded.shape[-2:], image_size, output_size)
    assert set(result) == {"sem_seg", "panoptic_seg", "instances"}
    assert torch.equal(result["sem_seg"], expected["sem_seg"])
    assert result["sem_seg"].shape == (8, 150, 180)
    ids, segments = result["panoptic_seg"]
    assert torch.equal(ids, expected["panoptic_seg"][0]) and segments == expected["panoptic_seg"][1]
    assert len(segments) >= 5 and {s["isthing"] for s in segments} == {True, False}
    instances, expected_instances = result["instances"], expected["instances"]
    assert len(instances) == len(expected_instances) > 0
    for field in ("pred_classes", "scores", "pred_masks"):
        assert torch.equal(getattr(instances, field), getattr(expected_instances, field)), field
    assert torch.equal(instances.pred_boxes.tensor, expected_instances.pred_boxes.tensor)

    logits, masks = onnx_runner(str(out / "model.onnx"), num_threads=1)(padded)
    result = postprocess(logits.numpy(), masks.numpy(), padded.shape[-2:], image_size, output_size)
    torch.testing.assert_close(result["sem_seg"], expected["sem_seg"], rtol=TOLERANCE, atol=TOLERANCE)


def test_postprocessor_follows_the_models_mask_wise_merging(synthetic):
    """With MODEL.MASK_FORMER.TEST.PANOPTIC_MERGE "mask" the model merges mask-wise (Panoptic
    SegFormer's rule); a Postprocessor built from it (or from its JSON settings) does too."""
    model, module, _ = synthetic
    image = torch.rand(3, 100, 120, generator=torch.Generator().manual_seed(5)) * 255
    previous = model.optimize_inference, model.panoptic_merge_mode, model.mask_merge_params
    # random weights give overlapping masks of low quality: with thresholds lowered, several segments
    model.optimize_inference, model.panoptic_merge_mode = False, "mask"
    model.mask_merge_params = dict(previous[2], mask_threshold=0.7, thing_quality_threshold=0.01,
                                   stuff_quality_threshold=0.01, thing_overlap_threshold=0.95,
                                   stuff_overlap_threshold=0.95)
    try:
        with torch.no_grad():
            expected_ids, expected_segments = model([{"image": image}])[0]["panoptic_seg"]
        postprocess = Postprocessor.from_model(model)
    finally:
        model.optimize_inference, model.panoptic_merge_mode, model.mask_merge_params = previous
    assert postprocess.panoptic_merge == "mask" and postprocess.mask_merge_params["beta"] == 2.0
    assert postprocess.mask_merge_params["thing_quality_threshold"] == 0.01
    assert Postprocessor(**json.loads(json.dumps(postprocess.to_dict()))) == postprocess
    padded, image_size = pad_image(image, module.size_divisibility, model.pixel_mean.flatten().tolist())
    with torch.no_grad():
        logits, masks = module(padded)
    ids, segments = postprocess(logits, masks, padded.shape[-2:], image_size)["panoptic_seg"]
    assert torch.equal(ids, expected_ids) and segments == expected_segments
    assert len(segments) >= 4
    # the setting matters here: MaskFormer's pixel-wise merge gives another map
    pixel_ids, _ = replace(postprocess, panoptic_merge="pixel")(logits, masks, padded.shape[-2:],
                                                                image_size)["panoptic_seg"]
    assert not torch.equal(pixel_ids, ids)
    with pytest.raises(ValueError, match="panoptic_merge='argmax'"):
        Postprocessor(num_classes=8, panoptic_merge="argmax")


def test_postprocessor_checks_its_inputs(synthetic):
    model, _, _ = synthetic
    postprocess = Postprocessor.from_model(model)
    logits, masks = torch.zeros(1, 20, 9), torch.zeros(1, 20, 32, 32)
    with pytest.raises(ValueError, match="does not fit"):
        postprocess(logits, masks, (128, 128), (130, 100))
    with pytest.raises(ValueError, match="K\\+1 = 9"):
        postprocess(torch.zeros(1, 20, 5), masks, (128, 128), (128, 128))
    with pytest.raises(ValueError, match="batch 1"):
        postprocess(torch.zeros(2, 20, 9), masks, (128, 128), (128, 128))
    with pytest.raises(ValueError, match="thing_ids"):
        Postprocessor(num_classes=8, panoptic_on=True)


def test_torchscript_parity_r50(r50, tmp_path):
    _, module = r50
    start = time.perf_counter()
    traced = trace_torchscript(module, example_image(128, 128))
    save_torchscript(traced, str(tmp_path / "model.ts"))
    print(f"torchscript R50: traced and saved in {time.perf_counter() - start:.1f} s")
    assert_parity(module, load_torchscript(str(tmp_path / "model.ts")), R50_SIZES, "torchscript R50")


def test_onnx_parity_r50(r50, tmp_path):
    _, module = r50
    path = str(tmp_path / "model.onnx")
    start = time.perf_counter()
    export_onnx(module, example_image(128, 128), path)
    print(f"onnx R50: exported in {time.perf_counter() - start:.1f} s")
    assert_parity(module, onnx_runner(path, num_threads=1), R50_SIZES, "onnx R50")
    assert not Path(path + ".data").exists()
