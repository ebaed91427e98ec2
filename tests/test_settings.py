import pytest

from ddfast.distill import CMIConfig, DistillConfig, preset
from ddfast.distill.dc import GradientMatchingOptions
from ddfast.settings import from_dict, override, to_dict


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
