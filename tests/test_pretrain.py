import dataclasses

import pytest
import torch
from loops_support import mnist_root, one_thread, tiny_config, tiny_pretrain  # noqa: F401  (one_thread: autouse)

import ddfast.distill.training.pretrain as pretrain
from ddfast.distill import load_data


def test_pool_is_trained_once_then_loaded(tmp_path, monkeypatch, capsys):
    mnist_root()
    config = tiny_config()
    data = load_data(config)
    key = {"dataset": "mnist", "split": "tiny"}
    pool = pretrain.pretrained_pool(tiny_pretrain(), data, key, cache=tmp_path)
    messages = capsys.readouterr().err.splitlines()
    assert len(pool) == 2 and len(list((tmp_path / "pretrained").glob("mnist-convnet-*.pt"))) == 2
    assert all(not p.requires_grad for net in pool for p in net.parameters()) and not pool[0].training
    assert not torch.equal(pool[0].classifier.weight, pool[1].classifier.weight)
    accuracies = [float(m.split("validation accuracy ")[1].split(",")[0]) for m in messages]
    assert all(a > 0.3 for a in accuracies), messages  # 10 classes: chance is 0.1

    def no_training(*args, **kwargs):
        raise AssertionError("a cached network was trained again")

    monkeypatch.setattr(pretrain, "train_network", no_training)
    again = pretrain.pretrained_pool(tiny_pretrain(), data, key, cache=tmp_path)
    assert capsys.readouterr().err.count("loaded from") == 2
    for a, b in zip(pool, again):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(AssertionError, match="trained again"):  # other settings, other networks
        pretrain.pretrained_pool(dataclasses.replace(tiny_pretrain(), lr=0.02), data, key, cache=tmp_path, quiet=True)
    cached = pretrain.pretrained_pool(tiny_pretrain(), data, key, cache=tmp_path, quiet=True, cached_only=True)
    assert all(torch.equal(a.classifier.weight, b.classifier.weight) for a, b in zip(pool, cached))
    with pytest.raises(FileNotFoundError, match="pre-trained network 1/2 is not in the cache at .*every process must see"):
        pretrain.pretrained_pool(dataclasses.replace(tiny_pretrain(), lr=0.02), data, key, cache=tmp_path, quiet=True, cached_only=True)


def test_pool_size_checked():
    with pytest.raises(ValueError, match="pool"):
        pretrain.PretrainSpec(pool=0)


@pytest.mark.parametrize("spoil", ["random bytes", "truncated", "a tensor", "other settings", "nan weights"])
def test_a_corrupt_cached_network_is_named_and_trained_again(tmp_path, capsys, spoil):
    mnist_root()
    data = load_data(tiny_config())
    spec = dataclasses.replace(tiny_pretrain(), pool=1, epochs=1)
    key = {"dataset": "mnist", "split": "tiny"}
    pretrain.pretrained_pool(spec, data, key, cache=tmp_path, quiet=True)
    [path] = (tmp_path / "pretrained").iterdir()
    good = path.read_bytes()
    if spoil == "random bytes":
        path.write_bytes(bytes(range(256)) * 8)
    elif spoil == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif spoil == "a tensor":
        torch.save(torch.zeros(3), path)
    else:
        state = torch.load(path, weights_only=True)
        if spoil == "other settings":
            state["settings"] = {**state["settings"], "lr": 0.5}
        else:
            state["state_dict"]["classifier.weight"].fill_(float("nan"))
        torch.save(state, path)
    capsys.readouterr()
    [again] = pretrain.pretrained_pool(spec, data, key, cache=tmp_path, quiet=True)
    [warning] = capsys.readouterr().err.splitlines()
    assert warning.startswith(f"ddfast: warning: {path} ") and warning.endswith("training it again")
    [loaded] = pretrain.pretrained_pool(spec, data, key, cache=tmp_path)  # the rebuilt file now loads
    assert "loaded from" in capsys.readouterr().err
    assert all(torch.equal(x, y) for x, y in zip(again.state_dict().values(), loaded.state_dict().values()))
