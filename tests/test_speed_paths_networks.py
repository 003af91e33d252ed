"""The segmenter with its fast layers computes the plain segmenter's function: same outputs, same gradients, same
parameters (names, shapes, checkpoints)."""

from __future__ import annotations

import copy

import pytest
import torch

from nnunet_samflare.networks import SAMHybridUNet
from nnunet_samflare.networks.fast_paths import (
    ChannelsLastInstanceNorm3d,
    Float32Conv3d,
    GroupedPointwiseConv3d,
    SlicedDepthwiseConv3d,
    use_channels_last,
    use_channels_last_norms,
    use_fast_paths,
    use_float32_class_heads,
    use_sliced_depthwise,
)
from nnunet_samflare.networks.segmenter import MixFFN, MultiHeadSelfAttention, ScaleAwareModulation


def small_segmenter() -> SAMHybridUNet:
    torch.manual_seed(0)
    # every block type (SAM with 3 kernel sizes, MSA, Mix-FFN) at a test-sized width
    return SAMHybridUNet(
        1, 4, embed_dims=[12, 24, 48, 96], depths=[1, 2, 2, 1], sam_heads=[3, 3, 3, 0], msa_heads=[0, 0, 4, 4]
    )


def assert_same_training_step(plain, other, seed: int, dtype=torch.float32, **grad_tolerance) -> torch.Tensor:
    """One cross-entropy step of both networks (in ``dtype``) on the same random batch of two 32³ patches: the same
    loss, and the same gradient for every parameter. Returns the batch."""
    x = torch.randn(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    target = torch.randint(0, 4, (2, 32, 32, 32), generator=torch.Generator().manual_seed(seed + 1))
    losses = []
    for network in (plain, other):
        network.to(dtype).train()
        loss = torch.nn.functional.cross_entropy(network(x), target)
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0])
    grads = dict(plain.named_parameters())
    for name, parameter in other.named_parameters():
        torch.testing.assert_close(parameter.grad, grads[name].grad, msg=name, **grad_tolerance)
    return x


def test_grouped_pointwise_conv_equals_the_plain_layer_forward_and_backward():
    torch.manual_seed(1)
    plain = torch.nn.Conv3d(12, 24, kernel_size=1, groups=4)
    fast = copy.deepcopy(plain)
    fast.__class__ = GroupedPointwiseConv3d
    x = torch.randn(2, 12, 5, 6, 7, requires_grad=True)
    x_fast = x.detach().clone().requires_grad_()
    out, out_fast = plain(x), fast(x_fast)
    torch.testing.assert_close(out_fast, out)
    grad = torch.randn_like(out)
    out.backward(grad)
    out_fast.backward(grad)
    torch.testing.assert_close(x_fast.grad, x.grad)
    torch.testing.assert_close(fast.weight.grad, plain.weight.grad)
    torch.testing.assert_close(fast.bias.grad, plain.bias.grad)


def test_fast_segmenter_equals_plain_outputs_gradients_and_parameters():
    plain = small_segmenter()
    fast = copy.deepcopy(plain)
    assert use_fast_paths(fast) == 4  # one proj0 per SAM block: 1 + 2 + 1 (stage 3 alternates SAM and MSA)
    plain_state, fast_state = plain.state_dict(), fast.state_dict()
    assert list(fast_state) == list(plain_state)
    assert all(fast_state[k].shape == v.shape for k, v in plain_state.items())

    x = assert_same_training_step(plain, fast, seed=2, rtol=1e-4, atol=1e-6)
    plain.eval(), fast.eval()
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), plain(x), rtol=1e-5, atol=1e-5)
    reloaded = small_segmenter()  # a plain network loads the fast one's checkpoint, and the other way round
    reloaded.load_state_dict(fast.state_dict())
    use_fast_paths(reloaded)
    reloaded.load_state_dict(plain.state_dict())


@pytest.mark.parametrize(
    "channels, multiplier, kernel, padding, bias, batch, channels_last",
    [
        (6, 1, (3, 3, 3), (1, 1, 1), True, 2, False),
        (6, 1, (7, 7, 7), (3, 3, 3), True, 2, True),  # the scale-aware modulation's largest, on a token volume
        (6, 2, (7, 5, 3), (3, 2, 1), False, 1, True),  # channel multiplier, mixed kernel
        (4, 1, (5, 5, 5), (2, 2, 2), True, 1, False),
        (4, 1, (3, 3, 3), (0, 1, 2), True, 2, False),  # "valid" in depth, wider than "same" in width
    ],
)
def test_sliced_depthwise_conv_equals_the_plain_layer_forward_and_backward(
    channels, multiplier, kernel, padding, bias, batch, channels_last
):
    torch.manual_seed(8)
    plain = torch.nn.Conv3d(channels, channels * multiplier, kernel, padding=padding, groups=channels, bias=bias)
    sliced = copy.deepcopy(plain)
    sliced.__class__ = SlicedDepthwiseConv3d
    plain.double(), sliced.double()
    x = torch.randn(batch, channels, 7, 8, 9, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    x.requires_grad_()
    x_sliced = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
    out, out_sliced = plain(x), sliced(x_sliced)
    torch.testing.assert_close(out_sliced, out)
    assert out_sliced.is_contiguous(memory_format=torch.channels_last_3d if channels_last else torch.contiguous_format)
    grad = torch.randn_like(out)
    out.backward(grad)
    out_sliced.backward(grad)
    torch.testing.assert_close(x_sliced.grad, x.grad)
    torch.testing.assert_close(sliced.weight.grad, plain.weight.grad)
    if bias:
        torch.testing.assert_close(sliced.bias.grad, plain.bias.grad)
    plain.float(), sliced.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the dtype autocast gives a convolution, bias included
        assert sliced(x.detach().float()).dtype == plain(x.detach().float()).dtype == torch.bfloat16


def test_sliced_segmenter_equals_plain_outputs_gradients_and_parameters():
    plain = small_segmenter()
    sliced = copy.deepcopy(plain)
    depthwise = sum(
        len(m.mhmc) if isinstance(m, ScaleAwareModulation) else 1
        for m in plain.modules()
        if isinstance(m, (ScaleAwareModulation, MultiHeadSelfAttention, MixFFN))
    )
    assert use_sliced_depthwise(sliced) == depthwise > 0
    assert list(sliced.state_dict()) == list(plain.state_dict())
    # float64: a different summation order, compared without float32 rounding
    x = assert_same_training_step(plain, sliced, seed=9, dtype=torch.float64)
    plain.eval(), sliced.eval()
    with torch.inference_mode():
        torch.testing.assert_close(sliced(x[:1]), plain(x[:1]))  # a batch of one: token volumes, other strides


def test_channels_last_instance_norm_equals_the_plain_layer_and_keeps_the_layout():
    torch.manual_seed(4)
    for affine in (False, True):
        plain = torch.nn.InstanceNorm3d(6, affine=affine)
        if affine:
            torch.nn.init.normal_(plain.weight), torch.nn.init.normal_(plain.bias)
        fast = copy.deepcopy(plain)
        fast.__class__ = ChannelsLastInstanceNorm3d
        x = (3 * torch.randn(2, 6, 5, 6, 7) + 1).to(memory_format=torch.channels_last_3d).requires_grad_()
        x_fast = x.detach().clone(memory_format=torch.channels_last_3d).requires_grad_()
        out, out_fast = plain(x), fast(x_fast)
        torch.testing.assert_close(out_fast, out)
        assert out_fast.is_contiguous(memory_format=torch.channels_last_3d)  # the point of the layer
        assert not out.is_contiguous(memory_format=torch.channels_last_3d)  # what the plain one does
        grad = torch.randn_like(out)
        out.backward(grad)
        out_fast.backward(grad)
        torch.testing.assert_close(x_fast.grad, x.grad)
        if affine:
            torch.testing.assert_close(fast.weight.grad, plain.weight.grad)
            torch.testing.assert_close(fast.bias.grad, plain.bias.grad)
    unbatched = torch.randn(6, 5, 6, 7)  # nn.InstanceNorm3d also takes (C, D, H, W): left to the plain layer
    torch.testing.assert_close(fast(unbatched), plain(unbatched))


def test_segmenter_with_channels_last_norms_equals_plain_outputs_and_gradients():
    plain = small_segmenter()
    fast = copy.deepcopy(plain)
    expected = sum(type(m) is torch.nn.InstanceNorm3d for m in plain.modules())
    assert expected > 0 and use_channels_last_norms(fast) == expected
    assert list(fast.state_dict()) == list(plain.state_dict())
    use_channels_last(fast)  # norms already swapped: it converts the weights and, on the way in, the input
    assert all(p.is_contiguous(memory_format=torch.channels_last_3d) for p in fast.parameters() if p.dim() == 5)

    # Gradients in float64: in float32, oneDNN's channels-last convolution backward alone differs from the
    # contiguous one by up to a few % of a small weight gradient on the CPU, which would hide what the norms do.
    # The batch is contiguous: the hook makes it channels-last.
    x = assert_same_training_step(plain, fast, seed=5, dtype=torch.float64).float()
    plain.float().eval(), fast.float().eval()
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), plain(x), rtol=1e-5, atol=1e-5)


def test_float32_class_heads_keep_the_logits_out_of_bfloat16_autocast():
    plain = small_segmenter().eval()
    network = copy.deepcopy(plain)
    assert use_float32_class_heads(network) == 1 and type(network.decoder.seg_layers[0]) is Float32Conv3d
    assert list(network.state_dict()) == list(plain.state_dict())
    x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        torch.testing.assert_close(network(x), plain(x), rtol=0, atol=0)  # without autocast: the plain layer
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert plain(x).dtype == torch.bfloat16
            logits = network(x)
            head_input = []
            network.decoder.seg_layers[0].register_forward_hook(lambda m, args, out: head_input.append(args[0]))
            network(x)
        assert logits.dtype == torch.float32
        # the head's own arithmetic in float32: the plain float32 head applied to the same (bfloat16) features,
        # which reach it in slabs (UNETRDecoder.full_resolution_logits)
        features = torch.cat(head_input, dim=2).float()
        assert head_input[0].dtype == torch.bfloat16
        torch.testing.assert_close(logits, plain.decoder.seg_layers[0](features), rtol=1e-6, atol=1e-6)
