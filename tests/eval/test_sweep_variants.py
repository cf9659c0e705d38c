"""A method's ``sweep_variants`` are separate points of a bench / perf sweep (ZipVL: its three KV modes), unless
the user fixes one of their fields with --set."""

from vtprune.eval.sweep import build_configs


def test_zipvl_is_swept_in_each_kv_mode():
    labels = [c.label for c in build_configs(["zipvl", "fastv"], keeps=[16])]
    assert labels == ["vanilla", "zipvl@schedule,kv_mode=none", "zipvl@schedule,kv_mode=evict",
                      "zipvl@schedule,kv_mode=mixed", "fastv@keep16"]


def test_a_set_kv_mode_is_one_point():
    configs = build_configs(["zipvl"], hyper={"zipvl": {"kv_mode": "evict", "tau": 0.96}})
    assert [c.prune_kwargs() for c in configs[1:]] == [{"kv_mode": "evict", "seed": 0, "tau": 0.96}]
