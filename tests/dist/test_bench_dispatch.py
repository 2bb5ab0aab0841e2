"""`moefold bench dispatch` on a tiny workload: well-formed rows and byte figures (no timing)."""

import json
import math

import pytest

from moefold.bench import dispatch

TINY = [
    "--ep", "2", "--tokens", "64", "--batch", "2", "--hidden", "32", "--active-ffn", "16",
    "--steps", "1", "--warmup", "0",
]  # fmt: skip
REQUIRED = {"name", "dtype", "ep", "tokens_per_s", "tflops"}


def test_expected_saving_matches_hand_worked_counts():
    # top-2 of 8 at ep2 (4 experts per rank): the other rank is missed only when both experts
    # are local, C(4,2)/C(8,2) = 6/28; plain sends K*(n-1)/n = 1 row per token.
    assert dispatch.expected_distinct_remote(8, 2, 2) == pytest.approx(1 - 6 / 28)
    assert dispatch.expected_dedup_saving(8, 2, 2) == pytest.approx(1.0 / (1 - 6 / 28))
    # One expert per rank: nothing to de-duplicate.
    assert dispatch.expected_dedup_saving(8, 2, 8) == pytest.approx(1.0)
    miss = math.comb(48, 8) / math.comb(64, 8)
    assert dispatch.expected_dedup_saving(64, 8, 4) == pytest.approx(8 * 3 / 4 / (3 * (1 - miss)))


@pytest.mark.dist
def test_bench_dispatch_json_rows(capsys):
    assert dispatch.main(TINY + ["--routing", "top8-of-64", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [row["name"] for row in rows] == list(dispatch.DISPATCHERS)
    for row in rows:
        assert REQUIRED <= set(row) and row["name"].startswith("moefold")
        assert row["ep"] == 2 and row["dtype"] == "fp32" and row["tokens_per_s"] > 0
        assert row["bytes_per_token"] >= row["min_bytes_per_token"] > 0
    plain, dedup, _ = rows
    assert plain["saving"] == 1.0 and dedup["saving"] > 2.0  # about 4 at top-8 of 64, ep 2
    # Metadata (8 bytes per slot row, counts) is all that de-duplicated rows add to the minimum.
    assert dedup["bytes_vs_min"] < 1.25 < plain["bytes_vs_min"]


@pytest.mark.dist
def test_bench_dispatch_table(capsys):
    argv = TINY + ["--routing", "top2-of-8", "--dispatcher", "moefold-alltoall-dedup"]
    assert dispatch.main(argv) == 0
    out = capsys.readouterr().out
    assert "# environment: torch " in out and "1 thread per rank" in out
    lines = [line for line in out.splitlines() if line.startswith("| moefold")]
    assert len(lines) == 1 and "top2-of-8" in lines[0]
