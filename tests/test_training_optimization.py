"""MaskFormer's optimised training path (``optimize_training``: frozen batch norms folded into their
convolutions, channels-last convolutions, 1x1 convolutions as matrix products) against the modules
as built: same losses and gradients to float rounding, no gradient for the norms' buffers, the
modules and the state dict untouched."""
import pytest
import torch
from detectron2.layers import Conv2d, FrozenBatchNorm2d
from detectron2.modeling import build_model
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from mask_former.modeling.meta_arch import base as base_meta_arch
from mask_former.modeling.training_optimization import (
    channels_last_conv_weights,
    checkpoint_activations,
    folded_frozen_norms,
    frozen_norm_affine,
)
from mask_former.modeling.transformer_decoder.standard_transformer_decoder import (
    pixel_major_mask_logits,
    pixel_major_mask_logits_enabled,
)
from model_utils import tiny_cfg
from test_inference_paths import randomize_norms
from test_model import make_batch, tiny_swin_cfg
from test_panoptic_segformer import make_batch as psf_batch
from test_panoptic_segformer import psf_cfg


def frozen_norm(channels: int, seed: int) -> FrozenBatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    norm = FrozenBatchNorm2d(channels)
    norm.weight.copy_(torch.rand(channels, generator=g) + 0.5)
    norm.bias.copy_(torch.randn(channels, generator=g))
    norm.running_mean.copy_(torch.randn(channels, generator=g))
    norm.running_var.copy_(torch.rand(channels, generator=g) + 0.5)
    return norm


def test_frozen_norm_affine_by_hand():
    norm = frozen_norm(3, seed=0)
    x = torch.randn(2, 3, 4, 5)
    expected = (x - norm.running_mean.view(1, 3, 1, 1)) / torch.sqrt(norm.running_var.view(1, 3, 1, 1) + norm.eps)
    expected = expected * norm.weight.view(1, 3, 1, 1) + norm.bias.view(1, 3, 1, 1)
    scale, shift = frozen_norm_affine(norm)
    torch.testing.assert_close(x * scale.view(1, 3, 1, 1) + shift.view(1, 3, 1, 1), expected)


@pytest.mark.parametrize("kernel_size,stride,bias", [(1, 1, False), (1, 2, True), (3, 1, True), (3, 2, False)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_folded_convolution_equals_conv_then_norm(kernel_size, stride, bias, channels_last):
    """Values, the gradients of the input and of the convolution's weight and bias; the norm's
    buffers get no gradient and stay as they were. The expectation is written out by hand:
    convolution, then ``(y - mean) / sqrt(var + eps) * weight + bias``, then ReLU."""
    torch.manual_seed(0)
    norm = frozen_norm(6, seed=1)
    conv = Conv2d(4, 6, kernel_size, stride=stride, padding=kernel_size // 2, bias=bias, norm=norm,
                  activation=F.relu)
    buffers = {k: v.clone() for k, v in norm.state_dict().items()}
    x = torch.randn(2, 4, 9, 7)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x_ref = x.detach().clone().requires_grad_(True)
    x_opt = x.detach().clone().requires_grad_(True)

    y = F.conv2d(x_ref, conv.weight, conv.bias, stride, kernel_size // 2)
    y = (y - norm.running_mean.view(1, -1, 1, 1)) / torch.sqrt(norm.running_var.view(1, -1, 1, 1) + norm.eps)
    expected = F.relu(y * norm.weight.view(1, -1, 1, 1) + norm.bias.view(1, -1, 1, 1))
    upstream = torch.randn_like(expected)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), [x_ref] + list(conv.parameters()))

    with folded_frozen_norms(conv):
        out = conv(x_opt)
    grads = torch.autograd.grad((out * upstream).sum(), [x_opt] + list(conv.parameters()))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert "forward" not in conv.__dict__  # the layer runs as built again
    for name, value in norm.state_dict().items():
        assert torch.equal(value, buffers[name])
        assert not value.requires_grad


def training_losses_and_grads(model, batch, optimize_training: bool, channels_last: bool = True):
    model.optimize_training = optimize_training
    model.train_channels_last = channels_last
    model.zero_grad()
    torch.manual_seed(0)  # the same dropout in both runs
    losses = model(batch)
    sum(losses.values()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, grads


def assert_same_loss_terms(losses, reference, rtol, atol):
    assert losses.keys() == reference.keys()
    for key in losses:
        torch.testing.assert_close(losses[key], reference[key], rtol=rtol, atol=atol)


def assert_same_gradients(grads, reference):
    """Every parameter's gradient within 1e-3 of the tensor's largest; gradients that are zero but
    for rounding (e.g. a bias followed by a normalization) within 1e-5 of the model's largest."""
    assert grads.keys() == reference.keys()
    largest = max(float(g.abs().max()) for g in reference.values())
    for name in grads:
        tolerance = 1e-3 * float(reference[name].abs().max()) + 1e-5 * largest
        assert float((grads[name] - reference[name]).abs().max()) <= tolerance, name


def test_only_frozen_batch_norms_are_folded():
    """Convolutions with a trainable BatchNorm2d (batch statistics in training) or a GroupNorm run
    as built; those with a FrozenBatchNorm2d get the folded forward, removed on exit."""
    model = build_model(tiny_cfg()).train()  # BN backbone, GN pixel decoder
    frozen = Conv2d(3, 4, 3, norm=FrozenBatchNorm2d(4))
    model.add_module("extra", frozen)
    with folded_frozen_norms(model):
        patched = [m for m in model.modules() if "forward" in m.__dict__]
    assert patched == [frozen]
    assert "forward" not in frozen.__dict__


# A trainable BatchNorm2d is left out of the whole-step comparison: with batch statistics over the
# few pixels of the tiny model's deepest levels, rounding differences of the two layouts grow to
# about 1 % of some gradients, which says nothing about the folding (not applied to it anyway).
@pytest.mark.parametrize("backbone", ["FrozenBN", "swin", "panoptic_segformer", "FrozenBN planar"])
def test_optimized_training_equals_modules_as_built(backbone):
    """A whole training step's losses and every parameter's gradient, both paths on the same model
    (MaskFormer with three backbones; Panoptic SegFormer with a FrozenBN ResNet), channels-last
    (or, "planar", with only the norms folded: MODEL.TRAIN_CHANNELS_LAST False)."""
    channels_last = not backbone.endswith(" planar")
    backbone = backbone.replace(" planar", "")
    if backbone == "panoptic_segformer":
        cfg, batch = psf_cfg(), psf_batch()
        cfg.MODEL.RESNETS.NORM = "FrozenBN"
    else:
        cfg, batch = (tiny_swin_cfg() if backbone == "swin" else tiny_cfg()), make_batch()
        if backbone != "swin":
            cfg.MODEL.RESNETS.NORM = backbone
    torch.manual_seed(0)
    model = build_model(cfg).train()
    randomize_norms(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    losses, grads = training_losses_and_grads(model, batch, optimize_training=True, channels_last=channels_last)
    ref_losses, ref_grads = training_losses_and_grads(model, batch, optimize_training=False)
    assert_same_loss_terms(losses, ref_losses, rtol=1e-5, atol=1e-6)
    assert_same_gradients(grads, ref_grads)
    if backbone in ("FrozenBN", "panoptic_segformer"):
        frozen = [m for m in model.modules() if isinstance(m, Conv2d) and isinstance(m.norm, FrozenBatchNorm2d)]
        assert frozen and all(m.weight.grad is not None for m in frozen)  # FREEZE_AT 0: all trained
    # the modules run as built after the step, and nothing in the state dict moved or was replaced
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert state.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def conv_weights(model):
    return {name: m.weight for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}


def test_channels_last_conv_weights_keeps_values_and_parameters():
    """Every Conv2d weight becomes channels-last in place: the same Parameter objects (an optimizer
    built before keeps them), the same values; other parameters are not touched; a second call
    changes nothing."""
    model = build_model(tiny_cfg())
    weights = conv_weights(model)
    values = {k: v.detach().clone() for k, v in model.state_dict().items()}
    others = {n: p for n, p in model.named_parameters() if p.dim() != 4}
    assert any(not w.is_contiguous(memory_format=torch.channels_last) for w in weights.values())

    changed = channels_last_conv_weights(model)
    assert changed > 0
    assert conv_weights(model) == weights  # same objects
    for w in weights.values():
        assert w.is_contiguous(memory_format=torch.channels_last)
    for k, v in model.state_dict().items():
        assert torch.equal(v, values[k]), k
    for n, p in model.named_parameters():
        if p.dim() != 4:
            assert p is others[n] and p.is_contiguous()
    assert channels_last_conv_weights(model) == 0


@pytest.mark.parametrize("optimize_training", [True, False])
def test_training_step_stores_conv_weights_channels_last(optimize_training):
    """The first optimised training step leaves the convolution weights and their gradients
    channels-last (no reorder at every call); the modules as built keep their layout."""
    model = build_model(tiny_cfg()).train()
    model.optimize_training = optimize_training
    model.train_channels_last = True
    sum(model(make_batch()).values()).backward()
    trained = {name: w for name, w in conv_weights(model).items() if w.grad is not None}
    assert len(trained) > 10  # FREEZE_AT 0: the backbone's and the pixel decoder's convolutions
    for name, w in trained.items():
        # (a 1x1 kernel is contiguous in both layouts)
        layout = torch.channels_last if optimize_training else torch.contiguous_format
        assert w.is_contiguous(memory_format=layout), name
        assert w.grad.is_contiguous(memory_format=layout), name
    if not optimize_training:
        assert any(not w.is_contiguous(memory_format=torch.channels_last) for w in conv_weights(model).values())


def test_trainer_stores_conv_weights_channels_last_before_the_optimizer():
    """``Trainer.build_optimizer`` (called before DistributedDataParallel wraps the model) converts
    the weights of a model that trains optimised, in place: the optimizer holds the same objects."""
    from mask_former.engine.trainer import Trainer

    cfg = tiny_cfg()
    cfg.MODEL.TRAIN_CHANNELS_LAST = True
    for optimize_training in (True, False):
        model = build_model(cfg)
        model.optimize_training = optimize_training
        weights = conv_weights(model)
        optimizer = Trainer.build_optimizer(cfg, model)
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        assert all(id(w) in held for w in weights.values())
        # (a 1x1 kernel is contiguous in both layouts)
        converted = [w.is_contiguous(memory_format=torch.channels_last) for w in weights.values() if w.shape[-1] > 1]
        assert converted and (all(converted) if optimize_training else not any(converted))


@pytest.mark.parametrize("avx512", [True, False])
def test_channels_last_training_by_default_only_where_it_pays(monkeypatch, avx512):
    """MODEL.TRAIN_CHANNELS_LAST None: channels-last on CPUs with PyTorch's AVX-512 kernels, planar
    on others (AVX2: oneDNN's channels-last backward is slower there); True / False force it. The
    backbone's stem sees its input in that layout, and the weights follow it."""
    monkeypatch.setattr(base_meta_arch, "cpu_has_avx512_kernels", lambda: avx512)
    for setting, expected in ((None, avx512), (True, True), (False, False)):
        cfg = tiny_cfg()
        cfg.MODEL.TRAIN_CHANNELS_LAST = setting
        model = build_model(cfg).train()
        assert model.channels_last_training() is expected
        seen = []
        model.backbone.stem.conv1.register_forward_pre_hook(
            lambda m, args, seen=seen: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
        )
        sum(model(make_batch()).values()).backward()
        assert seen == [expected], setting
        layouts = {w.is_contiguous(memory_format=torch.channels_last) for w in conv_weights(model).values()
                   if w.shape[-1] > 1}  # (a 1x1 kernel is contiguous in both layouts)
        assert layouts == {expected}, setting


def test_planar_training_takes_its_weights_back_after_an_evaluation():
    """Inference stores the convolution weights channels-last; planar training stores them planar
    again at its next step (their values unchanged), so that its convolutions stay planar."""
    cfg = tiny_cfg()
    cfg.MODEL.TRAIN_CHANNELS_LAST = False
    model = build_model(cfg).train()
    sum(model(make_batch()).values()).backward()
    model.eval()
    with torch.no_grad():
        model([{"image": torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8)}])
    weights = {n: w for n, w in conv_weights(model).items() if w.shape[-1] > 1}
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in weights.values())
    values = {n: w.detach().clone() for n, w in weights.items()}
    model.train()
    sum(model(make_batch()).values()).backward()
    for name, w in weights.items():
        assert w.is_contiguous() and w.grad.is_contiguous(), name
        assert torch.equal(w, values[name]), name


def test_train_channels_last_key_is_checked():
    cfg = tiny_cfg()
    cfg.MODEL.TRAIN_CHANNELS_LAST = "yes"
    with pytest.raises(ValueError, match=r"MODEL.TRAIN_CHANNELS_LAST='yes': expected None .*True or False"):
        build_model(cfg)


def saved_tensor_bytes(model, batch):
    """Bytes of the distinct storages autograd keeps for the backward of one training step (the
    step's graph is freed on return)."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        losses = model(batch)
    del losses
    return sum(storages.values())


@pytest.mark.parametrize("meta_arch", ["maskformer", "panoptic_segformer"])
def test_activation_checkpointing_keeps_losses_and_gradients_and_saves_activations(meta_arch):
    if meta_arch == "panoptic_segformer":
        cfg, batch = psf_cfg(), psf_batch()
        names = ["backbone", "encoder", "mask_decoder"]
    else:
        cfg, batch = tiny_cfg(), make_batch()
        names = ["backbone.stem", "backbone.res2", "backbone.res3", "backbone.res4", "backbone.res5",
                 "sem_seg_head.pixel_decoder.forward_features", "sem_seg_head.predictor"]
    cfg.MODEL.RESNETS.NORM = "FrozenBN"  # the folded convolutions are recomputed folded
    torch.manual_seed(0)
    plain = build_model(cfg).train()
    randomize_norms(plain)
    cfg.MODEL.ACTIVATION_CHECKPOINTING = names
    checkpointed = build_model(cfg).train()
    checkpointed.load_state_dict(plain.state_dict())
    assert checkpointed.state_dict().keys() == plain.state_dict().keys()

    losses, grads = training_losses_and_grads(checkpointed, batch, optimize_training=True)
    ref_losses, ref_grads = training_losses_and_grads(plain, batch, optimize_training=True)
    assert_same_loss_terms(losses, ref_losses, rtol=1e-6, atol=1e-7)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-7, msg=name)
    # the recomputation folded the norms again and removed the folded forwards afterwards
    replaced = {f"{n}.{attr}" for n, m in checkpointed.named_modules() for attr in ("forward", "forward_features")
                if attr in m.__dict__}
    assert replaced == {name if name.endswith("forward_features") else f"{name}.forward" for name in names}

    torch.manual_seed(0)
    kept = saved_tensor_bytes(checkpointed, batch)
    torch.manual_seed(0)
    ref_kept = saved_tensor_bytes(plain, batch)
    assert kept < 0.3 * ref_kept, (kept, ref_kept)

    with torch.no_grad():  # inference runs the modules' own forward
        checkpointed.eval()
        plain.eval()
        out, ref = checkpointed(batch[:1])[0], plain(batch[:1])[0]
        torch.testing.assert_close(out["sem_seg"], ref["sem_seg"])


def test_activation_checkpointing_rejects_unknown_and_repeated_names():
    cfg = tiny_cfg()
    cfg.MODEL.ACTIVATION_CHECKPOINTING = ["backbone.res9"]
    with pytest.raises(ValueError, match=r"'backbone.res9' is neither a submodule of MaskFormer.*sem_seg_head"):
        build_model(cfg)
    with pytest.raises(ValueError, match="must be a list of names, got the string 'backbone'"):
        checkpoint_activations(build_model(tiny_cfg()), "backbone")
    cfg.MODEL.ACTIVATION_CHECKPOINTING = [""]
    with pytest.raises(ValueError, match="entries are dotted submodule names, got ''"):
        build_model(cfg)
    cfg.MODEL.ACTIVATION_CHECKPOINTING = ["backbone.res2", "backbone.res2"]
    with pytest.raises(ValueError, match="'backbone.res2' is listed twice"):
        build_model(cfg)


def test_swin_trains_and_recomputes_with_its_windows_masked_by_minus_infinity(swin_masked_logits):
    """With ``optimize_training`` a Swin backbone's shifted windows are masked with -inf (no
    denormal attention weights), also when a checkpointed backbone is recomputed in the backward;
    the modules as built keep the original's -100."""
    masked_logits = swin_masked_logits
    cfg, batch = tiny_swin_cfg(), make_batch()
    torch.manual_seed(0)
    model = build_model(cfg).train()
    training_losses_and_grads(model, batch, optimize_training=False)
    assert masked_logits and set(masked_logits) == {-100.0}
    calls = len(masked_logits)
    masked_logits.clear()
    training_losses_and_grads(model, batch, optimize_training=True)
    assert len(masked_logits) == calls and set(masked_logits) == {float("-inf")}

    masked_logits.clear()
    cfg.MODEL.ACTIVATION_CHECKPOINTING = ["backbone"]
    checkpointed = build_model(cfg).train()
    checkpointed.load_state_dict(model.state_dict())
    training_losses_and_grads(checkpointed, batch, optimize_training=True)
    # the forward and its recomputation in the backward
    assert len(masked_logits) == 2 * calls and set(masked_logits) == {float("-inf")}


@pytest.mark.parametrize("optimize_training", [True, False])
def test_training_mask_logits_are_pixel_major_only_when_optimized(optimize_training):
    # planar features (as on AVX2 CPUs): the optimised path's logits of all layers come out
    # pixel-major (queries innermost), which the matcher reads in place; the modules as built keep
    # b x q x h x w memory. Either way the factors' product.
    cfg = tiny_cfg()
    cfg.MODEL.TRAIN_CHANNELS_LAST = False
    torch.manual_seed(0)
    model = build_model(cfg).train()
    model.optimize_training = optimize_training
    seen = []
    model.sem_seg_head.predictor.register_forward_hook(lambda module, args, out: seen.append(out))
    model(make_batch())
    outputs = seen[0]
    masks, features = outputs["pred_masks"], outputs["mask_features"]
    assert features.is_contiguous() and masks.shape[1] > 1
    assert masks.stride(1) == 1 if optimize_training else masks.stride(-1) == 1
    torch.testing.assert_close(masks, torch.einsum("bqc,bchw->bqhw", outputs["mask_embed"], features))


def test_checkpointed_recomputation_keeps_the_mask_logits_layout():
    # the backward recomputes a checkpointed part after MaskFormer.forward has left its contexts:
    # the part runs again under the switches it first ran under
    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(3))
            self.seen = []

        def forward(self, x):
            self.seen.append(pixel_major_mask_logits_enabled())
            return x * self.weight

    model = torch.nn.Sequential(Probe()).train()
    checkpoint_activations(model, ["0"])
    for enabled in (True, False):
        model[0].seen.clear()
        with pixel_major_mask_logits(enabled):
            out = model(torch.randn(3, requires_grad=True))
        out.sum().backward()
        assert model[0].seen == [enabled, enabled]


@pytest.mark.parametrize("optimize_training", [True, False])
def test_checkpointed_predictor_is_recomputed_without_its_mask_product(optimize_training):
    # the backward needs the inputs of the product of all layers' mask embeddings and the
    # per-pixel features, not its result: the recomputation of a checkpointed predictor stops
    # before it (early stop), so a step runs the product once, in the forward
    cfg = tiny_cfg()
    cfg.MODEL.ACTIVATION_CHECKPOINTING = ["sem_seg_head.predictor"]
    torch.manual_seed(0)
    model = build_model(cfg).train()
    model.optimize_training = optimize_training
    seen = []
    model.sem_seg_head.predictor.register_forward_hook(lambda module, args, out: seen.append(out))

    class ProductShapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten.bmm.default:
                self.shapes.append(tuple(out.shape))
            return out

    products = ProductShapes()
    with products:
        losses = model(make_batch())
        sum(losses.values()).backward()
    features = seen[0]["mask_features"]
    layers_queries = cfg.MODEL.MASK_FORMER.DEC_LAYERS * cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES
    pixels = features.shape[-2] * features.shape[-1]
    mask_products = [shape for shape in products.shapes
                     if shape[0] == features.shape[0] and sorted(shape[1:]) == sorted((layers_queries, pixels))]
    assert len(mask_products) == 1, products.shapes
    assert all(p.grad is not None for p in model.sem_seg_head.predictor.mask_embed.parameters())
