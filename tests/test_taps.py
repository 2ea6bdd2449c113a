import pytest
import torch
from torch import nn

from transfuse.taps import FeatureTaps, TapError, module_paths


def _net():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 6), nn.Tanh()), nn.Linear(6, 3))


def test_tap_captures_named_module_outputs():
    net = _net()
    x = torch.randn(5, 4)
    taps = FeatureTaps(net, ["1", "2.1"])
    with taps:
        out = net(x)
    feats = taps.collect()
    assert feats["1"].shape == (5, 8)
    assert torch.equal(feats["1"], torch.relu(net[0](x)))
    assert torch.equal(feats["2.1"], torch.tanh(net[2][0](torch.relu(net[0](x)))))
    assert out.shape == (5, 3)


def test_hooks_removed_on_exit_even_after_error():
    net = _net()
    taps = FeatureTaps(net, ["1"])
    with pytest.raises(RuntimeError):
        with taps:
            assert len(net[1]._forward_hooks) == 1
            raise RuntimeError("boom")
    assert len(net[1]._forward_hooks) == 0
    # No hook fires outside the block.
    taps.features.clear()
    net(torch.randn(2, 4))
    assert taps.features == {}


def test_unknown_path_names_close_matches():
    with pytest.raises(TapError, match=r"no submodule '2\.2'.*2\.1"):
        FeatureTaps(_net(), ["2.2"], role="student")


def test_tap_on_unused_module_fails_clearly():
    class WithSpare(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.unused = _net(), nn.Linear(2, 2)

        def forward(self, x):
            return self.body(x)

    net = WithSpare()
    taps = FeatureTaps(net, ["unused"])
    with taps:
        net(torch.randn(2, 4))
    with pytest.raises(TapError, match="were not called"):
        taps.collect()


def test_taps_do_not_nest_and_paths_listed():
    net = _net()
    taps = FeatureTaps(net, ["0"])
    with taps:
        with pytest.raises(RuntimeError, match="nest"):
            taps.__enter__()
    assert module_paths(net)[:3] == ["0", "1", "2"]


def test_tuple_outputs_use_first_tensor():
    rnn = nn.Sequential()
    rnn.add_module("gru", nn.GRU(3, 5, batch_first=True))
    taps = FeatureTaps(rnn, ["gru"])
    with taps:
        rnn(torch.randn(2, 4, 3))
    assert taps.collect()["gru"].shape == (2, 4, 5)
