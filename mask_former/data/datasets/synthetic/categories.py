"""The classes of the built-in synthetic dataset and how they are numbered.

The class table is ``classes/synthetic.json``: five things (dataset ids 1..5), then three stuff
classes (101..103). The dataset is numbered things first (contiguous ids 0..4 for the things,
5..7 for the stuff), which its semantic PNGs use and its three registrations share.
"""
from ..class_tables import load_class_table
from ..metadata import build_metadata

__all__ = ["SYNTHETIC_CATEGORIES", "NUM_CLASSES", "NUMBERING", "SYNTHETIC_METADATA"]

SYNTHETIC_CATEGORIES = load_class_table("synthetic").categories
NUM_CLASSES = len(SYNTHETIC_CATEGORIES)
NUMBERING = "things_first"
SYNTHETIC_METADATA = build_metadata(SYNTHETIC_CATEGORIES, numbering=NUMBERING)
