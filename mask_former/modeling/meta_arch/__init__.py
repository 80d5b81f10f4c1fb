from .maskformer import MaskFormer
from .panoptic_segformer import PanopticSegFormer
