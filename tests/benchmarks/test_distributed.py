"""Data-parallel ``vtprune bench``: a 2-process torchrun run (gloo, CPU) gives the 1-process results exactly."""

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch.distributed

from vtprune.benchmarks import cli as bench_cli
from vtprune.benchmarks import synthetic
from vtprune.benchmarks import tiny_llava as TL

REPO = Path(__file__).resolve().parents[2]
TORCHRUN_TIMEOUT_S = 60  # the whole test takes ~15 s on 2 busy cores


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_two_process_torchrun_matches_single_process(tmp_path):
    model, processor = TL.build_untrained_tiny_llava(seed=0)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    mme = synthetic.write_mme(tmp_path / "mme", per_subtask=2, subtasks=("existence", "count"))
    gqa = synthetic.write_gqa(tmp_path / "gqa", n_questions=7)
    # odd batch size and question counts: uneven shards, a short last batch
    args = ["--model", str(tmp_path / "model"), "--data", str(mme), "--data", str(gqa), "--limit", "7",
            "--batch-size", "2", "--methods", "random,fastv", "--keep", "16", "--max-new-tokens", "2",
            "--timing-samples", "1", "--timing-repeats", "1", "--decode-tokens", "1", "--threads", "1",
            "--no-progress"]

    assert bench_cli.main(args + ["--out", str(tmp_path / "one")]) == 0

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "vtprune.benchmarks", *args, "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TORCHRUN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("wrote ") == 1  # only rank 0 prints and writes

    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert (one["meta"]["world_size"], two["meta"]["world_size"]) == (1, 2)
    assert one["tasks"] == two["tasks"]
    assert [r["label"] for r in one["runs"]] == [r["label"] for r in two["runs"]] == \
        ["vanilla", "random@keep16", "fastv@keep16"]
    for a, b in zip(one["runs"], two["runs"]):
        assert a["predictions"] == b["predictions"]
        assert a["scores"] == b["scores"]
        assert (a["kept_tokens"], a["equivalent_tokens"]) == (b["kept_tokens"], b["equivalent_tokens"])
        assert len(a["predictions"]["mme"]) == 8 and len(a["predictions"]["gqa"]) == 7
        assert b["perf"]["prefill_ms"] > 0  # rank 0 ran the timing pass
