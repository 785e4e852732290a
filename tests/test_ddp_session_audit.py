"""DDP audit (CPU, gloo, 2 processes) of a whole bank meeting bank_sharding="shard": tests/ddp_audit_run.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("ddp_audit_run.py")


def _run(tmp_path: Path, devices: int, case: str, sharding: str, ckpt: Path) -> list[dict]:
    out = tmp_path / f"{case}-{devices}-{sharding}"
    args = [sys.executable, str(SCRIPT), str(out), str(devices), case, sharding, str(ckpt)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=240)  # a hang fails instead of blocking
    assert proc.returncode == 0, proc.stderr[-3000:]
    if case.startswith("save"):
        return []
    return [torch.load(f"{out}.rank{r}.pt", weights_only=True) for r in range(devices)]


@pytest.mark.parametrize("case", ["ckpt_edit_rank0", "ckpt_stale_rank0"])
def test_ddp_sharded_test_of_a_checkpoint_whose_threshold_one_rank_read_first(tmp_path, case):
    """A 1-process checkpoint whose leave-one-out scores are stale (its bank edited in place after loading, or saved
    without them), its threshold read on rank 0 alone before a 2-process test with bank_sharding="shard": rank 0
    recomputed them alone (on its whole bank), rank 1 at the test's first need, in the sharded search's collectives,
    which rank 0 had entered for a test batch: a gloo collective mismatch ("Received data size doesn't match") and
    both ranks aborted. Every rank now keeps the scores only where all do."""
    ckpt = tmp_path / "whole.ckpt"
    _run(tmp_path, 1, "save_stale" if case == "ckpt_stale_rank0" else "save", "replicate", ckpt)
    single = _run(tmp_path, 1, case, "replicate", ckpt)[0]
    ranks = _run(tmp_path, 2, case, "shard", ckpt)
    for ddp in ranks:
        torch.testing.assert_close(ddp["threshold"], single["threshold"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ddp["loo_scores"], single["loo_scores"], rtol=1e-5, atol=1e-6)
        assert torch.equal(ddp["indices"], torch.arange(67))
        torch.testing.assert_close(ddp["scores"], single["scores"], rtol=1e-5, atol=1e-6)
