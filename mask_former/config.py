"""Every config key this project adds to detectron2's defaults.

Original MaskFormer key names and defaults are kept so that configs written for the original
implementation load unchanged; keys new to this project carry a one-line comment.
"""
import re

import yaml
from detectron2.config import CfgNode as CN
from detectron2.projects.deeplab import add_deeplab_config
from detectron2.utils.file_io import PathManager


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
    # ---------------------------------------------------------------- evaluation
    # library of mask AP and PQ: "pycocotools" (pycocotools and panopticapi) or "hotcoco" (the same
    # metrics, faster; pip install .[fast-eval])
    cfg.TEST.EVAL_BACKEND = "pycocotools"

    # ---------------------------------------------------------------- solver
    cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.0
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    # AdamW's fused kernel (one pass over each parameter, its gradient and moments; the same update
    # to float rounding, about 0.35x of the optimizer's time on CPU); False: PyTorch's loop over tensors
    cfg.SOLVER.FUSED_OPTIMIZER = True
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1
    # autocast dtype of SOLVER.AMP.ENABLED: "float16" (CUDA only) or "bfloat16" (CUDA or CPU)
    cfg.SOLVER.AMP.PRECISION = "float16"
    # learning-rate multiplier of deformable attention's sampling-offset and reference-point layers
    cfg.SOLVER.SAMPLING_OFFSET_MULTIPLIER = 1.0

    # ---------------------------------------------------------------- MaskFormer
    cfg.MODEL.MASK_FORMER = CN()
    cfg.MODEL.MASK_FORMER.DEEP_SUPERVISION = True
    cfg.MODEL.MASK_FORMER.NO_OBJECT_WEIGHT = 0.1
    cfg.MODEL.MASK_FORMER.DICE_WEIGHT = 1.0
    # weight of the sigmoid FOCAL mask loss ("focal" in MASK_LOSSES; the paper's mask loss). The
    # name is the original MaskFormer's, kept because the published configs set it
    cfg.MODEL.MASK_FORMER.MASK_WEIGHT = 20.0
    # which mask losses to use, any of "focal", "bce", "brier", "dice", alone or combined
    cfg.MODEL.MASK_FORMER.MASK_LOSSES = ["focal", "dice"]
    # weight of the binary cross-entropy mask loss (when "bce" is in MASK_LOSSES)
    cfg.MODEL.MASK_FORMER.BCE_WEIGHT = 20.0
    # weight of the Brier-score mask loss (p - y)^2 (when "brier" is in MASK_LOSSES)
    cfg.MODEL.MASK_FORMER.BRIER_WEIGHT = 20.0
    # weight of the classification term in the Hungarian matching cost
    cfg.MODEL.MASK_FORMER.CLASS_WEIGHT = 1.0
    # points per mask for the mask losses and matching costs; 0 = every pixel (the paper's losses)
    cfg.MODEL.MASK_FORMER.TRAIN_NUM_POINTS = 0
    # (TRAIN_NUM_POINTS > 0) random candidates per loss point for importance sampling, >= 1
    cfg.MODEL.MASK_FORMER.OVERSAMPLE_RATIO = 3.0
    # (TRAIN_NUM_POINTS > 0) fraction of the loss points taken as the most uncertain candidates
    cfg.MODEL.MASK_FORMER.IMPORTANCE_SAMPLE_RATIO = 0.75
    # points per image for the matching costs (uniformly random, shared by the image's queries and
    # targets): -1 = TRAIN_NUM_POINTS (as Mask2Former), 0 = every pixel, K > 0 = K points. Fewer
    # points than the losses' make the matcher cheaper and its costs noisier
    cfg.MODEL.MASK_FORMER.MATCHER_NUM_POINTS = -1
    # assignment solver of the matcher: "scipy" (on the CPU) or "torch" (exact, batched, on the device)
    cfg.MODEL.MASK_FORMER.MATCHER_SOLVER = "scipy"
    # the matcher sums its mask costs over this many pixels (points) at a time, so that the
    # intermediates stay in the cache; 0 = all pixels at once. Equal costs to float rounding.
    # Measured on CPUs only (on GPUs each chunk adds kernel launches)
    cfg.MODEL.MASK_FORMER.MATCHER_CHUNK_POINTS = 2048

    cfg.MODEL.MASK_FORMER.NHEADS = 8
    cfg.MODEL.MASK_FORMER.DROPOUT = 0.1
    cfg.MODEL.MASK_FORMER.DIM_FEEDFORWARD = 2048
    # encoder layers inside the transformer decoder, over its input feature (0 in every published
    # config); the pixel decoder's own encoder depth is MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS
    cfg.MODEL.MASK_FORMER.ENC_LAYERS = 0
    cfg.MODEL.MASK_FORMER.DEC_LAYERS = 6
    cfg.MODEL.MASK_FORMER.PRE_NORM = False
    cfg.MODEL.MASK_FORMER.HIDDEN_DIM = 256
    cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES = 100
    cfg.MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE = "res5"
    cfg.MODEL.MASK_FORMER.ENFORCE_INPUT_PROJ = False
    # name in TRANSFORMER_DECODER_REGISTRY of the transformer decoder (the head's "predictor")
    cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME = "StandardTransformerDecoder"
    # images are padded to a multiple of this before the backbone
    cfg.MODEL.MASK_FORMER.SIZE_DIVISIBILITY = 32

    cfg.MODEL.MASK_FORMER.TEST = CN()
    # produce "sem_seg" outputs at inference
    cfg.MODEL.MASK_FORMER.TEST.SEMANTIC_ON = True
    # produce "instances" outputs (thing classes, top-k over queries x classes) at inference
    cfg.MODEL.MASK_FORMER.TEST.INSTANCE_ON = False
    cfg.MODEL.MASK_FORMER.TEST.PANOPTIC_ON = False
    # panoptic merge: "pixel" (MaskFormer's argmax of score x mask) or "mask" (Panoptic SegFormer's
    # mask-wise merging, parameters in MODEL.PANOPTIC_SEGFORMER.TEST)
    cfg.MODEL.MASK_FORMER.TEST.PANOPTIC_MERGE = "pixel"
    cfg.MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD = 0.0
    cfg.MODEL.MASK_FORMER.TEST.OVERLAP_THRESHOLD = 0.0
    cfg.MODEL.MASK_FORMER.TEST.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE = False
    # alias of detectron2's TEST.DETECTIONS_PER_IMAGE (instances kept per image), which is read
    # when this is None; kept for configs written for earlier versions of this project
    cfg.MODEL.MASK_FORMER.TEST.DETECTIONS_PER_IMAGE = None
    # inference precision of the network (MaskFormer and PanopticSegFormer): "fp32" (exact), "bf16"
    # (faster on CPUs with AVX-512 bf16 / AMX and on GPUs from Ampere on) or "fp16" (for GPUs
    # without bfloat16; overflowing outputs are an error); post-processing stays float32
    cfg.MODEL.MASK_FORMER.TEST.PRECISION = "fp32"
    # keep the memory of the large outputs (MaskFormer's semantic scores) from one inference call
    # to the next, and write the next outputs into it once the caller has let go of the previous
    # ones: saves the page faults of new memory (0.32x -> 0.25x of the reference's time for R50
    # bf16 at 512x512) for one output's worth of memory held between calls. None: on with bf16 and
    # fp16, off with fp32 (where the held memory raised the peak and the time did not change).
    cfg.MODEL.MASK_FORMER.TEST.REUSE_OUTPUT_MEMORY = None
    # MaskFormer's inference with the large float32 3x3 convolutions by Winograd's algorithm (as
    # MODEL.TRAIN_WINOGRAD_CONV; channels-last: F(4x4, 3x3) in PyTorch, nothing kept between calls):
    # True, False, or None for "where it pays": CPUs with PyTorch's AVX2 kernels (docs/speed.md)
    cfg.MODEL.MASK_FORMER.TEST.WINOGRAD_CONV = None

    # ---------------------------------------------------------------- pixel decoder
    cfg.MODEL.SEM_SEG_HEAD.MASK_DIM = 256
    # encoder layers of the pixel decoder (TransformerEncoderPixelDecoder, MSDeformAttnPixelDecoder)
    cfg.MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS = 0
    cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME = "BasePixelDecoder"
    # MSDeformAttnPixelDecoder (its depth is TRANSFORMER_ENC_LAYERS, its dropout MASK_FORMER.DROPOUT):
    # backbone features its deformable encoder attends over, one level each
    cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES = ["res3", "res4", "res5"]
    # sampling points per head and level of its multi-scale deformable attention
    cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS = 4
    # attention heads of its multi-scale deformable attention
    cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS = 8
    # hidden channels of the feed-forward network of its encoder layers
    cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_DIM_FEEDFORWARD = 1024

    # ---------------------------------------------------------------- Panoptic SegFormer
    # (META_ARCHITECTURE "PanopticSegFormer"; its tasks are switched by MODEL.MASK_FORMER.TEST.*_ON)
    cfg.MODEL.PANOPTIC_SEGFORMER = CN()
    psf = cfg.MODEL.PANOPTIC_SEGFORMER
    # backbone features taken by the neck (strides 8, 16, 32); a 4th level is made by a stride-2 conv
    psf.IN_FEATURES = ["res3", "res4", "res5"]
    # feature levels of the deformable encoder (the neck's outputs plus the extra ones)
    psf.NUM_FEATURE_LEVELS = 4
    # channels of the neck, the encoder, the decoders and the queries
    psf.HIDDEN_DIM = 256
    # attention heads of every attention layer
    psf.NHEADS = 8
    # sampling points per head and level of the multi-scale deformable attention
    psf.N_POINTS = 4
    # hidden channels of every feed-forward network
    psf.DIM_FEEDFORWARD = 1024
    # dropout of the encoder and decoder layers
    psf.DROPOUT = 0.1
    # name in PSF_ENCODER_REGISTRY of the encoder (neck + positional encoding + deformable encoder)
    psf.ENCODER_NAME = "DeformableEncoder"
    # deformable encoder layers
    psf.ENC_LAYERS = 6
    # location-decoder layers (Deformable DETR decoder with iterative box refinement)
    psf.DEC_LAYERS = 6
    # thing queries of the location decoder
    psf.NUM_THING_QUERIES = 300
    # positional part of the thing queries in the mask decoder: "learned" (published: the location
    # decoder's learned query position) or "box" (not in the publication: an MLP on the sine
    # embedding of the location decoder's last boxes, which tells the mask attention where to look)
    psf.THING_QUERY_POS = "learned"
    # name in PSF_MASK_DECODER_REGISTRY of the mask decoder
    psf.MASK_DECODER_NAME = "AttentionMaskDecoder"
    # mask-decoder layers for the thing queries
    psf.THING_MASK_DEC_LAYERS = 4
    # mask-decoder layers for the stuff queries (with self-attention among them)
    psf.STUFF_MASK_DEC_LAYERS = 6
    # not in the publication: channels of MaskFormer's mask product (MLP(query) . Linear(token) on
    # the finest mask level) added to the attention-map mask logits; 0 (published): none
    psf.MASK_EMBED_DIM = 0
    # loss (and matching cost) weights: sigmoid focal class, box L1, box GIoU, dice mask
    psf.CLASS_WEIGHT = 2.0
    psf.BOX_L1_WEIGHT = 5.0
    psf.GIOU_WEIGHT = 2.0
    psf.DICE_WEIGHT = 2.0
    # not in the publication: weight of MaskFormer's per-pixel sigmoid focal mask loss added to the
    # dice loss (0: the published dice-only mask loss). Speeds up small models trained from scratch.
    psf.MASK_FOCAL_WEIGHT = 0.0
    # alpha and gamma of the sigmoid focal class loss and cost
    psf.FOCAL_ALPHA = 0.25
    psf.FOCAL_GAMMA = 2.0
    # not in the publication: "iou_aware" trains the thing class scores towards the IoU of each
    # matched prediction (see panoptic_segformer/criterion.py); "focal" is the published loss
    psf.CLASS_LOSS = "focal"
    # not in the publication: "encoder" places the thing queries' first reference boxes on the best
    # of the encoder tokens' box proposals (Deformable DETR's two-stage); "learned" is published
    psf.THING_QUERY_INIT = "learned"
    # box IoU above which a proposal is suppressed by a better one in that selection (1: none)
    psf.THING_QUERY_NMS_THRESHOLD = 0.7
    # not in the publication: groups of denoising queries in training (DN-DETR, carried to the
    # masks as in Mask DINO; see panoptic_segformer/denoising.py); 0 (published): none
    psf.DN_GROUPS = 0
    # their box noise (centre shift up to this x half the size, size scaled by 1 +- this) and the
    # probability that a denoising query's class is replaced by a random one
    psf.DN_BOX_NOISE = 0.4
    psf.DN_LABEL_NOISE = 0.2
    # mask-wise merging (also MaskFormer's with MODEL.MASK_FORMER.TEST.PANOPTIC_MERGE "mask")
    psf.TEST = CN()
    # (query, class) pairs of the location decoder kept for the mask decoder at inference
    psf.TEST.NUM_THINGS = 100
    # mask probability above which a pixel belongs to a mask
    psf.TEST.MASK_THRESHOLD = 0.5
    # confidence of a mask = class score ** ALPHA * mean mask probability ** BETA
    psf.TEST.ALPHA = 1.0
    psf.TEST.BETA = 2.0
    # masks whose confidence is below these are dropped (things, stuff)
    psf.TEST.THING_QUALITY_THRESHOLD = 0.25
    psf.TEST.STUFF_QUALITY_THRESHOLD = 0.25
    # masks overlapping already-placed pixels by more than this fraction of their area are dropped
    psf.TEST.THING_OVERLAP_THRESHOLD = 0.4
    psf.TEST.STUFF_OVERLAP_THRESHOLD = 0.2

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
    # names of the K classes, for predictions when DATASETS.TEST names no dataset (converted HF models)
    cfg.MODEL.CLASS_NAMES = []
    # parts of the meta-architecture whose activations are recomputed in the backward instead of
    # kept (less training memory for more time, the same losses and gradients): submodules'
    # dotted names ("backbone.res2": its forward) or a submodule's method
    # ("sem_seg_head.pixel_decoder.forward_features")
    cfg.MODEL.ACTIVATION_CHECKPOINTING = []
    # train with the convolutions channels-last (their weights stored so): True, False, or None for
    # "where it pays": on GPUs and on CPUs with AVX-512 kernels in PyTorch; on AVX2 CPUs oneDNN's
    # channels-last backward of 3x3 convolutions is 2-2.5x slower than planar (docs/speed.md)
    cfg.MODEL.TRAIN_CHANNELS_LAST = None
    # train with the large float32 3x3 convolutions on the CPU (>= 256 channels, maps >= 48 x 48
    # planar, 96 x 96 channels-last: MaskFormer's pixel decoder's finest ones) run by Winograd's
    # algorithm (NNPACK's forward; the gradients in PyTorch), the same losses and gradients to
    # float rounding: True, False, or None for "where it pays": CPUs with PyTorch's AVX2 kernels,
    # unless MODEL.ACTIVATION_CHECKPOINTING is set (NNPACK keeps a workspace; docs/speed.md)
    # (MaskFormer only: Panoptic SegFormer has no such convolutions and ignores both Winograd keys)
    cfg.MODEL.TRAIN_WINOGRAD_CONV = None


def merge_config_file(cfg, path: str, allow_unsafe: bool = False) -> None:
    """
    ``cfg.merge_from_file(path)`` that refuses YAML tags which run code while the file loads.

    The project's configs are plain YAML. detectron2's ``merge_from_file`` allows unsafe YAML by
    default and falls back to ``yaml.unsafe_load`` (which executes ``!!python/...`` tags) with only
    a warning; here such a config (or one of its ``_BASE_`` files) raises ValueError naming the
    file, the line and the tag, unless ``allow_unsafe`` is True (the tools' ``--allow-unsafe-config``).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the config uses a tag that only ``yaml.unsafe_load`` can read.
    """
    if not PathManager.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    try:
        cfg.merge_from_file(path, allow_unsafe=allow_unsafe)
    except yaml.constructor.ConstructorError as e:
        if allow_unsafe:
            raise
        mark = e.problem_mark
        where = f"{mark.name}, line {mark.line + 1}" if mark is not None else path
        tag = re.search(r"tag '([^']+)'", str(e.problem))
        what = f"the tag {tag.group(1).replace('tag:yaml.org,2002:', '!!')}" if tag else "a tag"
        raise ValueError(
            f"config {path!r} ({where}) uses {what}, which only yaml.unsafe_load reads and which "
            "can run code while the file loads; this project's configs are plain YAML. Remove "
            "the tag, or pass --allow-unsafe-config (allow_unsafe=True) if you trust the file"
        ) from e
