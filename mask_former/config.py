"""Every config key this project adds to detectron2's defaults.

Original MaskFormer key names and defaults are kept so that configs written for the original
implementation load unchanged; keys new to this project carry a one-line comment.
"""
from detectron2.config import CfgNode as CN
from detectron2.projects.deeplab import add_deeplab_config


def add_mask_former_config(cfg):
    """Add MaskFormer's keys to a detectron2 config (in place).

    Also adds detectron2's DeepLab project keys (``SOLVER.POLY_LR_*`` for WarmupPolyLR,
    ``MODEL.RESNETS.STEM_TYPE/RES4_DILATION/RES5_MULTI_GRID`` for the "R101c" backbones), as the
    original MaskFormer configs rely on them.
    """
    if not hasattr(cfg.SOLVER, "POLY_LR_POWER"):
        add_deeplab_config(cfg)
        # DeepLab's defaults are for DeepLab; MaskFormer's ResNets use the plain stem by default.
        cfg.MODEL.RESNETS.STEM_TYPE = "basic"
        cfg.MODEL.RESNETS.RES5_MULTI_GRID = [1, 1, 1]
    # ---------------------------------------------------------------- input / data
    cfg.INPUT.DATASET_MAPPER_NAME = "mask_former_semantic"
    cfg.INPUT.COLOR_AUG_SSD = False
    cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA = 1.0
    cfg.INPUT.SIZE_DIVISIBILITY = -1

    # ---------------------------------------------------------------- solver
    cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.0
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1

    # ---------------------------------------------------------------- MaskFormer
    cfg.MODEL.MASK_FORMER = CN()
    cfg.MODEL.MASK_FORMER.DEEP_SUPERVISION = True
    cfg.MODEL.MASK_FORMER.NO_OBJECT_WEIGHT = 0.1
    cfg.MODEL.MASK_FORMER.DICE_WEIGHT = 1.0
    # weight of the sigmoid focal mask loss (the paper's default mask loss)
    cfg.MODEL.MASK_FORMER.MASK_WEIGHT = 20.0
    # which mask losses to use, any of "focal", "bce", "brier", "dice", alone or combined
    cfg.MODEL.MASK_FORMER.MASK_LOSSES = ["focal", "dice"]
    # weight of the binary cross-entropy mask loss (when "bce" is in MASK_LOSSES)
    cfg.MODEL.MASK_FORMER.BCE_WEIGHT = 20.0
    # weight of the Brier-score mask loss (p - y)^2 (when "brier" is in MASK_LOSSES)
    cfg.MODEL.MASK_FORMER.BRIER_WEIGHT = 20.0
    # weight of the classification term in the Hungarian matching cost
    cfg.MODEL.MASK_FORMER.CLASS_WEIGHT = 1.0

    cfg.MODEL.MASK_FORMER.NHEADS = 8
    cfg.MODEL.MASK_FORMER.DROPOUT = 0.1
    cfg.MODEL.MASK_FORMER.DIM_FEEDFORWARD = 2048
    cfg.MODEL.MASK_FORMER.ENC_LAYERS = 0
    cfg.MODEL.MASK_FORMER.DEC_LAYERS = 6
    cfg.MODEL.MASK_FORMER.PRE_NORM = False
    cfg.MODEL.MASK_FORMER.HIDDEN_DIM = 256
    cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES = 100
    cfg.MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE = "res5"
    cfg.MODEL.MASK_FORMER.ENFORCE_INPUT_PROJ = False
    # name in TRANSFORMER_DECODER_REGISTRY of the query decoder ("predictor")
    cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME = "StandardTransformerDecoder"
    # images are padded to a multiple of this before the backbone
    cfg.MODEL.MASK_FORMER.SIZE_DIVISIBILITY = 32

    cfg.MODEL.MASK_FORMER.TEST = CN()
    # produce "sem_seg" outputs at inference
    cfg.MODEL.MASK_FORMER.TEST.SEMANTIC_ON = True
    # produce "instances" outputs (thing classes, top-k over queries x classes) at inference
    cfg.MODEL.MASK_FORMER.TEST.INSTANCE_ON = False
    cfg.MODEL.MASK_FORMER.TEST.PANOPTIC_ON = False
    cfg.MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD = 0.0
    cfg.MODEL.MASK_FORMER.TEST.OVERLAP_THRESHOLD = 0.0
    cfg.MODEL.MASK_FORMER.TEST.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE = False
    # number of instances kept per image by instance inference
    cfg.MODEL.MASK_FORMER.TEST.DETECTIONS_PER_IMAGE = 100

    # ---------------------------------------------------------------- pixel decoder
    cfg.MODEL.SEM_SEG_HEAD.MASK_DIM = 256
    cfg.MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS = 0
    cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME = "BasePixelDecoder"

    # ---------------------------------------------------------------- Swin backbone
    cfg.MODEL.SWIN = CN()
    cfg.MODEL.SWIN.PRETRAIN_IMG_SIZE = 224
    cfg.MODEL.SWIN.PATCH_SIZE = 4
    cfg.MODEL.SWIN.EMBED_DIM = 96
    cfg.MODEL.SWIN.DEPTHS = [2, 2, 6, 2]
    cfg.MODEL.SWIN.NUM_HEADS = [3, 6, 12, 24]
    cfg.MODEL.SWIN.WINDOW_SIZE = 7
    cfg.MODEL.SWIN.MLP_RATIO = 4.0
    cfg.MODEL.SWIN.QKV_BIAS = True
    cfg.MODEL.SWIN.QK_SCALE = None
    cfg.MODEL.SWIN.DROP_RATE = 0.0
    cfg.MODEL.SWIN.ATTN_DROP_RATE = 0.0
    cfg.MODEL.SWIN.DROP_PATH_RATE = 0.3
    cfg.MODEL.SWIN.APE = False
    cfg.MODEL.SWIN.PATCH_NORM = True
    cfg.MODEL.SWIN.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
