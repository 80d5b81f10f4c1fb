"""``--precision`` of tools/demo.py, tools/train_net.py (``--eval-only`` and the evaluations during
training) and tools/benchmark.py: it sets MODEL.MASK_FORMER.TEST.PRECISION after the config file
and the overrides, and the model built from that config runs its network in that precision."""
import importlib.util

import pytest

from mask_former.cli import demo as demo_cli
from mask_former.cli import train_net
from mask_former.engine import Trainer
from model_utils import CONFIG_DIR
from train_utils import REPO_ROOT

CONFIG = str(CONFIG_DIR / "synthetic" / "maskformer_panoptic_R18.yaml")  # its precision: the default, fp32
KEY = "MODEL.MASK_FORMER.TEST.PRECISION"


def load_benchmark_tool():
    spec = importlib.util.spec_from_file_location("tool_benchmark_precision", REPO_ROOT / "tools" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


benchmark_tool = load_benchmark_tool()


def demo_cfg(argv, tmp_path):
    parser = demo_cli.get_parser()
    args = parser.parse_args(["--config-file", CONFIG, "--input", "x.png", *argv])
    demo_cli.check_args(parser, args)
    return demo_cli.setup_cfg(args)[0]


def train_net_cfg(argv, tmp_path):
    args = train_net.parse_args(["--config-file", CONFIG, "--eval-only", *argv, "OUTPUT_DIR", str(tmp_path)])
    return train_net.setup(args)


def benchmark_cfg(argv, tmp_path):
    parser = benchmark_tool.get_parser()
    args = parser.parse_args(["--config-file", CONFIG, "--input-size", "64", "64", *argv])
    benchmark_tool.check_args(parser, args)
    args.device = "cpu"
    return benchmark_tool.setup_cfg(args)


def with_overrides(tool, argv, overrides):
    """The tool's arguments with config overrides where it takes them (demo: after --opts)."""
    return [*argv, "--opts", *overrides] if tool is demo_cfg else [*argv, *overrides]


TOOLS = [demo_cfg, train_net_cfg, benchmark_cfg]


@pytest.mark.parametrize("tool", TOOLS, ids=["demo", "train_net", "benchmark"])
@pytest.mark.parametrize("argv,overrides,expected", [
    ([], [], "fp32"),  # the config's
    ([], [KEY, "bf16"], "bf16"),  # an override without the option
    (["--precision", "bf16"], [], "bf16"),
    (["--precision", "bf16"], [KEY, "fp32"], "bf16"),  # the option comes after the overrides
    (["--precision", "fp32"], [KEY, "bf16"], "fp32"),
    (["--precision", "fp16"], [], "fp16"),
])
def test_the_option_sets_the_config_key(tool, argv, overrides, expected, tmp_path):
    cfg = tool(with_overrides(tool, argv, overrides), tmp_path)
    assert cfg.MODEL.MASK_FORMER.TEST.PRECISION == expected


def test_evaluation_builds_the_model_in_that_precision(tmp_path):
    cfg = train_net_cfg(["--precision", "bf16"], tmp_path)
    model = Trainer.build_model(cfg)
    assert model.precision == "bf16"


@pytest.mark.parametrize("tool", TOOLS, ids=["demo", "train_net", "benchmark"])
def test_an_unknown_precision_is_a_usage_error(tool, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        tool(["--precision", "fp8"], tmp_path)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--precision" in err and "'fp8'" in err and "bf16" in err and "fp16" in err


def test_benchmark_compare_runs_both_precisions_and_refuses_the_option(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        benchmark_cfg(["--compare", "--precision", "bf16"], tmp_path)
    assert exit_info.value.code == 2
    assert "--compare runs the fp32 and the bf16 path" in capsys.readouterr().err
