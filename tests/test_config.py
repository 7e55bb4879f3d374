"""The run config: flags declared once on RunConfig, presets, derived values, ranges and the sweep."""
import dataclasses
import json

import pytest
import torch

import pipeline
from config import FLAGS, MAX_PARAMS, PRESETS, RunConfig

EXERCISE2_FLAGS = ["--model_name", "ResNet", "--dataset", "CIFAR10", "--out_channels", "16", "--num_levels", "3",
                   "--num_conv_per_level", "2", "6", "12", "--residual_step", "0", "2", "--seed", "0", "1", "2",
                   "--augment", "--optimizer", "sgd", "--lr", "0.2", "--momentum", "0.9", "--nesterov",
                   "--weight_decay", "5e-4", "--label_smoothing", "0.1", "--lr_schedule", "onecycle",
                   "--batch_size", "128", "--num_epochs", "10"]  # the Makefile's line before --preset existed

EXERCISE1_FLAGS = ["--model_name", "MLP", "--dataset", "MNIST", "--num_hidden_layers", "2", "6", "10", "14", "18",
                   "22", "26", "30", "34", "--width", "16", "--residual_step", "0", "2", "--seed", "0", "1", "2", "3",
                   "4", "--num_epochs", "10"]  # the Makefile's line before --preset exercise1 existed


def configs(*flags: str) -> list[RunConfig]:
    return pipeline.run_configs(pipeline.get_args_parser().parse_args(["--device", "cpu", *flags]),
                                torch.device("cpu"))


def test_exercise2_preset_is_the_long_flag_line():
    assert configs("--preset", "exercise2") == configs(*EXERCISE2_FLAGS)
    assert len(configs("--preset", "exercise2")) == 18


def test_exercise1_preset_is_the_long_flag_line():
    runs = configs("--preset", "exercise1")
    assert runs == configs(*EXERCISE1_FLAGS) and len(runs) == 90
    assert [c.run_name for c in runs[:3]] == ["mlp_mnist_h2_w16_plain_s0", "mlp_mnist_h2_w16_plain_s1",
                                              "mlp_mnist_h2_w16_plain_s2"]
    assert runs[-1].run_name == "mlp_mnist_h34_w16_res2_s4"


@pytest.mark.parametrize("preset,depth,params", [("resnet8", 8, 75290), ("resnet20", 20, 269722),
                                                 ("resnet38", 38, 561370)])
def test_resnet_presets_are_he_et_al_networks(preset, depth, params):
    (config,) = configs("--preset", preset)
    assert (config.depth, config.num_params, config.shortcut, config.out_channels) == (depth, params, "identity", 16)


def test_a_flag_overrides_its_preset_wherever_it_stands():
    before, after = configs("--lr", "0.05", "--preset", "exercise2"), configs("--preset", "exercise2", "--lr", "0.05")
    assert before == after and {c.lr for c in before} == {0.05} and {c.optimizer for c in before} == {"sgd"}
    assert [c.seed for c in configs("--preset", "exercise2", "--seed", "7")][:1] == [7]


def test_every_run_setting_is_a_flag_in_both_spellings():
    parser = pipeline.get_args_parser()
    for name in FLAGS:
        for spelling in (f"--{name}", f"--{name.replace('_', '-')}"):
            assert any(spelling in action.option_strings for action in parser._actions), spelling
    assert set(FLAGS) == {f.name for f in dataclasses.fields(RunConfig)} - {"run_name", "precision"}  # chosen, not set


def test_help_reads_as_sections(pipeline_help):
    text = pipeline_help[1]
    sections = [line.rstrip(":") for line in text.splitlines() if line and not line[0].isspace() and
                line.endswith(":")]
    assert sections == ["options", "model", "data", "optimisation", "run folder", "tracking", "scaling", "cluster"]


def test_derived_values_come_from_the_settings_and_draw_no_random_numbers():
    state = torch.get_rng_state()
    config = RunConfig(model_name="ResNet", dataset="CIFAR10", num_conv_per_level=6, residual_step=2,
                       out_channels=16, num_levels=3, lr_schedule="onecycle", num_epochs=10)
    assert torch.equal(torch.get_rng_state(), state)
    assert (config.depth, config.num_params, config.in_channels, config.input_size) == (20, 269722, 3, 32)
    assert config.shortcut == "identity" and config.warmup_epochs == 3.0 and config.width is None
    assert config.run_name == "resnet_cifar10_d20_c16x3_res2_s0"
    assert RunConfig(model_name="ResNet", dataset="CIFAR10", stem="imagenet", residual_step=2).shortcut == "projection"
    assert RunConfig(model_name="ResNet", dataset="CIFAR10").shortcut is None  # a plain network has none


def test_a_config_json_round_trips_with_its_derived_values():
    config = configs("--num_hidden_layers", "6", "--residual_step", "2")[0]
    written = json.loads(json.dumps(config.to_dict()))
    assert written["depth"] == 8 and written["num_params"] == 784 * 16 + 16 + 6 * (16 * 16 + 16) + 16 * 10 + 10
    assert RunConfig.from_dict(written) == config


@pytest.mark.parametrize("values,message", [
    (dict(dataset="ImageNet"), "--dataset"),
    (dict(lr=float("nan")), "--lr"),
    (dict(lr=float("inf")), "--lr"),
    (dict(weight_decay=float("nan")), "--weight_decay"),
    (dict(momentum=float("inf")), "--momentum"),
    (dict(seed=-1), "--seed"),
    (dict(seed=2 ** 40), "--seed"),
    (dict(num_epochs="3"), "--num_epochs"),
    (dict(run_name="../elsewhere"), "--run_name"),
    (dict(run_name=""), "--run_name"),
    (dict(in_channels=3), "--in_channels"),
    (dict(width=65536, num_hidden_layers=100), f"{MAX_PARAMS:,}"),
    (dict(model_name="ResNet", dataset="CIFAR10", out_channels=4096, num_levels=16), "--out_channels"),
    (dict(model_name="ResNet", dataset="CIFAR10", out_channels=None), "--out_channels"),
])
def test_impossible_settings_are_a_value_error_naming_the_flag(values, message):
    with pytest.raises(ValueError, match=message.replace("*", r"\*")):
        RunConfig(**values)


def test_a_sweep_runs_every_combination_of_its_family_in_field_order():
    names = [c.run_name for c in configs("--num_hidden_layers", "2", "4", "--residual_step", "0", "2", "--seed", "0",
                                         "1")]
    assert names[:3] == ["mlp_mnist_h2_w16_plain_s0", "mlp_mnist_h2_w16_plain_s1", "mlp_mnist_h2_w16_res2_s0"]
    assert len(names) == 8


def test_an_unknown_preset_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        pipeline.get_args_parser().parse_args(["--preset", "resnet99"])
    assert exit_info.value.code == 2 and "--preset" in capsys.readouterr().err


def test_presets_hold_only_run_settings():
    assert all(set(preset) <= set(FLAGS) for preset in PRESETS.values())
