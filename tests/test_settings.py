import pytest

from ddfast.distill import CMIConfig, DistillConfig, preset
from ddfast.distill.dc import GradientMatchingOptions
from ddfast.distill.mtt import MTT
from ddfast.distill.settings import SettingError, from_dict, override, override_all, to_dict


def test_round_trip_through_plain_dicts():
    config = preset("dsa", "cifar10", 10, cmi=True)
    plain = to_dict(config)
    assert plain["evaluation"]["lrs"] == [0.01] and plain["options"]["outer_loop"] == 10
    back = from_dict(DistillConfig, plain)
    assert back.cmi == config.cmi and back.evaluation == config.evaluation and back.model == config.model
    assert back.options == to_dict(config.options)  # method options stay a dict until the method reads them


def test_overrides_parse_text_by_field_type():
    config = preset("dc", "mnist", 10, "quick", cmi_weight=3.0)
    config = override(config, "iterations", "7")
    config = override(config, "evaluation.lrs", "0.01, 0.03")
    config = override(config, "evaluation.dsa", "on")
    config = override(config, "train_per_class", "None")
    config = override(config, "cmi.pretrain.model.arch", "resnet18")
    config = override(config, "options.inner_loop", "3")
    assert config.iterations == 7 and config.evaluation.lrs == (0.01, 0.03) and config.evaluation.dsa is True
    assert config.train_per_class is None and config.cmi.pretrain.model.arch == "resnet18"
    assert config.options == GradientMatchingOptions(outer_loop=2, inner_loop=3)


@pytest.mark.parametrize("path, value, message", [
    ("iterationz", "3", "unknown setting 'iterationz'"),
    ("iterations", "many", "iterations: expected int"),
    ("iterations", "0", "iterations must be an integer >= 1, got 0"),
    ("evaluation.dsa", "maybe", "expected true or false"),
    ("cmi.weight", "3", "cmi is None"),
    ("model.arch", "vgg", "arch must be one of"),
])
def test_bad_overrides_name_the_setting(path, value, message):
    with pytest.raises(ValueError, match=message):
        override(preset("dm", "mnist", 10, "quick"), path, value)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown setting"):
        from_dict(CMIConfig, {"weight": 1.0, "lambda": 2})


def test_overrides_are_checked_together_whatever_their_order():
    config = preset("mtt", "mnist", 10, "quick")  # experts of 4 epochs, max_start_epoch 3
    changes = [("options.max_start_epoch", "8"), ("options.experts.epochs", "10")]
    for order in (changes, changes[::-1]):
        changed = override_all(config, order)
        assert changed.options.max_start_epoch == 8 and changed.options.experts.epochs == 10
    invalid = [("options.max_start_epoch", "8"), ("options.experts.epochs", "5")]
    for order in (invalid, invalid[::-1]):
        with pytest.raises(ValueError, match="beyond the experts' 5 epochs"):
            override_all(config, order)
    assert override_all(config, [("iterations", "3"), ("iterations", "5")]).iterations == 5  # the last one wins


@pytest.mark.parametrize("path, value, message", [
    ("image_lr", "nan", "image_lr must be a finite number > 0, got nan"),
    ("image_lr", "inf", "image_lr must be a finite number > 0, got inf"),
    ("image_lr", "-0.1", "image_lr must be a finite number > 0, got -0.1"),
    ("image_momentum", "nan", r"image_momentum must be a finite number in \[0, 1\)"),
    ("ipc", "0", "ipc must be an integer >= 1, got 0"),
    ("iterations", "-3", "iterations must be an integer >= 1, got -3"),
    ("zca", "inf", "zca must be a finite number > 0 or None"),
    ("evaluation.models", "0", "evaluation.models must be an integer >= 1, got 0"),
    ("evaluation.lrs", "0.01,nan", r"evaluation.lrs must be a non-empty list, each a finite number > 0, got \(0.01, nan\)"),
    ("evaluation.weight_decay", "-1", "evaluation.weight_decay must be a finite number >= 0"),
    ("cmi.weight", "nan", "cmi.weight must be a finite number >= 0, got nan"),
    ("cmi.pretrain.lr", "inf", "cmi.pretrain.lr must be a finite number > 0, got inf"),
    ("options.net_lr", "nan", "options.net_lr must be a finite number > 0, got nan"),
])
def test_out_of_range_settings_name_the_key_and_range(path, value, message):
    with pytest.raises(SettingError, match=message):
        override(preset("dc", "mnist", 10, "quick", cmi=True), path, value)


def test_nested_keys_are_named_when_read_from_dicts_and_presets():
    plain = to_dict(preset("mtt", "mnist", 10, "quick"))
    plain["options"]["experts"]["lr"] = float("nan")
    with pytest.raises(SettingError, match="options.experts.lr must be a finite number > 0"):
        MTT.read_options(plain["options"])
    plain = to_dict(preset("dm", "mnist", 10, "quick"))
    plain["evaluation"]["epochs"] = 0
    with pytest.raises(SettingError, match="evaluation.epochs must be an integer >= 1, got 0"):
        from_dict(DistillConfig, plain)
    with pytest.raises(SettingError, match="mim.weight must be a finite number >= 0, got inf"):
        preset("dm", "mnist", 10, "quick", mim_weight=float("inf"))


def test_a_group_is_set_through_its_fields():
    config = preset("dc", "mnist", 10, "quick")
    with pytest.raises(ValueError, match=r"'options' to 'fast': it is a group of settings; set its fields \(options.<name>=...\)"):
        override(config, "options", "fast")
    with pytest.raises(ValueError, match="together with settings inside it"):
        override_all(config, [("evaluation.models", "2"), ("evaluation", "None")])
    assert override(preset("dc", "mnist", 10, "quick", cmi=True), "cmi", "None").cmi is None
