"""mask_former.demo.Predictor and the HuggingFace-style post-processing.

The post-processing is checked on hand-built logits whose expected maps are worked out in the
comments, against ``transformers.MaskFormerImageProcessor`` (an independent implementation) on
random logits where the two are meant to agree, and against the model's own outputs through the
predictor (a tiny MaskFormer with random weights).
"""
import math
import uuid

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model
from PIL import Image
from transformers import MaskFormerImageProcessor
from transformers.models.maskformer.modeling_maskformer import MaskFormerForInstanceSegmentationOutput

from mask_former.demo import (
    MaskFormerPredictor,
    Predictor,
    RawOutput,
    post_process_instance,
    post_process_panoptic,
    post_process_semantic,
)
from model_utils import CONFIG_DIR, base_cfg, tiny_cfg

LOG9 = math.log(9.0)  # sigmoid(+LOG9) = 0.9, sigmoid(-LOG9) = 0.1


def class_logits(*probabilities):
    """Q x (K+1) logits whose softmax is the given rows of probabilities (each summing to 1)."""
    return torch.tensor(probabilities, dtype=torch.float64).log().float()


def rectangles(shape, *boxes):
    """Q x H x W mask logits: +LOG9 inside query q's rectangle (rows r0:r1, cols c0:c1), -LOG9
    outside (probabilities 0.9 / 0.1); None gives an all-outside (empty) mask."""
    logits = torch.full((len(boxes), *shape), -LOG9)
    for q, box in enumerate(boxes):
        if box is not None:
            (r0, r1), (c0, c1) = box
            logits[q, r0:r1, c0:c1] = LOG9
    return logits


def hf_outputs(cls, masks):
    return MaskFormerForInstanceSegmentationOutput(class_queries_logits=cls, masks_queries_logits=masks)


# ----------------------------------------------------------------------------- semantic, by hand


def test_semantic_by_hand():
    # classes 0, 1 (+ no object); q0 says class 0 (0.6), q1 class 1 (0.7)
    cls = class_logits([0.6, 0.3, 0.1], [0.1, 0.7, 0.2])
    m = torch.tensor([[[0.9, 0.9, 0.1], [0.9, 0.5, 0.1]],
                      [[0.1, 0.5, 0.9], [0.1, 0.9, 0.9]]])
    raw = [RawOutput(cls, torch.logit(m))]
    # score(c) = p0[c] m0 + p1[c] m1; class 0: 0.6 m0 + 0.1 m1, class 1: 0.3 m0 + 0.7 m1
    # (0,0) .55 vs .34 -> 0   (0,1) .59 vs .62 -> 1   (0,2) .15 vs .66 -> 1
    # (1,0) .55 vs .34 -> 0   (1,1) .39 vs .78 -> 1   (1,2) .15 vs .66 -> 1
    (labels,) = post_process_semantic(raw)
    assert labels.dtype == torch.int64
    assert labels.tolist() == [[0, 1, 1], [0, 1, 1]]
    # a target size twice as large: the scores are resized bilinearly, then the argmax is taken;
    # the left column (class 0 in both rows) stays class 0 and the rest class 1 except where the
    # resized scores cross: output column 1 samples input column 0.25 (0.75 col 0 + 0.25 col 1)
    # -> row 0: class 0 .75*.55+.25*.59 = .56, class 1 .75*.34+.25*.62 = .41 -> 0
    (labels,) = post_process_semantic(raw, target_sizes=[(4, 6)])
    assert labels[:, :2].eq(0).all() and labels[:, 3:].eq(1).all()


def test_semantic_crops_the_padding_before_combining():
    # a 2 x 2 image padded to 4 x 4 (mask logits at the input resolution): q0 (class 0) covers the
    # image, q1 (class 1) the padding
    cls = class_logits([0.9, 0.05, 0.05], [0.05, 0.9, 0.05])
    masks = rectangles((4, 4), ((0, 2), (0, 2)), None)
    masks[1] = LOG9
    masks[1, :2, :2] = -LOG9
    raw = RawOutput(cls, masks, padded_size=(4, 4), image_size=(2, 2), original_size=(2, 2))
    assert post_process_semantic([raw])[0].tolist() == [[0, 0], [0, 0]]
    # upsampled twice for the output: still class 0 only
    assert post_process_semantic([raw], target_sizes=[(4, 4)])[0].eq(0).all()
    # HuggingFace-style outputs have no sizes: the whole padded map is resized to 2 x 2, each
    # output pixel the average of a 2 x 2 block -> the padding shows up as class 1
    unpadded = post_process_semantic(hf_outputs(cls[None], masks[None]), target_sizes=[(2, 2)])
    assert unpadded[0].tolist() == [[0, 1], [1, 1]]


def test_sizes_must_describe_the_padding():
    cls, masks = class_logits([0.5, 0.5]), torch.zeros(1, 4, 4)
    with pytest.raises(ValueError, match="inside padded_size"):
        RawOutput(cls, masks, padded_size=(4, 4), image_size=(5, 4))
    with pytest.raises(ValueError, match="both"):
        RawOutput(cls, masks, padded_size=(4, 4))
    with pytest.raises(ValueError, match="Q x h x w"):
        RawOutput(cls, torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="2 entries for 1 images"):
        post_process_semantic([RawOutput(cls, masks)], target_sizes=[(2, 2), (3, 3)])
    with pytest.raises(TypeError, match="list of RawOutput"):
        post_process_semantic(RawOutput(cls, masks))


# ----------------------------------------------------------------------------- instance, by hand


def instance_case():
    # classes 0, 1 (+ no object); 4 x 4 image
    cls = class_logits([0.8, 0.1, 0.1],   # q0: class 0
                       [0.2, 0.7, 0.1],   # q1: class 1 (and some class 0)
                       [0.05, 0.05, 0.9])  # q2: no object, empty mask
    masks = rectangles((4, 4), ((0, 2), (0, 2)), ((1, 4), (1, 4)), None)
    return [RawOutput(cls, masks)]


def test_instance_by_hand():
    raw = instance_case()
    # top-3 (query, class) pairs of the 6 class probabilities: (q0, 0) .8, (q1, 1) .7, (q1, 0) .2;
    # every mask probability inside a mask is 0.9 -> scores .72, .63, .18; threshold .5 keeps two
    (result,) = post_process_instance(raw)
    info = result["segments_info"]
    assert [(s["id"], s["label_id"], s["was_fused"]) for s in info] == [(0, 0, False), (1, 1, False)]
    assert [s["score"] for s in info] == pytest.approx([0.72, 0.63])
    # pixel (1, 1) is in both masks: the map shows the higher score (id 0)
    assert result["segmentation"].dtype == torch.int32
    assert result["segmentation"].tolist() == [[0, 0, -1, -1],
                                               [0, 0, 1, 1],
                                               [-1, 1, 1, 1],
                                               [-1, 1, 1, 1]]

    (result,) = post_process_instance(raw, threshold=0.1, return_binary_maps=True)
    assert [(s["label_id"], round(s["score"], 6)) for s in result["segments_info"]] == [
        (0, 0.72), (1, 0.63), (0, 0.18)]
    binary = result["segmentation"]
    assert binary.shape == (3, 4, 4) and binary.dtype == torch.bool
    np.testing.assert_array_equal(binary[2].numpy(), binary[1].numpy())  # q1's mask twice
    assert binary[0].sum() == 4 and binary[1].sum() == 9

    (result,) = post_process_instance(raw, threshold=0.1, return_coco_annotation=True)
    for rle, mask in zip(result["segmentation"], binary):
        assert rle["size"] == [4, 4]
        decoded = mask_util.decode({"size": rle["size"], "counts": rle["counts"].encode()})
        np.testing.assert_array_equal(decoded.astype(bool), mask.numpy())


def test_instance_top_k_labels_and_mask_threshold():
    raw = instance_case()
    # only class 1 may be an instance: (q1, 1) .7 -> .63, (q0, 1) .1 -> .09, (q2, 1) empty mask
    (result,) = post_process_instance(raw, threshold=0.05, label_ids=[1])
    assert [(s["label_id"], round(s["score"], 6)) for s in result["segments_info"]] == [(1, 0.63), (1, 0.09)]
    (result,) = post_process_instance(raw, threshold=0.0, top_k=1)
    assert [s["label_id"] for s in result["segments_info"]] == [0]
    # mask probabilities are 0.9 / 0.1: a threshold of 0.95 leaves every mask empty, 0.05 makes
    # every mask the whole image (mean probability (4 * .9 + 12 * .1) / 16 = .3 for q0)
    assert post_process_instance(raw, threshold=0.0, mask_threshold=0.95)[0]["segments_info"] == []
    (result,) = post_process_instance(raw, threshold=0.0, mask_threshold=0.05, top_k=1)
    assert result["segments_info"][0]["score"] == pytest.approx(0.8 * 0.3)
    assert result["segmentation"].eq(0).all()
    with pytest.raises(ValueError, match="both"):
        post_process_instance(raw, return_coco_annotation=True, return_binary_maps=True)
    with pytest.raises(ValueError, match="label_ids"):
        post_process_instance(raw, label_ids=[2])


# ----------------------------------------------------------------------------- panoptic, by hand

SKY, CAT, ROAD = 0, 1, 2  # sky and road are stuff


def panoptic_case():
    """A 4 x 6 image: sky on rows 0-1 from two queries, a cat on rows 1-3 / columns 1-2, road on
    rows 2-3 elsewhere, a second cat hidden under the road, a weak road and a "no object"."""
    cls = class_logits(
        [0.90, 0.05, 0.03, 0.02],  # q0 sky .9
        [0.10, 0.80, 0.05, 0.05],  # q1 cat .8
        [0.85, 0.05, 0.05, 0.05],  # q2 sky .85
        [0.02, 0.01, 0.95, 0.02],  # q3 road .95
        [0.10, 0.75, 0.10, 0.05],  # q4 cat .75
        [0.25, 0.25, 0.30, 0.20],  # q5 road .3 (below the threshold)
        [0.03, 0.03, 0.04, 0.90],  # q6 no object
    )
    masks = rectangles((4, 6), ((0, 2), (0, 3)), ((1, 4), (1, 3)), ((0, 2), (3, 6)), ((2, 4), (0, 6)),
                       ((2, 4), (4, 6)), ((0, 4), (0, 6)), ((0, 4), (0, 6)))
    masks[3, 2:, 1:3] = -LOG9  # the road leaves the cat's columns free
    return [RawOutput(cls, masks)]


# Pixel owners (argmax of class probability * mask probability over q0-q4):
#   rows 0-1, cols 0-2: q0 (.9 * .9 = .81 beats the cat's .8 * .9 = .72 at (1, 1), (1, 2))
#   rows 0-1, cols 3-5: q2;  rows 2-3, cols 1-2: q1 (.72);  rows 2-3, cols 0, 3-5: q3 (.855 > .675)
# Own masks / won: q0 6 / 6, q1 6 / 4 (.67), q2 6 / 6, q3 8 / 8, q4 4 / 0 (dropped).


def test_panoptic_by_hand():
    (result,) = post_process_panoptic(panoptic_case(), label_ids_to_fuse={SKY, ROAD})
    # overlap threshold .8: the cat (.67) is dropped, its pixels void; the two sky queries are one
    # segment (id 1, score max(.9, .85)); road is id 2
    assert result["segmentation"].dtype == torch.int32
    assert result["segmentation"].tolist() == [[1, 1, 1, 1, 1, 1],
                                               [1, 1, 1, 1, 1, 1],
                                               [2, 0, 0, 2, 2, 2],
                                               [2, 0, 0, 2, 2, 2]]
    info = result["segments_info"]
    assert [(s["id"], s["label_id"], s["was_fused"]) for s in info] == [(1, SKY, True), (2, ROAD, True)]
    assert [s["score"] for s in info] == pytest.approx([0.9, 0.95])


def test_panoptic_ids_are_unique_with_fused_labels():
    # overlap threshold .6 keeps the cat (.67). In query order: sky (id 1), cat (id 2), sky again
    # (fused into id 1), road: a new segment, id 3. (transformers' counter goes back to 1 at the
    # second sky query, so its road gets id 2, the cat's id.)
    (result,) = post_process_panoptic(panoptic_case(), overlap_mask_area_threshold=0.6,
                                      label_ids_to_fuse={SKY, ROAD})
    info = result["segments_info"]
    assert [(s["id"], s["label_id"]) for s in info] == [(1, SKY), (2, CAT), (3, ROAD)]
    assert result["segmentation"].tolist() == [[1, 1, 1, 1, 1, 1],
                                               [1, 1, 1, 1, 1, 1],
                                               [3, 2, 2, 3, 3, 3],
                                               [3, 2, 2, 3, 3, 3]]
    # nothing fused: every query its own segment
    (result,) = post_process_panoptic(panoptic_case(), overlap_mask_area_threshold=0.6)
    assert [(s["id"], s["label_id"], s["was_fused"]) for s in result["segments_info"]] == [
        (1, SKY, False), (2, CAT, False), (3, SKY, False), (4, ROAD, False)]
    assert result["segmentation"][:2].tolist() == [[1, 1, 1, 3, 3, 3]] * 2


def test_panoptic_thresholds():
    # threshold .92: only the road (.95) is left; it now also wins the sky's and the cat's pixels
    # (.1 * .95 beats nothing): 24 pixels, three times its own 8 -> kept
    (result,) = post_process_panoptic(panoptic_case(), threshold=0.92, label_ids_to_fuse={SKY, ROAD})
    assert [(s["id"], s["label_id"]) for s in result["segments_info"]] == [(1, ROAD)]
    assert result["segmentation"].eq(1).all()
    # nothing kept: a map of zeros (void), no segments
    (result,) = post_process_panoptic(panoptic_case(), threshold=0.99, target_sizes=[(3, 5)])
    assert result["segments_info"] == [] and result["segmentation"].shape == (3, 5)
    assert result["segmentation"].eq(0).all() and result["segmentation"].dtype == torch.int32
    # mask_threshold above .9: every own mask is empty -> no segment
    assert post_process_panoptic(panoptic_case(), mask_threshold=0.95)[0]["segments_info"] == []


# ----------------------------------------------------------------------------- against transformers


@pytest.fixture(scope="module")
def hf_processor():
    return MaskFormerImageProcessor()


def random_outputs(seed, batch=2, queries=8, classes=4, size=(16, 16), class_scale=2.0):
    g = torch.Generator().manual_seed(seed)
    cls = class_scale * torch.randn(batch, queries, classes + 1, generator=g)
    masks = 3.0 * torch.randn(batch, queries, *size, generator=g)
    return hf_outputs(cls, masks)


@pytest.mark.parametrize("target_sizes", [None, [(40, 37), (9, 30)]])
def test_semantic_equals_transformers(hf_processor, target_sizes):
    outputs = random_outputs(0)
    expected = hf_processor.post_process_semantic_segmentation(outputs, target_sizes=target_sizes)
    for ours, theirs in zip(post_process_semantic(outputs, target_sizes), expected):
        assert torch.equal(ours, theirs)


def test_instance_equals_transformers(hf_processor):
    # transformers' top-k is unsorted: compare the instances as sets
    outputs = random_outputs(1)
    expected = hf_processor.post_process_instance_segmentation(outputs, threshold=0.05, return_binary_maps=True)
    found = post_process_instance(outputs, threshold=0.05, return_binary_maps=True)
    for ours, theirs in zip(found, expected):
        def as_set(result):
            return sorted((s["label_id"], result["segmentation"][i].bool().numpy().tobytes(), s["score"])
                          for i, s in enumerate(result["segments_info"]))
        assert len(ours["segments_info"]) > 2
        assert [x[:2] for x in as_set(ours)] == [x[:2] for x in as_set(theirs)]
        assert [x[2] for x in as_set(ours)] == pytest.approx([x[2] for x in as_set(theirs)], abs=1e-6)


@pytest.mark.parametrize("case", ["confident queries", "whole-image own masks"])
def test_panoptic_equals_transformers_where_the_rules_agree(hf_processor, case):
    """transformers measures a query's own mask on its probabilities multiplied by its class score
    and keeps a segment winning MORE than the overlap threshold; this project (as MaskFormer) on the
    plain probabilities and AT LEAST the threshold. They agree when every kept class score is 1
    (one dominant logit), or when mask_threshold is 0 (the own mask is the whole image), with an
    overlap threshold no fraction of 256 pixels can equal; nothing fused (transformers' ids are
    then unique too)."""
    if case == "confident queries":
        g = torch.Generator().manual_seed(2)
        labels = torch.randint(0, 5, (2, 5), generator=g)  # class 4 is "no object"
        cls = torch.full((2, 5, 5), -30.0).scatter_(2, labels[..., None], 30.0)
        outputs = hf_outputs(cls, random_outputs(2, queries=5).masks_queries_logits)
        kwargs = dict(overlap_mask_area_threshold=0.4142)
    else:
        outputs = random_outputs(3)
        kwargs = dict(threshold=0.3, mask_threshold=0.0, overlap_mask_area_threshold=0.1234)
    expected = hf_processor.post_process_panoptic_segmentation(outputs, label_ids_to_fuse=set(), **kwargs)
    found = post_process_panoptic(outputs, **kwargs)
    assert sum(len(r["segments_info"]) for r in found) >= 4, "test setup: too few segments to compare"
    for ours, theirs in zip(found, expected):
        assert torch.equal(ours["segmentation"], theirs["segmentation"].to(torch.int32))
        assert [(s["id"], s["label_id"], s["was_fused"]) for s in ours["segments_info"]] == [
            (s["id"], s["label_id"], s["was_fused"]) for s in theirs["segments_info"]]
        assert [s["score"] for s in ours["segments_info"]] == pytest.approx(
            [s["score"] for s in theirs["segments_info"]], abs=1e-6)


# ----------------------------------------------------------------------------- the predictor

THING_CLASSES = ["cat", "dog", "sky", "road"]  # all classes; cat and dog are things


@pytest.fixture(scope="module")
def metadata_name():
    name = f"predictor_test_{uuid.uuid4().hex[:8]}"
    MetadataCatalog.get(name).set(stuff_classes=THING_CLASSES, thing_classes=THING_CLASSES,
                                  thing_dataset_id_to_contiguous_id={1: 0, 2: 1})
    return name


@pytest.fixture(scope="module")
def tiny_model_files(tmp_path_factory, metadata_name):
    """A tiny MaskFormer with random weights ("no object" made unlikely, so that panoptic keeps
    segments): its config file and weights."""
    folder = tmp_path_factory.mktemp("predictor")
    cfg = tiny_cfg(num_classes=len(THING_CLASSES))
    cfg.DATASETS.TEST = (metadata_name,)
    cfg.INPUT.MIN_SIZE_TEST = 40
    cfg.INPUT.MAX_SIZE_TEST = 80
    cfg.INPUT.FORMAT = "RGB"
    for task in ("SEMANTIC_ON", "PANOPTIC_ON", "INSTANCE_ON"):
        setattr(cfg.MODEL.MASK_FORMER.TEST, task, True)
    cfg.MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD = 0.3
    cfg.MODEL.MASK_FORMER.TEST.OVERLAP_THRESHOLD = 0.5
    cfg.MODEL.MASK_FORMER.TEST.DETECTIONS_PER_IMAGE = 6
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        model.sem_seg_head.predictor.class_embed.bias[-1] = -5.0
        model.sem_seg_head.predictor.class_embed.weight.mul_(10.0)  # confident, varied classes
    DetectionCheckpointer(model, save_dir=str(folder)).save("model")
    config = folder / "tiny.yaml"
    config.write_text(cfg.dump())
    return config, folder / "model.pth"


@pytest.fixture(scope="module")
def predictor(tiny_model_files):
    config, weights = tiny_model_files
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: one thread is faster on shared cores
    yield Predictor(str(config), weights=str(weights))
    torch.set_num_threads(previous)


def make_image(seed=0, shape=(50, 70)):
    """An RGB image with coloured rectangles."""
    g = np.random.default_rng(seed)
    image = np.full((*shape, 3), 40, np.uint8)
    for _ in range(4):
        r, c = g.integers(0, shape[0] - 10), g.integers(0, shape[1] - 10)
        image[r:r + 15, c:c + 20] = g.integers(0, 256, 3)
    return image




def test_predictor_equals_the_default_predictor(predictor, tiny_model_files):
    image = make_image()
    result = predictor(image)
    assert set(result) == {"sem_seg", "panoptic_seg", "instances"}
    assert result["sem_seg"].shape == (4, 50, 70)
    # detectron2's predictor takes BGR
    expected = MaskFormerPredictor(predictor.cfg)(np.ascontiguousarray(image[:, :, ::-1]))
    assert torch.equal(result["sem_seg"], expected["sem_seg"])
    assert torch.equal(result["panoptic_seg"][0], expected["panoptic_seg"][0])
    assert result["panoptic_seg"][1] == expected["panoptic_seg"][1]
    assert torch.equal(result["instances"].pred_masks, expected["instances"].pred_masks)


def test_every_kind_of_input_gives_the_same_result(predictor, tmp_path):
    image = make_image(1)
    Image.fromarray(image).save(tmp_path / "image.png")
    expected = predictor(image)["sem_seg"]
    for found in (predictor(np.ascontiguousarray(image[:, :, ::-1]), format="BGR"),
                  predictor(image[:, :, ::-1], format="BGR"),  # a view with negative strides
                  predictor(Image.fromarray(image)),
                  predictor(str(tmp_path / "image.png")),
                  predictor(tmp_path / "image.png")):
        assert torch.equal(found["sem_seg"], expected)
    # a list gives a list; a batch of images of different sizes too
    other = make_image(2, shape=(64, 40))
    results = predictor([image, other])
    assert isinstance(results, list) and len(results) == 2
    assert torch.equal(results[0]["sem_seg"], expected)
    assert results[1]["sem_seg"].shape == (4, 64, 40)
    with pytest.raises(ValueError, match="H x W x 3 uint8"):
        predictor(image[:, :, 0])
    with pytest.raises(ValueError, match="list of images"):
        predictor(image[None])
    with pytest.raises(ValueError, match="'RGB' or 'BGR'"):
        predictor(image, format="HSV")
    with pytest.raises(TypeError, match="PIL image"):
        predictor(torch.zeros(3, 8, 8))


def test_batches_give_the_same_shapes(tiny_model_files):
    config, weights = tiny_model_files
    batched = Predictor(str(config), weights=str(weights), batch_size=2, tasks=["semantic"])
    assert not batched.cfg.MODEL.MASK_FORMER.TEST.PANOPTIC_ON
    results = batched([make_image(0), make_image(1, shape=(60, 44)), make_image(2)])
    assert [tuple(r["sem_seg"].shape) for r in results] == [(4, 50, 70), (4, 60, 44), (4, 50, 70)]
    assert all(set(r) == {"sem_seg"} for r in results)


def test_raw_outputs_post_processed_give_the_models_results(predictor):
    # 50 x 70 is resized to 40 x 56 and padded to 64 x 64 (SIZE_DIVISIBILITY 32): the padding is
    # cropped before the post-processing, as in the model's inference
    images = [make_image(3), make_image(4, shape=(37, 61))]
    results = predictor(images)
    raw = predictor.raw_outputs(images)
    assert len(raw) == 2
    first = raw[0]
    assert first.class_logits.shape == (5, 5) and first.mask_logits.shape == (5, 16, 16)
    assert (first.padded_size, first.image_size, first.original_size) == ((64, 64), (40, 56), (50, 70))

    for result, labels in zip(results, predictor.post_process_semantic(raw)):
        expected = result["sem_seg"].argmax(0)
        assert labels.shape == expected.shape
        assert (labels == expected).float().mean() > 0.999  # the model combines by bands: rounding

    panoptic = predictor.post_process_panoptic(raw)
    assert sum(len(p["segments_info"]) for p in panoptic) >= 2, "test setup: no panoptic segments"
    for result, found in zip(results, panoptic):
        panoptic_seg, segments_info = result["panoptic_seg"]
        assert torch.equal(found["segmentation"], panoptic_seg)
        assert [(s["id"], s["label_id"]) for s in found["segments_info"]] == [
            (s["id"], s["category_id"]) for s in segments_info]

    instances = predictor.post_process_instance(raw, threshold=0.0, return_binary_maps=True)
    for result, found in zip(results, instances):
        expected = result["instances"]
        nonempty = expected.pred_masks.flatten(1).any(1)
        assert len(found["segments_info"]) == int(nonempty.sum()) > 0
        assert set(found["segments_info"][i]["label_id"] for i in range(len(found["segments_info"]))) <= {0, 1}
        order = expected.scores[nonempty].argsort(descending=True)
        assert torch.equal(found["segmentation"], expected.pred_masks[nonempty][order])
        assert [s["score"] for s in found["segments_info"]] == pytest.approx(
            expected.scores[nonempty][order].tolist())

    # other target sizes
    (labels,) = predictor.post_process_semantic(raw[:1], target_sizes=[(25, 35)])
    assert labels.shape == (25, 35)


def test_class_names_from_the_config(tiny_model_files):
    config, weights = tiny_model_files
    predictor = Predictor(str(config), weights=str(weights), opts=[
        "DATASETS.TEST", "()", "MODEL.CLASS_NAMES", "['a', 'b', 'c', 'd']",
        "MODEL.MASK_FORMER.TEST.PANOPTIC_ON", "False"])
    assert predictor.class_names == ["a", "b", "c", "d"]
    assert predictor.thing_ids is None
    with pytest.raises(ValueError, match="CLASS_NAMES names 2 classes"):
        Predictor(str(config), weights=str(weights), opts=[
            "DATASETS.TEST", "()", "MODEL.CLASS_NAMES", "['a', 'b']", "MODEL.MASK_FORMER.TEST.PANOPTIC_ON", "False"])


def test_model_zoo_names_and_errors(tmp_path):
    predictor = Predictor("ade20k-150/maskformer_R50_bs16_160k.yaml", weights="", device="cpu",
                          opts=["INPUT.MIN_SIZE_TEST", "32", "INPUT.MAX_SIZE_TEST", "64"])
    assert len(predictor.class_names) == 150
    assert predictor(make_image())["sem_seg"].shape == (150, 50, 70)
    with pytest.raises(FileNotFoundError, match="maskformer_R50_bs16_160k.yaml"):
        Predictor("ade20k-150/maskformer_R50_bs16_16k.yaml")
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        Predictor("ade20k-150/maskformer_R50_bs16_160k.yaml", weights=str(tmp_path / "nowhere.pth"))
    with pytest.raises(ValueError, match="Unknown task"):
        Predictor("ade20k-150/maskformer_R50_bs16_160k.yaml", weights="", tasks=["depth"])


def test_panoptic_segformer_predicts_but_has_no_raw_outputs():
    metadata = "_test_predictor_psf"
    MetadataCatalog.get(metadata).set(thing_dataset_id_to_contiguous_id={11: 1, 13: 3},
                                      stuff_classes=[f"c{i}" for i in range(5)],
                                      thing_classes=[f"c{i}" for i in range(5)])
    cfg = base_cfg()
    cfg.merge_from_file(str(CONFIG_DIR / "synthetic" / "panoptic_segformer_R18.yaml"))
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 5
    cfg.DATASETS.TRAIN = cfg.DATASETS.TEST = (metadata,)
    psf = cfg.MODEL.PANOPTIC_SEGFORMER
    psf.HIDDEN_DIM, psf.NHEADS, psf.DIM_FEEDFORWARD = 32, 4, 64
    psf.ENC_LAYERS, psf.DEC_LAYERS, psf.NUM_THING_QUERIES = 1, 2, 6
    psf.THING_MASK_DEC_LAYERS, psf.STUFF_MASK_DEC_LAYERS, psf.TEST.NUM_THINGS = 1, 1, 4
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 64, 96
    predictor = Predictor(cfg, weights="", device="cpu", tasks=["semantic", "panoptic", "instance"])
    result = predictor(make_image())
    assert result["sem_seg"].shape == (5, 50, 70)
    assert result["panoptic_seg"][0].shape == (50, 70)
    assert len(result["instances"]) == 4
    with pytest.raises(NotImplementedError, match="PanopticSegFormer"):
        predictor.raw_outputs(make_image())
