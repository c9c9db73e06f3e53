"""Wrong and unusual inputs to the block-sparse executor (review findings): one clear line, or the masked dense
model's result; never a silently wrong one."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from admmcompress.executors.blocksparse import convert_module
from admmcompress.structures import Block


def pruned(layer: nn.Module, r: int = 4) -> nn.Module:
    with torch.no_grad():
        for name, weight in layer.named_parameters():
            if name.startswith("weight"):
                weight.copy_(Block(compression=3, block=(r, 2)).project(weight))
    return layer.eval()


@pytest.fixture(autouse=True)
def _seed():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        yield


def test_the_gather_path_refuses_a_wrong_width_and_dtype():
    """A wider input used to give a result from the wrong columns, a narrower one an IndexError."""
    dense = pruned(nn.Linear(48, 32))
    fast = convert_module(dense, 4)
    for width in (60, 40):
        with pytest.raises(ValueError, match=f"input has {width} features, expected 48"):
            fast(torch.randn(4, width))
    with pytest.raises(TypeError, match="input is torch.float64, its weights are torch.float32"):
        fast(torch.randn(4, 48, dtype=torch.float64))
    conv = convert_module(pruned(nn.Conv2d(8, 20, 3)), 4)
    with pytest.raises(ValueError, match="input has 10 channels, expected in_channels=8"):  # not its 90 im2col columns
        conv(torch.randn(2, 10, 9, 9))


def test_batch_zero_gives_empty_outputs_as_dense():
    linear = pruned(nn.Linear(48, 40))
    assert convert_module(linear, 16)(torch.randn(0, 48)).shape == (0, 40)
    for kind in (nn.GRU, nn.LSTM):
        dense = pruned(kind(12, 24), 8)
        out, _ = convert_module(dense, 8)(torch.randn(5, 0, 12))
        assert out.shape == dense(torch.randn(5, 0, 12))[0].shape == (5, 0, 24)


@pytest.mark.parametrize("impl", ["csr", "bsr"])
def test_csr_and_bsr_weights_are_in_the_state_dict_and_copy(impl):
    """They were plain attributes: a loaded state dict kept the old weights, deepcopy and .to() failed."""
    dense = pruned(nn.Linear(8, 8))
    other = copy.deepcopy(dense)
    with torch.no_grad():
        other.weight.mul_(2.0)  # the same pattern, other values: a checkpoint of this layer to load
    source, target = convert_module(dense, 4, impl=impl), convert_module(other, 4, impl=impl)
    x = torch.randn(3, 8)
    assert not torch.allclose(source(x), target(x))
    target.load_state_dict(source.state_dict())
    torch.testing.assert_close(target(x), source(x))
    for copied in (copy.deepcopy(source), source.to("cpu"), source.float()):
        torch.testing.assert_close(copied(x), source(x))


@pytest.mark.parametrize("kind", [nn.GRU, nn.LSTM])
def test_recurrent_layers_refuse_zero_steps_and_states_of_the_wrong_kind(kind):
    fast = convert_module(pruned(kind(12, 24), 8), 8)
    with pytest.raises(ValueError, match="the sequence has 0 steps"):
        fast(torch.randn(0, 3, 12))
    h = torch.zeros(1, 3, 24)
    wrong = [h, (h,), (h, h, h)] if kind is nn.LSTM else [(h, h), [h]]
    for state in wrong:
        with pytest.raises(ValueError, match="the (LSTM state is a pair|GRU state is one tensor)"):
            fast(torch.randn(5, 3, 12), state)


@pytest.mark.parametrize("kind", [nn.GRUCell, nn.LSTMCell])
def test_cells_refuse_what_the_torch_cells_refuse(kind):
    """A batch-1 state used to broadcast over the batch; a 3-D input to give a tensor."""
    dense = pruned(kind(12, 20))
    fast = convert_module(dense, 4)
    x = torch.randn(3, 12)
    h = torch.randn(1, 20)
    with pytest.raises(ValueError, match=r"state of shape \(1, 20\), expected \(3, 20\)"):
        fast(x, (h, h) if kind is nn.LSTMCell else h)
    with pytest.raises(ValueError, match="input of 3 dimensions"):
        fast(torch.randn(2, 3, 12))
    state = (torch.randn(3, 20), torch.randn(3, 20)) if kind is nn.LSTMCell else torch.randn(3, 20)
    expected, got = dense(x, state), fast(x, state)
    for a, b in zip(expected if kind is nn.LSTMCell else (expected,), got if kind is nn.LSTMCell else (got,),
                    strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_conversion_arguments_are_checked_for_every_layer_type():
    from admmcompress.executors.blocksparse import to_blocksparse

    model = nn.Sequential(pruned(nn.Linear(8, 8)))
    with pytest.raises(ValueError, match="kernel='foo'; choose one of"):
        to_blocksparse(model, 4, kernel="foo")
    with pytest.raises(ValueError, match="kernel='foo'; choose one of"):
        convert_module(model[0], 4, kernel="foo")
    with pytest.raises(ValueError, match="block_rows=True must be a positive integer"):
        convert_module(model[0], True)
    with pytest.raises(ValueError, match=r"layers='0' is one name; give a list, e\.g\. layers=\['0'\]"):
        to_blocksparse(model, 4, layers="0")
    assert to_blocksparse(model, 4, layers=["0"]) == ["0"]


def _model_with_a_pruned_layer() -> nn.Module:
    from admmcompress.finalize import hard_prune
    from admmcompress.plan import Plan

    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    hard_prune(model, Plan({"0": Block(compression=4, block=(16, 1))}).resolve(model))
    return model


def test_converting_a_model_in_train_mode_says_the_layers_cannot_learn():
    """Block-sparse weights are buffers: a model converted in train mode (or put in it later) warns, instead of
    a backward() failing later with 'element 0 of tensors does not require grad' (review finding)."""
    from admmcompress.executors.blockmatrix import TRAIN_MODE_WARNING
    from admmcompress.executors.blocksparse import to_blocksparse

    model = _model_with_a_pruned_layer()
    with pytest.warns(UserWarning, match="block-sparse layers run inference only"):
        to_blocksparse(model, layers=["0"])
    with pytest.warns(UserWarning, match="call model.eval\\(\\) after converting"):
        model.train()
    assert TRAIN_MODE_WARNING.startswith("block-sparse layers run inference only")
    quiet = _model_with_a_pruned_layer().eval()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        to_blocksparse(quiet, layers=["0"])
        quiet.eval()
    assert not quiet[0].training


def test_a_block_rows_name_the_model_does_not_have_is_refused():
    from admmcompress.executors.blocksparse import to_blocksparse

    model = _model_with_a_pruned_layer().eval()
    with pytest.raises(ValueError, match=r"block_rows names \['lx'\], which the model does not have; check the names"):
        to_blocksparse(model, block_rows={"lx": 4})
    assert isinstance(model[0], nn.Linear)  # refused before any layer was replaced
    to_blocksparse(model, block_rows={"0": 16, "2": 8})  # '2' stays dense (not sparse enough): not an error
    assert type(model[0]).__name__ == "BlockSparseLinear" and isinstance(model[2], nn.Linear)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")  # torch's own, dense conv
@pytest.mark.parametrize(("kernel", "dilation"), [(2, 1), (4, 1), ((2, 3), 1), (2, 2), (3, 3), ((4, 1), (1, 2))])
def test_same_padding_of_any_kernel_equals_the_dense_conv(kernel, dilation):
    """padding='same' with an even span d*(k-1) pads one more row/column at the bottom/right, as torch does."""
    from admmcompress.executors.blocksparse_layers import BlockSparseConv2d

    conv = pruned(nn.Conv2d(4, 8, kernel, padding="same", dilation=dilation))
    fast = BlockSparseConv2d.from_dense(conv, 4)
    for x in (torch.randn(2, 4, 9, 8), torch.randn(4, 7, 6)):
        with torch.inference_mode():
            torch.testing.assert_close(fast(x), conv(x), atol=1e-5, rtol=1e-5)


def test_a_conv_input_of_the_wrong_channel_count_names_channels():
    from admmcompress.executors.blocksparse_layers import BlockSparseConv2d

    fast = BlockSparseConv2d.from_dense(pruned(nn.Conv2d(4, 8, 3, padding=1)), 4)
    with pytest.raises(ValueError, match="BlockSparseConv2d: input has 5 channels, expected in_channels=4"):
        fast(torch.randn(1, 5, 8, 8))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # torch 2.13's own
def test_torch_jit_script_is_refused_in_one_line_and_trace_works():
    from admmcompress.executors.blocksparse import to_blocksparse

    model = _model_with_a_pruned_layer().eval()
    to_blocksparse(model, layers=["0"])
    with pytest.raises(TypeError, match=r"^BlockSparseLinear cannot be compiled by torch.jit.script .* use "
                                        r"torch.jit.trace\(model, example\), which records its torch path$"):
        torch.jit.script(model)
    x = torch.randn(3, 64)
    with pytest.warns(torch.jit.TracerWarning):
        traced = torch.jit.trace(model, x)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), atol=1e-6, rtol=1e-6)
