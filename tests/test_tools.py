"""tools/analyze_model.py, tools/benchmark.py, tools/plot_metrics.py and
tools/convert-torchvision-to-d2.py: in-process through their main(argv), plus one subprocess run
of each script."""
import importlib.util
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model, build_resnet_backbone
from PIL import Image

from model_utils import CONFIG_DIR, base_cfg, tiny_cfg

REPO_ROOT = Path(__file__).resolve().parents[1]
TOOLS = REPO_ROOT / "tools"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def load_tool(file_name):
    spec = importlib.util.spec_from_file_location(f"tool_{file_name.replace('-', '_')[:-3]}", TOOLS / file_name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


analyze_model = load_tool("analyze_model.py")
benchmark = load_tool("benchmark.py")
plot_metrics = load_tool("plot_metrics.py")
convert_torchvision = load_tool("convert-torchvision-to-d2.py")


def run_script(file_name, *args, cwd):
    """Run a tool as a script; one thread each, as the test machine's cores are shared."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(TOOLS / file_name), *map(str, args)], capture_output=True,
                          text=True, timeout=300, cwd=str(cwd), env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("configs") / "tiny.yaml"
    path.write_text(tiny_cfg().dump())
    return path


def brute_force_parameter_count(cfg):
    return sum(p.numel() for p in build_model(cfg).parameters())


# ------------------------------------------------------------------ analyze_model.py


def test_parameter_count_of_ade20k_r50():
    results = analyze_model.main(
        ["--config-file", str(CONFIG_DIR / "ade20k-150" / "maskformer_R50_bs16_160k.yaml"), "--tasks", "parameter"]
    )
    # the published MaskFormer R50 for ADE20K-150 has 41M parameters (41.25M exactly)
    assert results["parameter"]["total"] / 1e6 == pytest.approx(41.25, abs=0.01)
    assert set(results) == {"parameter"}


def test_flops_and_activations_on_a_random_image(tiny_config, one_thread):
    results = analyze_model.main(["--config-file", str(tiny_config), "--tasks", "flop", "activation",
                                  "--input-size", "64", "96", "--max-depth", "4"])
    flops = results["flop"]
    assert flops["input_size"] == [64, 96]
    # the 7x7 stride-2 stem conv: 3 -> 64 channels on a 32 x 48 output, one flop per multiply-add
    # (the module "conv1" also holds its norm)
    stem_conv = flops["by_module"]["backbone.stem.conv1"] - flops["by_module"]["backbone.stem.conv1.norm"]
    assert stem_conv == pytest.approx(7 * 7 * 3 * 64 * 32 * 48 / 1e9)
    assert flops["by_operator"]["conv"] > stem_conv
    assert flops["total_gflops"] == pytest.approx(sum(flops["by_operator"].values()))
    assert flops["total_gflops"] >= flops["by_module"]["backbone"] + flops["by_module"]["sem_seg_head"] - 1e-9
    assert results["activation"]["total_mega"] > 0


def test_analyze_model_script(tmp_path, tiny_config):
    output = run_script("analyze_model.py", "--config-file", tiny_config, "--tasks", "parameter", cwd=tmp_path)
    expected = brute_force_parameter_count(tiny_cfg())
    assert f"Parameters: {expected / 1e6:.2f}M" in output


# ------------------------------------------------------------------ benchmark.py


def test_benchmark_reduced_run_writes_json(tmp_path, tiny_config):
    out = tmp_path / "bench" / "results.json"
    run_script("benchmark.py", "--config-file", tiny_config, "--input-size", 64, 64, "--device", "cpu",
               "--reduced", "--num-threads", 1, "--json", out, cwd=tmp_path)
    results = json.loads(out.read_text())
    assert results["device"] == "cpu"
    assert results["input_size"] == [64, 64]
    assert (results["batch_size"], results["runs"]) == (1, 2)
    assert results["num_parameters"] == brute_force_parameter_count(tiny_cfg())

    timed = [results["inference"], results["train_iteration"], results["matcher"]]
    timed += [results["postprocessing"][k] for k in ("semantic", "panoptic", "instance")]
    for entry in timed:
        assert entry["runs"] == 2
        assert 0 < entry["min_s"] <= entry["median_s"]
        assert entry["mean_s"] == pytest.approx(entry["median_s"])  # two runs: median = mean
    assert results["inference"]["images_per_s"] == pytest.approx(1 / results["inference"]["median_s"])
    assert results["train_iteration"]["peak_memory_mb"] > 0
    assert results["matcher"]["num_targets_per_image"] == [5]
    assert "all classes" in results["postprocessing"]["thing_ids"]


def test_benchmark_reduced_run_of_a_panoptic_segformer(tmp_path):
    """The model part of benchmark.py on the synthetic Panoptic SegFormer: its matcher entry is the
    criterion's whole matching and its post-processing entry is the model's mask-wise inference."""
    out = tmp_path / "psf.json"
    run_script("benchmark.py", "--config-file", CONFIG_DIR / "synthetic" / "panoptic_segformer_R18.yaml",
               "--input-size", 64, 64, "--device", "cpu", "--reduced", "--num-threads", 1, "--parts", "model",
               "--json", out, cwd=tmp_path)
    results = json.loads(out.read_text())
    for entry in (results["inference"], results["train_iteration"], results["matcher"],
                  results["postprocessing"]["mask_wise_inference"]):
        assert entry["runs"] == 2 and 0 < entry["min_s"] <= entry["median_s"]
    assert len(results["matcher"]["num_targets_per_image"]) == results["batch_size"] == 1


def test_synthetic_batch_masks_and_classes():
    batch = benchmark.synthetic_batch(2, 20, 30, num_classes=4, num_masks=3)
    assert len(batch) == 2
    for x in batch:
        assert x["image"].shape == (3, 20, 30) and 0 <= x["image"].min() and x["image"].max() <= 255
        masks = x["instances"].gt_masks
        assert masks.shape == (3, 20, 30) and masks.dtype == torch.bool
        assert (masks.flatten(1).sum(1) > 0).all(), "every ground-truth mask must be non-empty"
        classes = x["instances"].gt_classes
        assert ((0 <= classes) & (classes < 4)).all()


def test_time_runs_reports_the_median():
    calls = []
    durations = iter([0.0, 0.0, 0.15, 0.05, 0.10])  # 2 warm-up calls, then 3 timed

    def fn():
        calls.append(1)
        time.sleep(next(durations))

    result = benchmark.time_runs(fn, runs=3, warmup=2, device=torch.device("cpu"))
    assert len(calls) == 5
    assert result["runs"] == 3
    assert 0.10 <= result["median_s"] < 0.15
    assert 0.05 <= result["min_s"] < 0.10


def test_benchmark_postprocessing_times_the_library_against_the_loop_references(tmp_path):
    tool = load_tool("benchmark_postprocessing.py")
    output = tmp_path / "post.json"
    args = tool.get_parser().parse_args(
        ["--input-size", "24", "40", "--num-queries", "12", "--num-classes", "6", "--runs", "2", "--warmup", "0",
         "--json", str(output)])
    results = tool.main(args)
    assert results["panoptic"]["identical"] and results["panoptic"]["segments"] > 0
    assert results["instance"]["identical_masks_boxes_classes"]
    assert results["instance"]["max_score_diff"] <= 1e-6
    for task in ("panoptic", "instance"):
        assert results[task]["runs"] == results[f"{task} reference"]["runs"] == 2
        expected = results[task]["median_s"] / results[f"{task} reference"]["median_s"]
        assert results[task]["ratio"] == pytest.approx(expected)
    assert results["setup"]["input_size"] == [24, 40]
    assert json.loads(output.read_text())["panoptic"]["ratio"] == pytest.approx(results["panoptic"]["ratio"])


def test_benchmark_compare_runs_the_paths_side_by_side(tmp_path, tiny_config):
    """--compare: the reference and optimised paths of inference and training, in one process on
    the same weights and inputs, each with its ratio to the reference and its agreement."""
    out = tmp_path / "compare.json"
    results = benchmark.main(["--config-file", str(tiny_config), "--input-size", "64", "64", "--device", "cpu",
                              "--compare", "--reduced", "--no-memory", "--num-threads", "1", "--batch-size", "1",
                              "--num-gt-masks", "2", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    inference = results["inference"]["paths"]
    assert set(inference) == {"reference", "fp32", "bf16"}
    assert results["inference"]["input_size"] == [64, 64]
    assert inference["reference"]["cpu_ratio"] == 1.0
    # the exact path agrees with the reference to the documented 1e-4
    assert inference["fp32"]["agreement"]["sem_seg_max_rel_diff"] < 1e-4
    assert inference["fp32"]["agreement"]["sem_seg_argmax_agreement"] == 1.0
    for path in inference.values():
        assert path["runs"] == 2 and path["cpu_s"] > 0
    training = results["training"]["paths"]
    assert list(training) == ["reference", "full", "points", "points_bf16"]
    assert training["reference"]["step_ratio"] == 1.0
    assert training["points"]["train_num_points"] > 0 and training["points_bf16"]["autocast"] == "bfloat16"
    # the batched matcher gives the reference's first loss (same weights, batch and seed)
    assert training["full"]["loss_rel_diff"] == pytest.approx(0.0, abs=1e-6)
    assert results["training"]["settings"]["batch_size"] == 1


def test_benchmark_training_checkpointed_path_gives_the_same_loss(tmp_path, tiny_config):
    tool = load_tool("benchmark_training.py")
    results = tool.main(["--config-file", str(tiny_config), "--input-size", "64", "64", "--paths",
                         "reference,points,points_checkpointed", "--steps", "1", "--warmup", "0", "--no-memory",
                         "--num-threads", "1", "--batch-size", "1", "--num-gt-masks", "2"])
    paths = results["paths"]
    assert paths["points_checkpointed"]["activation_checkpointing"] and not paths["points"]["activation_checkpointing"]
    # same weights, batch, seed and sampled points: recomputing the activations changes no loss
    assert paths["points_checkpointed"]["first_loss"] == pytest.approx(paths["points"]["first_loss"], rel=1e-6)


@pytest.mark.parametrize("argv,message", [
    (["--input-size", "0", "64"], "--input-size"),
    (["--input-size", "64", "64", "--runs", "0"], "--runs"),
    (["--input-size", "64", "64", "--num-threads", "0"], "--num-threads"),
])
def test_benchmark_bad_arguments(capsys, tiny_config, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(["--config-file", str(tiny_config), *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_benchmark_cuda_without_cuda(capsys, tiny_config):
    with pytest.raises(SystemExit):
        benchmark.main(["--config-file", str(tiny_config), "--input-size", "64", "64", "--device", "cuda"])
    assert "CUDA is not available" in capsys.readouterr().err


# ------------------------------------------------------------------ plot_metrics.py

TRAINING_LINES = [
    {"iteration": i, "total_loss": 10.0 - i * 0.1, "loss_ce": 2.0 - i * 0.01, "loss_mask": 5.0,
     "loss_dice": 3.0, "loss_ce_0": 2.5, "lr": 1e-4 * (1 - i / 60), "time": 0.3, "data_time": 0.01}
    for i in range(0, 60, 3)
]
EVAL_LINES = [
    {"iteration": 29, "sem_seg/mIoU": 10.0, "sem_seg/IoU-sky": 40.0, "panoptic_seg/PQ": 5.0, "segm/AP": 1.0},
    {"iteration": 59, "sem_seg/mIoU": 20.0, "sem_seg/IoU-sky": 60.0, "panoptic_seg/PQ": 9.0, "segm/AP": 3.0},
]


def write_metrics(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def assert_png(path, size=None):
    data = Path(path).read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 1000
    with Image.open(path) as image:
        image.verify()
    if size is not None:
        with Image.open(path) as image:
            assert image.size == size


def test_plot_metrics_writes_loss_lr_and_metric_panels(tmp_path):
    metrics = write_metrics(tmp_path / "metrics.json", TRAINING_LINES + EVAL_LINES)
    output = plot_metrics.main([str(metrics), "--output", str(tmp_path / "plots" / "curves.png"), "--smooth", "5"])
    # 3 panels of 9 x 3.2 inches at 100 dpi
    assert_png(output, size=(900, 960))


def test_plot_metrics_default_output_and_training_only(tmp_path):
    metrics = write_metrics(tmp_path / "metrics.json", TRAINING_LINES)
    output = plot_metrics.main([str(metrics)])
    assert output == str(tmp_path / "curves.png")
    assert_png(output, size=(900, 640))  # loss and lr panels only


def test_split_series():
    losses, learning_rates, metrics = plot_metrics.split_series(TRAINING_LINES[:2] + EVAL_LINES[:1])
    assert losses["total_loss"] == [(0, 10.0), (3, 9.7)]
    assert losses["loss_ce_0"] == [(0, 2.5), (3, 2.5)]
    assert set(losses) == {"total_loss", "loss_ce", "loss_mask", "loss_dice", "loss_ce_0"}
    assert learning_rates == {"lr": [(0, 1e-4), (3, pytest.approx(0.95e-4))]}
    assert metrics == {"sem_seg/mIoU": [(29, 10.0)], "sem_seg/IoU-sky": [(29, 40.0)],
                       "panoptic_seg/PQ": [(29, 5.0)], "segm/AP": [(29, 1.0)]}
    assert plot_metrics.main_loss_names(losses) == ["total_loss", "loss_ce", "loss_dice", "loss_mask"]


def test_moving_average():
    np.testing.assert_allclose(plot_metrics.moving_average([1.0, 2.0, 3.0, 4.0, 10.0], 2),
                               [1.0, 1.5, 2.5, 3.5, 7.0])
    np.testing.assert_allclose(plot_metrics.moving_average([4.0, 2.0, 6.0], 5), [4.0, 3.0, 4.0])
    np.testing.assert_allclose(plot_metrics.moving_average([4.0, 2.0], 1), [4.0, 2.0])


def test_plot_metrics_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        plot_metrics.main([str(tmp_path / "nowhere.json")])

    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(TRAINING_LINES[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"broken\.json:2"):
        plot_metrics.main([str(broken)])

    nothing = write_metrics(tmp_path / "nothing.json", [{"iteration": 1, "time": 0.5}])
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_metrics.main([str(nothing)])

    metrics = write_metrics(tmp_path / "metrics.json", TRAINING_LINES + EVAL_LINES)
    with pytest.raises(KeyError, match="bbox/AP"):
        plot_metrics.main([str(metrics), "--metrics", "bbox/AP"])


def test_plot_metrics_script(tmp_path):
    metrics = write_metrics(tmp_path / "metrics.json", TRAINING_LINES + EVAL_LINES)
    run_script("plot_metrics.py", metrics, "--output", tmp_path / "out.png", "--metrics", "sem_seg/IoU-sky",
               cwd=tmp_path)
    assert_png(tmp_path / "out.png", size=(900, 960))


# ------------------------------------------------------------------ convert-torchvision-to-d2.py


def random_torchvision_resnet(depth, seed=0):
    """A torchvision ResNet with every weight and batch-norm statistic random, so that a
    mis-mapped key changes the output."""
    torch.manual_seed(seed)
    model = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def torchvision_res5(model, image):
    x = model.maxpool(model.relu(model.bn1(model.conv1(image))))
    return model.layer4(model.layer3(model.layer2(model.layer1(x))))


def d2_resnet_cfg(depth, norm):
    cfg = base_cfg()
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.RESNETS.NORM = norm
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res5"]
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64 if depth < 50 else 256
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    return cfg


def assert_close_features(actual, expected):
    scale = expected.abs().max().item()
    assert scale > 0
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * scale)


def test_converted_resnet50_gives_the_same_res5_features(tmp_path, one_thread):
    model = random_torchvision_resnet(50)
    torch.save(model.state_dict(), tmp_path / "resnet50.pth")
    weights = convert_torchvision.main([str(tmp_path / "resnet50.pth"), str(tmp_path / "resnet50.pkl")])
    assert not any(k.startswith("fc.") or k.endswith("num_batches_tracked") for k in weights)

    with open(tmp_path / "resnet50.pkl", "rb") as f:
        saved = pickle.load(f)
    assert saved["__author__"] == "torchvision" and saved["matching_heuristics"] is True

    backbone = build_resnet_backbone(d2_resnet_cfg(50, "FrozenBN"), ShapeSpec(channels=3)).eval()
    checkpointer = DetectionCheckpointer(backbone)
    incompatible = checkpointer._load_model(checkpointer._load_file(str(tmp_path / "resnet50.pkl")))
    assert incompatible.missing_keys == []
    assert incompatible.unexpected_keys == []
    assert incompatible.incorrect_shapes == []
    assert set(weights) == set(backbone.state_dict())

    image = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close_features(backbone(image)["res5"], torchvision_res5(model, image))


def test_converted_resnet18_loads_into_maskformer_with_matching_heuristics(tmp_path, one_thread):
    """tiny_cfg is a MaskFormer on ResNet-18 ("BN"): keys are found under "backbone."."""
    model = random_torchvision_resnet(18, seed=1)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "resnet18.pth")  # wrapped, as some tools save
    run_script("convert-torchvision-to-d2.py", tmp_path / "resnet18.pth", tmp_path / "resnet18.pkl", cwd=tmp_path)

    cfg = tiny_cfg()
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    maskformer = build_model(cfg).eval()
    DetectionCheckpointer(maskformer).load(str(tmp_path / "resnet18.pkl"))
    image = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert_close_features(maskformer.backbone(image)["res5"], torchvision_res5(model, image))


def test_convert_rejects_other_checkpoints(tmp_path):
    torch.save({"patch_embed.proj.weight": torch.zeros(1)}, tmp_path / "swin.pth")
    with pytest.raises(KeyError, match="swin.pth.*not a torchvision ResNet"):
        convert_torchvision.main([str(tmp_path / "swin.pth"), str(tmp_path / "out.pkl")])
    with pytest.raises(KeyError, match="layer1.0.attn.weight"):
        convert_torchvision.convert_key("layer1.0.attn.weight")


def test_cpu_description_of_the_benchmarks(monkeypatch):
    """The family / model numbers come from /proc/cpuinfo's own lines (not "model name"), and the
    huge-page state is the variable PyTorch's allocator reads."""
    from mask_former.utils import cpu_info

    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line and line.strip())
        family = next((v.strip() for k, v in fields.items() if k.strip() == "cpu family"), None)
        model = next((v.strip() for k, v in fields.items() if k.strip() == "model"), None)
        # (ARM kernels write neither line)
        expected = f"family {family} model {model}" if family and model else "unknown"
        assert cpu_info.cpu_family_model() == expected
    for value, expected in [("1", "on"), ("0", "off")]:
        monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", value)
        assert cpu_info.huge_pages() == expected
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE")
    assert cpu_info.huge_pages() == "off"
