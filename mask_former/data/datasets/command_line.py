"""Dataset registrations from the command line, for ``tools/train_net.py`` and ``tools/demo.py``.

One ``--dataset`` option per dataset, repeatable::

    --dataset NAME semantic IMAGE_DIR LABEL_DIR CLASSES_TXT [image_ext=.EXT] [label_ext=.EXT] [ignore_label=N]
    --dataset NAME coco_instances JSON IMAGE_DIR
    --dataset NAME coco_panoptic IMAGE_DIR PANOPTIC_DIR PANOPTIC_JSON [SEMANTIC_DIR] [INSTANCES_JSON]

- ``semantic``: ``IMAGE_DIR/x.jpg`` is labelled by ``LABEL_DIR/x.png`` (sub-folders included), a
  single-channel PNG of class ids; ``CLASSES_TXT`` names one class per line (line 1 is class 0).
  The image extension is the one image extension found in ``IMAGE_DIR`` unless ``image_ext=``
  says; labels end in ``.png`` unless ``label_ext=`` says; ``ignore_label`` defaults to 255.
- ``coco_instances``: a COCO instance-segmentation JSON and the folder of its images; contiguous
  class ids follow increasing category id.
- ``coco_panoptic``: COCO panoptic images, PNGs and JSON; optionally the semantic PNGs (contiguous
  ids, things first) and the instance JSON of the same images, for mIoU and mask AP of the
  panoptic model. The optional arguments are told apart by kind: a directory is SEMANTIC_DIR, a
  file INSTANCES_JSON.

Each is registered with the one-call helpers of :mod:`.custom`, with its class metadata complete
at registration (the class file, or the ``categories`` of the JSON, is read then), so that
``MODEL.SEM_SEG_HEAD.NUM_CLASSES -1`` can be filled from it (:func:`resolve_num_classes`) and the
demo names the classes.

argparse hands a ``--dataset`` everything up to the next option, so config overrides written
after the last ``--dataset`` (``... OUTPUT_DIR out``) would land in it, and a ``--dataset`` written
after the config overrides would land in them. :func:`normalize_dataset_arguments` sorts them
out: a ``--dataset`` ends at the first argument that looks like a config key (upper case, e.g.
``SOLVER.MAX_ITER`` or ``OUTPUT_DIR``) and is no existing path.

Bad arguments raise :class:`DatasetArgumentError`, whose message quotes the ``--dataset`` and
says what was expected.
"""
import argparse
import difflib
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog

from .custom import register_coco_instance_json, register_coco_panoptic_json, register_semantic_folder
from .metadata import check_categories
from .registration import read_json

__all__ = [
    "DATASET_FORMATS",
    "DATASET_ARGUMENT_HELP",
    "DATASET_ARGUMENT_EPILOG",
    "DatasetArgumentError",
    "DatasetSpec",
    "add_dataset_argument",
    "normalize_dataset_arguments",
    "parse_dataset_specs",
    "register_datasets_from_args",
    "num_classes_from_metadata",
    "resolve_num_classes",
    "check_datasets_registered",
]

logger = logging.getLogger(__name__)

# MODEL.SEM_SEG_HEAD.NUM_CLASSES of a config that takes the class count from its dataset
NUM_CLASSES_FROM_DATA = -1

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

_CONFIG_KEY = re.compile(r"[A-Z][A-Z0-9_]*(\.[A-Z][A-Z0-9_]*)*")
_OPTION = re.compile(r"([A-Za-z_]+)=(.*)")


@dataclass(frozen=True)
class _Format:
    required: Tuple[str, ...]  # positional arguments, in order
    optional: Tuple[str, ...] = ()  # optional positional arguments
    options: Tuple[str, ...] = ()  # key=value options

    def usage(self, name: str) -> str:
        words = list(self.required) + [f"[{a}]" for a in self.optional]
        words += [f"[{k}={_OPTION_METAVARS[k]}]" for k in self.options]
        return f"NAME {name} " + " ".join(words)


_OPTION_METAVARS = {"image_ext": ".EXT", "label_ext": ".EXT", "ignore_label": "N"}

DATASET_FORMATS: Dict[str, _Format] = {
    "semantic": _Format(("IMAGE_DIR", "LABEL_DIR", "CLASSES_TXT"),
                        options=("image_ext", "label_ext", "ignore_label")),
    "coco_instances": _Format(("JSON", "IMAGE_DIR")),
    "coco_panoptic": _Format(("IMAGE_DIR", "PANOPTIC_DIR", "PANOPTIC_JSON"),
                             optional=("SEMANTIC_DIR", "INSTANCES_JSON")),
}

DATASET_ARGUMENT_HELP = (
    "register your data under NAME, for DATASETS.TRAIN / DATASETS.TEST; repeatable. "
    "FORMAT is semantic, coco_instances or coco_panoptic (see below)"
)

DATASET_ARGUMENT_EPILOG = """\
datasets (--dataset, repeatable; registered in every process before the config is used):
  --dataset NAME semantic IMAGE_DIR LABEL_DIR CLASSES_TXT [image_ext=.EXT] [label_ext=.EXT] [ignore_label=N]
      IMAGE_DIR/x.jpg is labelled by LABEL_DIR/x.png (sub-folders included), a PNG of class ids;
      CLASSES_TXT names one class per line (line 1 is class 0). Defaults: the one image extension
      found in IMAGE_DIR, label_ext=.png, ignore_label=255.
  --dataset NAME coco_instances JSON IMAGE_DIR
      a COCO instance-segmentation JSON and the folder of its images.
  --dataset NAME coco_panoptic IMAGE_DIR PANOPTIC_DIR PANOPTIC_JSON [SEMANTIC_DIR] [INSTANCES_JSON]
      COCO panoptic images, PNGs and JSON; optionally the semantic PNGs (a directory; ids things
      first) and the instance JSON (a file) of the same images, for mIoU and mask AP.
  A config with MODEL.SEM_SEG_HEAD.NUM_CLASSES -1 (configs/custom/) takes the class count from the
  dataset. Config overrides (KEY VALUE ...) may follow the last --dataset.
"""


class DatasetArgumentError(ValueError):
    """A ``--dataset`` argument that cannot be registered; the message quotes it."""


@dataclass(frozen=True)
class DatasetSpec:
    """One parsed and checked ``--dataset``."""

    name: str
    format: str
    paths: Dict[str, str] = field(default_factory=dict)  # argument name (IMAGE_DIR, ...) -> path
    options: Dict[str, object] = field(default_factory=dict)
    classes: Tuple[str, ...] = ()  # semantic: from CLASSES_TXT

    @property
    def tokens(self) -> Tuple[str, ...]:
        return (self.name, self.format, *self.paths.values(),
                *(f"{k}={v}" for k, v in self.options.items()))


# ------------------------------------------------------------------------------ argparse


def add_dataset_argument(parser) -> None:
    """Add the repeatable ``--dataset NAME FORMAT ARG...`` option to an argparse parser
    (collected in ``args.dataset`` as a list of token lists), and its forms to the help's epilog
    (which is then printed as written)."""
    if parser.formatter_class is argparse.HelpFormatter:
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (parser.epilog.rstrip("\n") + "\n\n" if parser.epilog else "") + DATASET_ARGUMENT_EPILOG
    parser.add_argument(
        "--dataset", nargs="+", action="append", default=[], metavar=("NAME FORMAT", "ARG"),
        help=DATASET_ARGUMENT_HELP,
    )


def _looks_like_config_key(token: str) -> bool:
    return bool(_CONFIG_KEY.fullmatch(token)) and not os.path.exists(token)


def _split_group(tokens: Sequence[str]) -> Tuple[List[str], List[str]]:
    """(the --dataset's own tokens, config overrides that followed it)."""
    tokens = list(tokens)
    for i, token in enumerate(tokens):
        if i >= 2 and _looks_like_config_key(token):
            return tokens[:i], tokens[i:]
    return tokens, []


def normalize_dataset_arguments(args, opts_attr: str = "opts") -> None:
    """
    Sort out what argparse collected in ``args.dataset`` and ``args.<opts_attr>`` (the config
    overrides): config overrides written after a ``--dataset`` move to the overrides, and
    ``--dataset`` groups written after the config overrides move to ``args.dataset``, keeping
    the order of the command line. Idempotent.
    """
    groups = [list(g) for g in (getattr(args, "dataset", None) or [])]
    opts = list(getattr(args, opts_attr, None) or [])
    if opts[:1] == ["--"]:  # "--dataset ... -- KEY VALUE": argparse keeps the separator
        opts = opts[1:]
    # "--dataset" inside the overrides (written after them): more groups, after these overrides
    later_groups: List[List[str]] = []
    if "--dataset" in opts:
        first = opts.index("--dataset")
        opts, tail = opts[:first], opts[first:]
        for token in tail:
            if token == "--dataset":
                later_groups.append([])
            else:
                later_groups[-1].append(token)
    specs, overrides = [], []
    for position, group in enumerate(groups + later_groups):
        if position == len(groups):
            overrides.extend(opts)
        own, rest = _split_group(group)
        specs.append(own)
        overrides.extend(rest)
    if not later_groups:
        overrides.extend(opts)
    args.dataset = specs
    setattr(args, opts_attr, overrides)


# ------------------------------------------------------------------------------ parsing


def _quote(tokens: Sequence[str]) -> str:
    return "--dataset " + " ".join(str(t) for t in tokens)


def _read_classes(path: str, where: str) -> Tuple[str, ...]:
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetArgumentError(f"{where}: cannot read CLASSES_TXT '{path}' ({e})") from e
    while lines and not lines[-1].strip():
        lines.pop()
    names = [line.strip() for line in lines]
    if not names:
        raise DatasetArgumentError(
            f"{where}: CLASSES_TXT '{path}' is empty; expected one class name per line "
            "(line 1 is class 0)"
        )
    for number, name in enumerate(names, start=1):
        if not name:
            raise DatasetArgumentError(
                f"{where}: CLASSES_TXT '{path}' line {number} is empty; every line names one "
                f"class (line n is class n-1), so a blank line would shift the class ids"
            )
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DatasetArgumentError(
            f"{where}: CLASSES_TXT '{path}' names {', '.join(map(repr, repeated))} more than once; "
            "expected one line per class"
        )
    return tuple(names)


def _image_extension(image_dir: str, where: str) -> str:
    """The one image extension of the files in ``image_dir`` (sub-folders included)."""
    counts: Dict[str, int] = {}
    for _, _, names in os.walk(image_dir):
        for name in names:
            ext = os.path.splitext(name)[1]
            if ext.lower() in IMAGE_EXTENSIONS:
                counts[ext] = counts.get(ext, 0) + 1
    if not counts:
        raise DatasetArgumentError(
            f"{where}: IMAGE_DIR '{image_dir}' holds no image files "
            f"({', '.join(IMAGE_EXTENSIONS)})"
        )
    if len(counts) > 1:
        found = ", ".join(f"{n} {ext}" for ext, n in sorted(counts.items()))
        raise DatasetArgumentError(
            f"{where}: IMAGE_DIR '{image_dir}' holds images with several extensions ({found}); "
            "say which are the images with image_ext=.EXT"
        )
    return next(iter(counts))


def _parse_option(key: str, value: str, where: str):
    if key in ("image_ext", "label_ext"):
        if not value or "/" in value or os.sep in value:
            raise DatasetArgumentError(f"{where}: {key}={value!r}: expected a file ending such as .png")
        return value if value.startswith(".") else "." + value
    if key == "ignore_label":
        try:
            return int(value)
        except ValueError:
            raise DatasetArgumentError(
                f"{where}: ignore_label={value!r}: expected an integer in [0, 255]"
            ) from None
    raise AssertionError(key)


def _check_path(path: str, kind: str, argument: str, where: str) -> None:
    if kind == "dir" and not os.path.isdir(path):
        what = "is a file, not a directory" if os.path.exists(path) else "does not exist"
        raise DatasetArgumentError(f"{where}: {argument} '{path}' {what}; expected a directory")
    if kind == "file" and not os.path.isfile(path):
        what = "is a directory, not a file" if os.path.exists(path) else "does not exist"
        raise DatasetArgumentError(f"{where}: {argument} '{path}' {what}; expected a file")


_KINDS = {"IMAGE_DIR": "dir", "LABEL_DIR": "dir", "PANOPTIC_DIR": "dir", "SEMANTIC_DIR": "dir",
          "CLASSES_TXT": "file", "JSON": "file", "PANOPTIC_JSON": "file", "INSTANCES_JSON": "file"}


def _parse_one(tokens: Sequence[str]) -> DatasetSpec:
    tokens = [str(t) for t in tokens]
    where = _quote(tokens)
    forms = "; ".join(f.usage(n) for n, f in DATASET_FORMATS.items())
    if len(tokens) < 2:
        raise DatasetArgumentError(f"{where}: expected NAME FORMAT ARG..., one of: {forms}")
    name, format_name, arguments = tokens[0], tokens[1], tokens[2:]
    if not name or name.startswith("-") or any(c.isspace() for c in name):
        raise DatasetArgumentError(f"{where}: NAME {name!r} must be a word (no spaces, not starting with -)")
    if format_name not in DATASET_FORMATS:
        close = difflib.get_close_matches(format_name, list(DATASET_FORMATS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise DatasetArgumentError(
            f"{where}: unknown FORMAT {format_name!r}{hint}; expected one of "
            f"{', '.join(DATASET_FORMATS)}: {forms}"
        )
    fmt = DATASET_FORMATS[format_name]
    positional, options = [], {}
    for token in arguments:
        match = _OPTION.fullmatch(token)
        if match and fmt.options and not os.path.exists(token):
            key, value = match.groups()
            if key not in fmt.options:
                raise DatasetArgumentError(
                    f"{where}: unknown option {token!r}; {format_name} takes "
                    + ", ".join(f"{k}={_OPTION_METAVARS[k]}" for k in fmt.options)
                )
            options[key] = _parse_option(key, value, where)
        else:
            positional.append(token)
    low, high = len(fmt.required), len(fmt.required) + len(fmt.optional)
    if not low <= len(positional) <= high:
        count = f"{low}" if low == high else f"{low} to {high}"
        got = " ".join(positional) if positional else "none"
        raise DatasetArgumentError(
            f"{where}: expected {fmt.usage(format_name)} ({count} paths), got {len(positional)}: "
            f"{got}. (Config overrides such as OUTPUT_DIR x end a --dataset; they are upper case.)"
        )
    paths = dict(zip(fmt.required, positional))
    for argument, path in paths.items():
        _check_path(path, _KINDS[argument], argument, where)
    for path in positional[low:]:  # coco_panoptic's optional ones, told apart by kind
        if os.path.isdir(path):
            argument = "SEMANTIC_DIR"
        elif os.path.isfile(path):
            argument = "INSTANCES_JSON"
        else:
            raise DatasetArgumentError(
                f"{where}: '{path}' does not exist; expected SEMANTIC_DIR (a directory of semantic "
                "PNGs) or INSTANCES_JSON (a COCO instance JSON file)"
            )
        if argument in paths:
            raise DatasetArgumentError(
                f"{where}: two {argument} given ('{paths[argument]}', '{path}'); expected at most "
                "one SEMANTIC_DIR (a directory) and one INSTANCES_JSON (a file)"
            )
        paths[argument] = path
    classes = ()
    if format_name == "semantic":
        classes = _read_classes(paths["CLASSES_TXT"], where)
        if "image_ext" not in options:
            options["image_ext"] = _image_extension(paths["IMAGE_DIR"], where)
        options.setdefault("label_ext", ".png")
        options.setdefault("ignore_label", 255)
        if not len(classes) <= options["ignore_label"] <= 255:
            raise DatasetArgumentError(
                f"{where}: ignore_label={options['ignore_label']} must be in [{len(classes)}, 255]: "
                f"no class id of the {len(classes)} classes of CLASSES_TXT, and a uint8 PNG value"
            )
    return DatasetSpec(name, format_name, paths, options, classes)


def parse_dataset_specs(groups: Sequence[Sequence[str]]) -> List[DatasetSpec]:
    """
    Parse and check ``--dataset`` arguments (lists of tokens, after
    :func:`normalize_dataset_arguments`): format, argument count, options, that every path
    exists and is of the right kind, the class file of semantic datasets, and that no NAME is
    given twice or is already registered (other than by the same ``--dataset``). Reads no JSON.

    Raises:
        DatasetArgumentError: naming the ``--dataset`` and what was expected.
    """
    specs, seen = [], {}
    for tokens in groups:
        spec = _parse_one(tokens)
        if spec.name in seen:
            raise DatasetArgumentError(
                f"{_quote(tokens)}: NAME {spec.name!r} is given twice (also by "
                f"{_quote(seen[spec.name].tokens)}); expected one --dataset per name"
            )
        _check_name_free(spec, _quote(tokens))
        seen[spec.name] = spec
        specs.append(spec)
    return specs


# --dataset registrations of this process: registering the same one again is a no-op (e.g. a
# second run() in one process), another one under the same name an error
_REGISTERED: Dict[str, DatasetSpec] = {}


def _check_name_free(spec: DatasetSpec, where: str) -> None:
    if spec.name in DatasetCatalog.list() and _REGISTERED.get(spec.name) != spec:
        raise DatasetArgumentError(
            f"{where}: NAME {spec.name!r} is already registered (a dataset of detectron2 or of this "
            "project, or another --dataset); expected a new name"
        )


# ------------------------------------------------------------------------------ registration


def _instance_categories(json_file: str, where: str):
    try:
        content = read_json(json_file)
    except ValueError as e:
        raise DatasetArgumentError(f"{where}: JSON {e}") from e
    categories = content.get("categories") if isinstance(content, dict) else None
    if not categories:
        raise DatasetArgumentError(
            f"{where}: JSON '{json_file}' has no 'categories' list; expected a COCO "
            "instance-segmentation JSON (images, annotations, categories)"
        )
    try:
        check_categories([{"id": c.get("id"), "name": c.get("name")} if isinstance(c, dict) else c
                          for c in categories])
    except ValueError as e:
        raise DatasetArgumentError(f"{where}: JSON '{json_file}': {e}") from e
    return sorted(categories, key=lambda c: c["id"])


def _register(spec: DatasetSpec) -> None:
    where = _quote(spec.tokens)
    paths, options = spec.paths, spec.options
    try:
        if spec.format == "semantic":
            register_semantic_folder(
                spec.name, paths["IMAGE_DIR"], paths["LABEL_DIR"], list(spec.classes),
                ignore_label=options["ignore_label"], image_ext=options["image_ext"],
                gt_ext=options["label_ext"],
            )
        elif spec.format == "coco_instances":
            categories = _instance_categories(paths["JSON"], where)
            register_coco_instance_json(
                spec.name, paths["JSON"], paths["IMAGE_DIR"],
                thing_classes=[c["name"] for c in categories],
            )
            # what load_coco_json will set on loading, known now: the model's thing ids
            MetadataCatalog.get(spec.name).set(
                thing_dataset_id_to_contiguous_id={c["id"]: i for i, c in enumerate(categories)}
            )
        else:
            register_coco_panoptic_json(
                spec.name, paths["IMAGE_DIR"], paths["PANOPTIC_DIR"], paths["PANOPTIC_JSON"],
                sem_seg_root=paths.get("SEMANTIC_DIR"), instances_json=paths.get("INSTANCES_JSON"),
            )
    except DatasetArgumentError:
        _unregister(spec.name)
        raise
    except (ValueError, OSError) as e:
        _unregister(spec.name)
        raise DatasetArgumentError(f"{where}: {e}") from e


def _unregister(name: str) -> None:
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)


def register_datasets_from_args(groups: Sequence[Sequence[str]]) -> List[str]:
    """
    Parse, check (:func:`parse_dataset_specs`) and register the ``--dataset`` arguments
    ``groups`` (``args.dataset`` after :func:`normalize_dataset_arguments`). Call it in every
    process (detectron2's ``launch`` starts fresh ones) before the config is used. Registering
    the same arguments again in a process does nothing.

    Returns:
        list[str]: the registered names.
    """
    specs = parse_dataset_specs(groups)
    for spec in specs:
        if _REGISTERED.get(spec.name) == spec and spec.name in DatasetCatalog.list():
            continue
        _register(spec)
        _REGISTERED[spec.name] = spec
        classes = MetadataCatalog.get(spec.name).get("stuff_classes", None) or \
            MetadataCatalog.get(spec.name).get("thing_classes", [])
        logger.info(f"Registered dataset {spec.name!r} ({spec.format}, {len(classes)} classes) "
                    f"from {_quote(spec.tokens)}")
    return [spec.name for spec in specs]


# ------------------------------------------------------------------------------ the config


def num_classes_from_metadata(dataset_name: str) -> int:
    """
    The number of classes a model of ``dataset_name`` predicts, from its metadata: its
    ``stuff_classes`` (semantic and panoptic datasets: all classes), or else its thing classes
    (instance datasets: the highest contiguous thing id + 1).

    Raises:
        ValueError: when the metadata names no classes.
    """
    metadata = MetadataCatalog.get(dataset_name)
    stuff_classes = metadata.get("stuff_classes", None)
    if stuff_classes:
        return len(stuff_classes)
    id_map = metadata.get("thing_dataset_id_to_contiguous_id", None)
    if id_map:
        return max(id_map.values()) + 1
    thing_classes = metadata.get("thing_classes", None)
    if thing_classes:
        return len(thing_classes)
    raise ValueError(
        f"Dataset {dataset_name!r} names no classes in its metadata (no stuff_classes or "
        "thing_classes) before it is loaded"
    )


def resolve_num_classes(cfg, datasets_key: str = "DATASETS.TRAIN") -> Optional[int]:
    """
    When ``cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES`` is -1 (the custom configs: "take it from the
    data"), set it (unfrozen ``cfg``) from the metadata of the first dataset of ``datasets_key``
    ("DATASETS.TRAIN" for training, "DATASETS.TEST" for evaluation and the demo); see
    :func:`num_classes_from_metadata`. Any other value is left as it is (the trainer and the
    evaluators check it against the data). Returns the number set, or None.

    Raises:
        ValueError: when the dataset is missing, not registered or names no classes.
    """
    if cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES != NUM_CLASSES_FROM_DATA:
        return None
    names = _config_value(cfg, datasets_key)
    what = f"MODEL.SEM_SEG_HEAD.NUM_CLASSES is -1 (take the class count from {datasets_key}[0])"
    if not names:
        raise ValueError(f"{what}, but {datasets_key} is empty: set one of them")
    name = names[0]
    if name not in DatasetCatalog.list():
        raise ValueError(
            f"{what}, but dataset {name!r} is not registered: register it with "
            f"--dataset {name} FORMAT ARG... (see --help), or set MODEL.SEM_SEG_HEAD.NUM_CLASSES"
        )
    try:
        num_classes = num_classes_from_metadata(name)
    except ValueError as e:
        raise ValueError(f"{what}: {e}; set MODEL.SEM_SEG_HEAD.NUM_CLASSES") from e
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = num_classes
    return num_classes


def check_datasets_registered(cfg, keys: Sequence[str] = ("DATASETS.TRAIN", "DATASETS.TEST")) -> None:
    """Raise ValueError naming the config key when a dataset that ``cfg`` names under ``keys``
    is not registered, with how to register it and the closest registered names."""
    registered = DatasetCatalog.list()
    for key in keys:
        for name in _config_value(cfg, key):
            if name in registered:
                continue
            close = difflib.get_close_matches(name, registered, n=3)
            hint = f" Registered names close to it: {', '.join(close)}." if close else ""
            raise ValueError(
                f"{key} names dataset {name!r}, which is not registered: register your data with "
                f"--dataset {name} FORMAT ARG... (see --help), or set {key} to a registered "
                f"dataset (datasets/README.md lists the standard ones).{hint}"
            )


def _config_value(cfg, dotted_key: str):
    node = cfg
    for part in dotted_key.split("."):
        node = getattr(node, part)
    return node
