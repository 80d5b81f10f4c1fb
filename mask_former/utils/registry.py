"""Registry lookups whose errors name the config key and list what is registered."""
from detectron2.utils.registry import Registry


def lookup(registry: Registry, name: str, config_key: str):
    """Return ``registry.get(name)``; on an unknown name raise a ``KeyError`` that names the
    config key that asked for it and lists every registered name."""
    if name not in registry:
        known = ", ".join(sorted(k for k, _ in registry))
        raise KeyError(
            f"{config_key}={name!r} is not registered in the {registry._name} registry; "
            f"registered names: {known}"
        )
    return registry.get(name)
