"""The key layout of the published MaskFormer checkpoints, mapped onto this project's modules.

The published ``model_final_*.pkl`` files keep the pixel decoder's weights directly under the
head (``sem_seg_head.adapter_1.weight``); this project's heads hold the pixel decoder as a
submodule (``sem_seg_head.pixel_decoder.adapter_1.weight``). :func:`remap_published_keys` moves
such keys where the model expects them. It is driven by the model's own keys, so it applies to
any head with a ``pixel_decoder`` submodule and never renames a key the model already has.
"""
import logging
from typing import Collection, Dict

__all__ = ["remap_published_keys"]

logger = logging.getLogger(__name__)

PIXEL_DECODER = "pixel_decoder."


def remap_published_keys(state_dict: Dict[str, object], model_keys: Collection[str]) -> int:
    """
    Rename, in place, every checkpoint key ``P.rest`` that the model lacks to ``P.pixel_decoder.rest``
    when the model has that key, for each module prefix ``P`` that owns a pixel decoder.

    Args:
        state_dict: checkpoint key -> weight (modified in place).
        model_keys: the model's state-dict keys.
    Returns:
        the number of keys moved.
    """
    model_keys = set(model_keys)
    owners = {key[: key.index(PIXEL_DECODER)] for key in model_keys if PIXEL_DECODER in key}
    moved = 0
    for key in list(state_dict):
        if key in model_keys:
            continue
        for owner in sorted(owners, key=len, reverse=True):
            if key.startswith(owner):
                target = owner + PIXEL_DECODER + key[len(owner):]
                if target in model_keys and target not in state_dict:
                    state_dict[target] = state_dict.pop(key)
                    moved += 1
                break
    if moved:
        logger.info(f"Moved {moved} pixel-decoder weights of a published checkpoint under "
                    f"{', '.join(sorted(o + PIXEL_DECODER for o in owners))}")
    return moved
