"""``--model_args`` of the lmms-eval plugin: split between vtprune and the host class, and checked with no model
(these run in the main environment: vtprune.lmms.args needs no lmms-eval)."""

from __future__ import annotations

import pytest

from vtprune.lmms.args import PluginExit, check_prune_args, split_args


class Host:
    """Stands in for an lmms-eval class: the keywords its __init__ names."""

    def __init__(self, pretrained=None, device="cuda", dtype="auto", device_map="", batch_size=1, **kwargs):
        pass


def test_split_routes_own_keys_fields_and_host_keys():
    own, host = split_args({"pretrained": "D", "device_map": "cpu", "method": "fastv", "ratio": 0.75,
                            "layer": 2, "config": None, "batch_size": 1}, Host)
    assert host == {"pretrained": "D", "device_map": "cpu", "batch_size": 1}
    assert (own.method, own.fields) == ("fastv", {"ratio": 0.75, "layer": 2})


@pytest.mark.parametrize("value", [None, "none", "None", "vanilla"])
def test_no_method_is_unpruned(value):
    kwargs = {"pretrained": "D"} if value is None else {"pretrained": "D", "method": value}
    own, _ = split_args(kwargs, Host)
    assert not own.prunes
    check_prune_args(own)  # nothing to check, no error


@pytest.mark.parametrize("kwargs, words", [
    ({"method": "fastvv", "ratio": 0.5}, ["unknown method", "fastv"]),
    ({"method": "fastv", "ratio": 0.5, "layr": 2}, ["unknown keyword", "layr", "layer"]),
    ({"method": "fastv", "ratio": 1.5}, ["ratio", "[0, 1)"]),
    ({"method": "fastv", "ratio": 0.5, "keep": 32}, ["exactly one budget"]),
    ({"ratio": 0.5}, ["ratio", "without method="]),
    ({"method": "fastv", "config": "no-such-config"}, ["no-such-config"]),
])
def test_bad_args_are_one_line_exit_2(kwargs, words, capsys):
    own, _ = split_args({"pretrained": "D", **kwargs}, Host)
    with pytest.raises(PluginExit) as info:
        check_prune_args(own)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmms-eval --model vtprune: error: ") and "\n" not in err
    for w in words:
        assert w in err, err


def test_plugin_exit_is_not_an_exception():
    """lmms-eval catches every Exception of a run and exits 0: the plugin's errors must escape that."""
    assert not issubclass(PluginExit, Exception) and issubclass(PluginExit, SystemExit)
