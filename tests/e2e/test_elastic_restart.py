"""A rank SIGKILLed under plain `torchrun --max-restarts 2 --rdzv-backend c10d` (torchrun's own
elastic agent, the way a multi-node job restarts): the restarted workers resume from the newest
checkpoint and the run ends with the losses of an uninterrupted run.

Before each attempt's store keys got their own prefix (launch.init_distributed), restarted gloo
workers read the dead attempt's addresses from the agent's store and failed in connectFullMesh.
"""

import sys

import pytest

from tests.e2e.kill_harness import kill_rank_one_after_step_five


@pytest.mark.slow
def test_sigkilled_rank_under_torchrun_elastic_matches_uninterrupted_run(tmp_path):
    def torchrun(restarts):
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node=4",
            f"--max-restarts={restarts}",
            "--rdzv-backend=c10d",
            "--rdzv-endpoint=localhost:0",
            "-m",
            "moefold",
            "train",
            "--config",
            "tiny-moe",
        ]

    got, want, log = kill_rank_one_after_step_five(tmp_path, torchrun)
    assert "connectFullMesh" not in log
    assert got == want
