"""The package as users install it: a wheel (`pip install .`) and its sdist carry the model-zoo
configs and class tables, declare the console script, and work away from the source tree; the
model zoo's name lookup in the source checkout.

No network: the wheel is built without build isolation (setuptools of this environment) and
installed with --no-deps --no-index into a folder that a subprocess puts on its PYTHONPATH.
"""
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

from mask_former import model_zoo

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"
DATASETS_PACKAGE = REPO_ROOT / "mask_former" / "data" / "datasets"
ZOO_NAME = "ade20k-150/maskformer_R50_bs16_160k.yaml"
# what the build reads: pyproject.toml names README.md and LICENSE, setup.py maps mask_former/ and
# configs/ (MANIFEST.in where there is one)
BUILD_INPUTS = ["pyproject.toml", "setup.py", "README.md", "LICENSE", "MANIFEST.in", "mask_former", "configs"]


def run(cmd, cwd, env=None, timeout=300):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def pip(*args, cwd):
    return run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args], cwd=cwd)


def source_copy(dest: Path) -> Path:
    """The build inputs, copied so that building leaves no build/ or *.egg-info in the checkout."""
    dest.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in BUILD_INPUTS:
        src = REPO_ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        elif src.is_file():
            shutil.copy2(src, dest / name)
    return dest


def expected_data_files():
    """Paths inside the installed package of the model-zoo configs and the dataset class tables."""
    configs = {"mask_former/model_zoo/configs/" + p.relative_to(CONFIG_DIR).as_posix()
               for p in CONFIG_DIR.rglob("*.yaml")}
    tables = {p.relative_to(REPO_ROOT).as_posix() for p in DATASETS_PACKAGE.rglob("*.json")}
    return configs, tables


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(wheel, site folder with the wheel installed into it, sdist) of a non-editable build."""
    tmp = tmp_path_factory.mktemp("packaging")
    src = source_copy(tmp / "src")
    pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp / "wheel"), ".", cwd=src)
    (wheel,) = (tmp / "wheel").glob("mask_former-*.whl")
    site = tmp / "site"
    pip("install", "--no-deps", "--no-index", "--target", str(site), str(wheel), cwd=tmp)
    run([sys.executable, "-c", "from setuptools import build_meta; build_meta.build_sdist('../sdist')"], cwd=src)
    (sdist,) = (tmp / "sdist").glob("mask_former-*.tar.gz")
    return wheel, site, sdist


def test_wheel_contents(installed):
    wheel, _, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    configs, tables = expected_data_files()
    assert len(configs) > 30
    assert configs <= names, f"configs missing from the wheel: {sorted(configs - names)[:10]}"
    assert tables <= names, f"class tables missing from the wheel: {sorted(tables - names)[:10]}"
    assert "mask_former/model_zoo/__init__.py" in names and "mask_former/cli/train_net.py" in names
    assert {n.split("/")[0] for n in names} == {"mask_former", wheel.name.split("-py3")[0] + ".dist-info"}, \
        "only the mask_former package (no tests/, tools/, configs/ at the top level)"

    dist_info = wheel.name.split("-py3")[0] + ".dist-info"
    entry_points = zipfile.ZipFile(wheel).read(f"{dist_info}/entry_points.txt").decode()
    assert "[console_scripts]" in entry_points
    assert "maskformer-train = mask_former.cli.train_net:main" in entry_points
    metadata = zipfile.ZipFile(wheel).read(f"{dist_info}/METADATA").decode()
    assert "License-Expression: Apache-2.0" in metadata
    assert "Requires-Python: <3.13,>=3.11" in metadata
    assert "Provides-Extra: hf" in metadata and "Provides-Extra: dev" in metadata
    assert "Provides-Extra: fast-eval" in metadata
    assert any(n.startswith(f"{dist_info}/licenses/LICENSE") for n in names)


def test_sdist_builds_the_same_wheel(installed, tmp_path):
    """`pip install` of a source distribution: the sdist holds everything the wheel needs."""
    wheel, _, sdist = installed
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp_path, filter="data")
    (unpacked,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp_path / "wheel"), ".", cwd=unpacked)
    (from_sdist,) = (tmp_path / "wheel").glob("mask_former-*.whl")
    assert set(zipfile.ZipFile(from_sdist).namelist()) == set(zipfile.ZipFile(wheel).namelist())


def installed_env(site: Path):
    env = dict(os.environ, PYTHONPATH=str(site), OMP_NUM_THREADS="1")
    env.pop("PYTHONSTARTUP", None)
    return env


def test_installed_package_works_away_from_the_source(installed, tmp_path):
    _, site, _ = installed
    script = textwrap.dedent(f"""
        import os, sys
        import mask_former
        from mask_former import model_zoo
        site = os.path.realpath({str(site)!r})
        assert os.path.realpath(mask_former.__file__).startswith(site), mask_former.__file__
        path = model_zoo.get_config_file({ZOO_NAME!r})
        assert os.path.realpath(path).startswith(site) and os.path.isfile(path), path
        cfg = model_zoo.get_config({ZOO_NAME!r})  # its _BASE_ file is shipped too
        assert cfg.MODEL.META_ARCHITECTURE == "MaskFormer", cfg.MODEL.META_ARCHITECTURE
        assert cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == 150
        assert cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES == 100
        assert len(model_zoo.list_configs()) == {len(model_zoo.list_configs())}
        try:
            model_zoo.get_config_file("ade20k-150/maskformer_R50_bs16_160.yaml")
        except FileNotFoundError as e:
            assert {ZOO_NAME!r} in str(e), e
        else:
            raise AssertionError("a wrong name was accepted")
        print("OK", path)
    """)
    proc = run([sys.executable, "-c", script], cwd=tmp_path, env=installed_env(site))
    assert "OK" in proc.stdout


def test_console_script_runs(installed, tmp_path):
    _, site, _ = installed
    script = site / "bin" / "maskformer-train"
    assert script.is_file()
    proc = run([str(script), "--help"], cwd=tmp_path, env=installed_env(site))
    assert proc.stdout.startswith("usage: maskformer-train")
    assert "--config-file" in proc.stdout and "--eval-only" in proc.stdout and "--num-gpus" in proc.stdout


# ----------------------------------------------------------------------- model zoo, source checkout
def test_model_zoo_in_source_checkout():
    path = Path(model_zoo.get_config_file(ZOO_NAME))
    assert path == (CONFIG_DIR / ZOO_NAME).resolve()
    assert model_zoo.get_config_file("configs/" + ZOO_NAME) == str(path)  # as the README writes it
    names = model_zoo.list_configs()
    assert ZOO_NAME in names and "synthetic/maskformer_panoptic_R18.yaml" in names
    assert not any(Path(n).name.startswith("Base-") for n in names)
    assert "ade20k-150/Base-ADE20K-150.yaml" in model_zoo.list_configs(include_bases=True)
    cfg = model_zoo.get_config("synthetic/maskformer_panoptic_R18.yaml")
    assert cfg.INPUT.DATASET_MAPPER_NAME == "mask_former_panoptic"
    assert not cfg.is_frozen()


@pytest.mark.parametrize("wrong, suggested", [
    ("ade20k-150/maskformer_R50_bs16_16k.yaml", ZOO_NAME),  # typo
    ("ade20k/maskformer_R50_bs16_160k.yaml", ZOO_NAME),  # wrong folder
    ("maskformer_swin_tiny_bs16_160k.yaml", "ade20k-150/swin/maskformer_swin_tiny_bs16_160k.yaml"),  # no folder
])
def test_model_zoo_wrong_name_suggests(wrong, suggested):
    with pytest.raises(FileNotFoundError, match="did you mean") as info:
        model_zoo.get_config_file(wrong)
    assert suggested in str(info.value)


@pytest.mark.parametrize("wrong", ["", "ade20k-150", "../setup.py", "ade20k-150/../../setup.py", "nothing/like/it.txt"])
def test_model_zoo_rejects_non_configs(wrong):
    with pytest.raises(FileNotFoundError, match="no model-zoo config"):
        model_zoo.get_config_file(wrong)
