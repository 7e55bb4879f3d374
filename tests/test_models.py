"""Model shapes, depth counts, and that residual shortcuts are really added."""
import itertools

import pytest
import torch

from conftest import run_config
from config import RunConfig
from models import MLP, ResNet, block_sizes, build_model
from runs import load_model, save_checkpoint
from utils import UsageError


@pytest.mark.parametrize("hidden,step,width", [(0, 0, 8), (1, 0, 16), (4, 2, 16), (6, 3, 5), (34, 2, 16)])
def test_mlp_shapes_and_depth(hidden, step, width):
    model = MLP(28 * 28, width, hidden, 10, step)
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert model.depth == hidden + 2
    assert sum(isinstance(m, torch.nn.Linear) for m in model.modules()) == hidden + 2


def test_mlp_rejects_step_that_does_not_divide():
    with pytest.raises(ValueError, match="multiple"):
        MLP(784, 16, 5, 10, residual_step=2)


@pytest.mark.parametrize("levels,convs,step,stem,size", [
    (1, 1, 0, "cifar", 32), (3, 1, 2, "cifar", 32), (3, 3, 2, "cifar", 32), (2, 5, 2, "cifar", 28),
    (3, 6, 2, "cifar", 32), (4, 4, 0, "imagenet", 64), (2, 2, 1, "imagenet", 32), (2, 4, 4, "cifar", 17)])
def test_resnet_shapes_and_depth(levels, convs, step, stem, size):
    model = ResNet(3, 10, out_channels=4, num_levels=levels, num_conv_per_level=convs, residual_step=step, stem=stem)
    x = torch.randn(2, 3, size, size)
    features = model.forward_features(x)
    assert features.shape[:2] == (2, 4 * 2 ** (levels - 1))
    assert torch.equal(model.forward_head(features), model(x))
    assert model(x).shape == (2, 10)
    convs_3x3 = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
    assert model.depth == len(convs_3x3) + 1 == 2 + levels * convs


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_resnet20_has_three_blocks_per_level_and_he_et_al_s_parameter_count():
    model = ResNet(3, 10, out_channels=16, num_levels=3, num_conv_per_level=6, residual_step=2)
    assert model.depth == 20
    assert [len(level) for level in model.levels] == [3, 3, 3]
    assert not [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1)]
    assert 0.26e6 < num_params(model) < 0.28e6  # He et al.: 0.27M
    projection = ResNet(3, 10, out_channels=16, num_levels=3, num_conv_per_level=6, residual_step=2,
                        shortcut="projection")
    assert len([m for m in projection.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1)]) == 2
    assert num_params(projection) - num_params(model) == 16 * 32 + 2 * 32 + 32 * 64 + 2 * 64  # 1x1 convs and BNs


@pytest.mark.parametrize("convs,step", [(2, 2), (6, 2), (12, 2), (6, 3), (4, 1)])
def test_identity_shortcuts_add_no_parameter_to_the_plain_twin(convs, step):
    plain = ResNet(3, 10, out_channels=16, num_levels=3, num_conv_per_level=convs, residual_step=0)
    residual = ResNet(3, 10, out_channels=16, num_levels=3, num_conv_per_level=convs, residual_step=step)
    assert num_params(residual) == num_params(plain)
    assert [p.shape for p in residual.parameters()] == [p.shape for p in plain.parameters()]


def test_identity_shortcut_where_shape_changes_is_the_subsampled_zero_padded_input():
    """He et al.'s option A: every second pixel of every second row, the new channels zero."""
    model = ResNet(3, 10, out_channels=4, num_levels=2, num_conv_per_level=2, residual_step=2).eval()
    block = model.levels[1][0]
    x = torch.randn(2, 4, 7, 9)
    shortcut = block.shortcut(x)
    assert shortcut.shape == (2, 8, 4, 5)
    for n, c, i, j in itertools.product(range(2), range(4), range(4), range(5)):
        assert shortcut[n, c, i, j] == x[n, c, 2 * i, 2 * j]
    assert torch.count_nonzero(shortcut[:, 4:]) == 0
    for conv_bn in block.convs:
        torch.nn.init.zeros_(conv_bn[1].weight)
    assert torch.equal(block(x), torch.relu(shortcut))


def test_unknown_shortcut_is_refused():
    with pytest.raises(ValueError, match="unknown shortcut"):
        ResNet(3, 10, out_channels=4, num_levels=2, num_conv_per_level=2, residual_step=2, shortcut="option C")


def test_block_sizes_keep_the_remainder():
    assert block_sizes(5, 2) == [2, 2, 1]
    assert block_sizes(3, 0) == [1, 1, 1]
    assert block_sizes(1, 2) == [1]


def test_cnn_shortcut_is_added():
    """With a residual block's convolutions zeroed, the block passes its input through (then ReLU)."""
    torch.manual_seed(0)
    model = ResNet(3, 10, out_channels=4, num_levels=1, num_conv_per_level=2, residual_step=2).eval()
    block = model.levels[0][0]
    for conv_bn in block.convs:
        torch.nn.init.zeros_(conv_bn[1].weight)  # BN gamma 0: the conv path outputs its BN bias, here 0
    x = torch.randn(2, 4, 8, 8)
    assert torch.equal(block(x), torch.relu(x))
    plain = ResNet(3, 10, out_channels=4, num_levels=1, num_conv_per_level=2, residual_step=0).eval()
    for block in plain.levels[0]:
        torch.nn.init.zeros_(block.convs[0][1].weight)
    assert torch.count_nonzero(plain.levels[0](x)) == 0


def test_cnn_projection_shortcut_where_shape_changes():
    model = ResNet(3, 10, out_channels=4, num_levels=2, num_conv_per_level=2, residual_step=2,
                   shortcut="projection").eval()
    block = model.levels[1][0]
    assert isinstance(block.shortcut[0], torch.nn.Conv2d) and block.shortcut[0].stride == (2, 2)
    x = torch.randn(2, 4, 8, 8)
    for conv_bn in block.convs:
        torch.nn.init.zeros_(conv_bn[1].weight)
    assert torch.allclose(block(x), torch.relu(block.shortcut(x)))


def test_mlp_shortcut_is_added():
    model = MLP(784, 8, 4, 10, residual_step=2)
    block = model.hidden[0]
    for layer in block.layers:
        if isinstance(layer, torch.nn.Linear):
            torch.nn.init.zeros_(layer.weight)
            torch.nn.init.zeros_(layer.bias)
    x = torch.randn(3, 8)
    assert torch.equal(block(x), x)
    assert not torch.equal(MLP(784, 8, 4, 10, residual_step=0).hidden[0](x), x)


def test_build_model_from_config():
    mlp = build_model(run_config("--num_hidden_layers", "2", "--width", "8", "--residual_step", "2"))
    assert isinstance(mlp, MLP) and mlp.depth == 4 and mlp.hidden[0].shortcut
    assert mlp.input[1].in_features == 784 and mlp.input[1].out_features == 8
    cnn = build_model(run_config("--model_name", "ResNet", "--dataset", "CIFAR10", "--out_channels", "4",
                                 "--num_levels", "2", "--num_conv_per_level", "3", "--residual_step", "2"))
    assert isinstance(cnn, ResNet) and cnn.depth == 8 and cnn.fc.in_features == 8


def test_shortcut_flag_defaults_by_stem_and_names_projection_runs():
    cnn = ("--model_name", "ResNet", "--dataset", "CIFAR10", "--out_channels", "4", "--num_levels", "2",
           "--num_conv_per_level", "2", "--residual_step", "2")
    assert run_config(*cnn).shortcut == "identity"
    assert run_config(*cnn, "--stem", "imagenet").shortcut == "projection"
    projection = run_config(*cnn, "--shortcut", "projection")
    assert projection.shortcut == "projection" and projection.run_name.endswith("_res2proj_s0")
    assert run_config(*cnn[:-1], "0").shortcut is None  # plain: no shortcut at all, so none to choose
    with pytest.raises(UsageError, match="--shortcut is the kind of residual shortcut and every run is plain"):
        run_config(*cnn[:-1], "0", "--shortcut", "projection")
    assert run_config("--residual_step", "2").shortcut is None


def test_a_checkpoint_from_before_the_shortcut_flag_loads_as_projection(tmp_path):
    cnn = ("--model_name", "ResNet", "--dataset", "CIFAR10", "--out_channels", "4", "--num_levels", "2",
           "--num_conv_per_level", "2")
    old = run_config(*cnn, "--residual_step", "2", "--shortcut", "projection").to_dict()
    del old["shortcut"]
    weights = build_model(RunConfig.from_dict(dict(old, shortcut="projection"))).state_dict()
    save_checkpoint(tmp_path / "old.pt", {"config": old, "model": weights})
    config, model = load_model(tmp_path / "old.pt")
    assert config.shortcut == "projection" and isinstance(model.levels[1][0].shortcut[0], torch.nn.Conv2d)
    old_plain = run_config(*cnn, "--residual_step", "0").to_dict()
    del old_plain["shortcut"]
    assert RunConfig.from_dict(old_plain).shortcut is None
