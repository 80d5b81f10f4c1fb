"""The model-zoo configs, found by name wherever the package is installed.

    from mask_former import model_zoo
    path = model_zoo.get_config_file("ade20k-150/maskformer_R50_bs16_160k.yaml")  # absolute path
    cfg = model_zoo.get_config("ade20k-150/maskformer_R50_bs16_160k.yaml")       # CfgNode

Names are paths relative to the repository's ``configs/`` folder. A wheel (``pip install .``)
carries a copy of that folder as ``mask_former/model_zoo/configs/`` (package data, see setup.py);
a source checkout or an editable install reads ``configs/`` itself.
"""
import difflib
from pathlib import Path
from typing import List

from detectron2.config import get_cfg

from ..config import add_mask_former_config, merge_config_file

__all__ = ["configs_dir", "list_configs", "get_config_file", "get_config"]

_HERE = Path(__file__).resolve().parent
_PACKAGED = _HERE / "configs"  # installed copy (wheel, non-editable install)
_SOURCE_ROOT = _HERE.parents[1]  # the repository root when this file lies in a source checkout


def configs_dir() -> Path:
    """The folder that holds the model-zoo configs."""
    if _PACKAGED.is_dir():
        return _PACKAGED
    # Source checkout / editable install: mask_former/ lies beside configs/ and pyproject.toml.
    source = _SOURCE_ROOT / "configs"
    if source.is_dir() and (_SOURCE_ROOT / "pyproject.toml").is_file():
        return source
    raise FileNotFoundError(
        f"the model-zoo configs are missing: neither {_PACKAGED} (installed package) nor {source} "
        "(source checkout) exists; reinstall the package"
    )


def list_configs(include_bases: bool = False) -> List[str]:
    """Names of all model-zoo configs (``"ade20k-150/maskformer_R50_bs16_160k.yaml"``, ...), sorted.
    The ``Base-*.yaml`` files that others inherit from are left out unless ``include_bases``."""
    root = configs_dir()
    names = (p.relative_to(root).as_posix() for p in root.rglob("*.yaml"))
    return sorted(n for n in names if include_bases or not Path(n).name.startswith("Base-"))


def _normalize(name: str) -> str:
    name = str(name).replace("\\", "/").strip()
    while name.startswith("./"):
        name = name[2:]
    if name.startswith("configs/"):  # accept the path as written in the README's commands
        name = name[len("configs/"):]
    return name


def get_config_file(name: str) -> str:
    """Absolute path of the model-zoo config ``name`` (relative to ``configs/``, e.g.
    ``"ade20k-150/maskformer_R50_bs16_160k.yaml"``; a leading ``configs/`` is accepted).

    Raises ``FileNotFoundError`` naming the closest existing configs when there is no such config.
    """
    root = configs_dir()
    rel = _normalize(name)
    path = (root / rel).resolve()
    if rel and path.is_file() and path.suffix == ".yaml" and root.resolve() in path.parents:
        return str(path)

    known = list_configs(include_bases=True)
    base = Path(rel).name
    # the same file name under another folder first, then names close to the whole path or to the
    # file name alone (a typo, or the right name under the wrong dataset folder)
    close_names = difflib.get_close_matches(base, sorted({Path(k).name for k in known}), n=5, cutoff=0.8)
    suggestions = [k for k in known if Path(k).name == base]
    suggestions += difflib.get_close_matches(rel, known, n=5, cutoff=0.6)
    suggestions += [k for k in known if Path(k).name in close_names]
    suggestions = list(dict.fromkeys(suggestions))[:8]
    if suggestions:
        hint = "did you mean: " + ", ".join(suggestions)
    else:
        folders = sorted({k.split("/")[0] for k in known})
        hint = f"the configs are in {', '.join(folders)} (mask_former.model_zoo.list_configs() names them all)"
    raise FileNotFoundError(f"no model-zoo config {name!r} in {root}; {hint}")


def get_config(name: str):
    """A detectron2 ``CfgNode`` with this project's keys (``add_mask_former_config``) merged with
    the model-zoo config ``name`` (see :func:`get_config_file`). Not frozen."""
    cfg = get_cfg()
    add_mask_former_config(cfg)
    merge_config_file(cfg, get_config_file(name))
    return cfg
