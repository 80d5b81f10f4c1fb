"""The library that computes mask AP and PQ (``TEST.EVAL_BACKEND``): pycocotools and panopticapi
(the reference implementations, the default) or hotcoco (``pip install .[fast-eval]``), a Rust
implementation of the same protocols whose metrics equal theirs (``tests/test_fast_eval.py``)."""

__all__ = ["CONFIG_KEY", "EVAL_BACKENDS", "HOTCOCO_REQUIREMENT", "check_eval_backend", "import_hotcoco"]

CONFIG_KEY = "TEST.EVAL_BACKEND"
EVAL_BACKENDS = ("pycocotools", "hotcoco")
# the version the extra "fast-eval" (pyproject.toml) installs and the tests compare with the references
HOTCOCO_REQUIREMENT = "hotcoco==1.3.0"


def check_eval_backend(backend, name: str = CONFIG_KEY) -> str:
    """``backend`` if it is one of :data:`EVAL_BACKENDS`, else a ValueError naming ``name``, the
    value and the accepted values."""
    if not isinstance(backend, str) or backend not in EVAL_BACKENDS:
        accepted = ", ".join(repr(b) for b in EVAL_BACKENDS)
        raise ValueError(f"{name} = {backend!r} is not an evaluation backend; accepted values: {accepted}")
    return backend


def import_hotcoco():
    """The ``hotcoco`` module, or an ImportError that says how to install it (no fallback to the
    reference implementations: a run asked for hotcoco)."""
    try:
        import hotcoco  # an optional dependency (the extra "fast-eval"), checked before use
    except ImportError as e:
        raise ImportError(
            f"{CONFIG_KEY} 'hotcoco' needs the hotcoco package: pip install .[fast-eval] "
            f"(or pip install {HOTCOCO_REQUIREMENT}); {CONFIG_KEY} 'pycocotools' uses pycocotools "
            "and panopticapi instead"
        ) from e
    return hotcoco
