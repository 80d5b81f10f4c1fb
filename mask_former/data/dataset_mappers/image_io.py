"""Reading images, semantic label maps and COCO panoptic PNGs for the dataset mappers.

Two kinds of failure are kept apart:

- a file that is missing, truncated or undecodable raises :class:`ImageReadError` (an
  ``OSError``); mappers treat it as transient in training and skip the sample;
- a file that reads fine but holds the wrong kind of data (a 3-channel label map, a
  floating-point image) raises ``ValueError``: that is a data bug and is never skipped.
"""

from typing import Optional

import numpy as np
from detectron2.utils.file_io import PathManager
from PIL import Image, ImageOps

__all__ = [
    "SUPPORTED_IMAGE_FORMATS",
    "ImageReadError",
    "read_image",
    "read_label_map",
    "read_panoptic_png",
]

SUPPORTED_IMAGE_FORMATS = ("RGB", "BGR")

# PIL modes holding one 16-bit channel ("I" is how some Pillow versions and TIFFs present them)
_16_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_LABEL_MODES = ("L", "P", "1", "I") + _16_BIT_MODES


class ImageReadError(OSError):
    """An image or label file is missing, truncated or cannot be decoded.

    Attributes:
        file_name: the file that could not be read (None when made from a message alone).
        reason: why, e.g. "FileNotFoundError: ...".
    """

    def __init__(self, file_name: str, reason: Optional[str] = None):
        if reason is None:  # from a whole message, as a DataLoader re-raises a worker's error
            super().__init__(file_name)
            self.file_name, self.reason = None, file_name
            return
        super().__init__(f"cannot read {file_name!r}: {reason}")
        self.file_name = file_name
        self.reason = reason

    def __reduce__(self):  # picklable, so that data-loader workers can report it
        return type(self), (self.file_name, self.reason)


def _open(file_name: str) -> Image.Image:
    """Open and fully decode ``file_name`` (so truncation is detected here), applying EXIF
    orientation like detectron2's ``read_image``."""
    try:
        with PathManager.open(file_name, "rb") as f:
            image = Image.open(f)
            image.load()
        return ImageOps.exif_transpose(image)
    # FileNotFoundError, PIL.UnidentifiedImageError and "image file is truncated" are OSErrors;
    # some PIL decoders report corrupt data as SyntaxError or EOFError
    except (OSError, SyntaxError, EOFError) as e:
        raise ImageReadError(file_name, f"{type(e).__name__}: {e}") from e


def _16_bit_to_8_bit(array: np.ndarray, file_name: str) -> np.ndarray:
    """Keep the high byte of 16-bit values, as Pillow itself does for 16-bit RGB PNGs."""
    if array.min() < 0 or array.max() > 65535:
        raise ValueError(
            f"{file_name!r}: integer image values span [{array.min()}, {array.max()}]; "
            "expected 8-bit or 16-bit unsigned data"
        )
    return (array.astype(np.uint32) >> 8).astype(np.uint8)


def read_image(file_name: str, format: str) -> np.ndarray:
    """
    Read an image as 8-bit, 3-channel data in ``format``.

    Grayscale, bilevel, palette, RGBA/LA (alpha dropped), CMYK and 16-bit grayscale images are
    converted; 16-bit values keep their high byte.

    Args:
        file_name: path understood by detectron2's PathManager.
        format: "RGB" or "BGR".

    Returns:
        np.ndarray: H x W x 3, uint8, channels in ``format`` order.

    Raises:
        ImageReadError: the file is missing, truncated or undecodable.
        ValueError: ``format`` is unsupported, or the pixel type cannot be made 8-bit RGB.
    """
    if format not in SUPPORTED_IMAGE_FORMATS:
        raise ValueError(
            f"image format {format!r} is not supported; expected one of {SUPPORTED_IMAGE_FORMATS}"
        )
    image = _open(file_name)
    if image.mode in _16_BIT_MODES or image.mode == "I":
        gray = _16_bit_to_8_bit(np.asarray(image), file_name)
        rgb = np.repeat(gray[:, :, None], 3, axis=2)
    elif image.mode == "F":
        raise ValueError(f"{file_name!r}: floating-point images (PIL mode 'F') are not supported")
    else:
        try:
            rgb = np.asarray(image.convert("RGB"))
        except ValueError as e:
            raise ValueError(
                f"{file_name!r}: cannot convert PIL mode {image.mode!r} to RGB: {e}"
            ) from e
    if format == "BGR":
        rgb = rgb[:, :, ::-1]
    return np.ascontiguousarray(rgb)


def read_label_map(file_name: str) -> np.ndarray:
    """
    Read a single-channel map of integer labels (semantic class ids).

    Palette PNGs give their palette indices; 16-bit files (PNG, TIFF) keep all 16 bits.

    Returns:
        np.ndarray: H x W, uint8, uint16 or int32.

    Raises:
        ImageReadError: the file is missing, truncated or undecodable.
        ValueError: the file is not single-channel integer data.
    """
    image = _open(file_name)
    if image.mode not in _LABEL_MODES:
        raise ValueError(
            f"{file_name!r}: a label map must be a single-channel integer image "
            f"(PIL mode one of {_LABEL_MODES}); got mode {image.mode!r}"
        )
    label = np.asarray(image)
    if image.mode == "1":
        return label.astype(np.uint8)
    if image.mode in _16_BIT_MODES:
        return label.astype(np.uint16)  # native byte order
    return np.array(label)  # writable copy


def read_panoptic_png(file_name: str) -> np.ndarray:
    """
    Read a COCO panoptic PNG (segment id = R + 256 * G + 256**2 * B).

    The RGB form is returned rather than ids so that geometric transforms can resize it as a
    uint8 image with detectron2's nearest-neighbour segmentation sampling; decode it with
    ``panopticapi.utils.rgb2id`` afterwards.

    Returns:
        np.ndarray: H x W x 3, uint8.

    Raises:
        ImageReadError: the file is missing, truncated or undecodable.
        ValueError: the file is not an RGB image.
    """
    image = _open(file_name)
    if image.mode != "RGB":
        raise ValueError(
            f"{file_name!r}: a COCO panoptic PNG must be RGB; got PIL mode {image.mode!r}"
        )
    return np.array(image)
