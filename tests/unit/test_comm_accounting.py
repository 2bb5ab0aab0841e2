"""Every collective of a training step is counted in comm_bytes, or parallel/comm.py's module
doc says why it stays outside; and the pipeline's send/recv are counted analytically."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from moefold.parallel import comm
from moefold.train.step_runner import pipeline_p2p_bytes

PACKAGE = Path(__file__).resolve().parents[2] / "moefold"
COLLECTIVE = re.compile(
    r"\b(?:dist|torch\.distributed)\.(all_reduce|all_gather\w*|broadcast\w*|reduce_scatter\w*|all_to_all\w*|send|recv|"
    r"isend|irecv|gather\w*|scatter\w*|batch_isend_irecv|barrier)\("
)


def _files_calling_collectives() -> set[str]:
    found = set()
    for path in PACKAGE.rglob("*.py"):
        if COLLECTIVE.search(path.read_text()):
            found.add(path.relative_to(PACKAGE).as_posix())
    return found - {"parallel/comm.py"}


def test_direct_collectives_are_the_documented_exceptions():
    doc = comm.__doc__.split("Calls that stay outside this module", 1)[1]
    documented = set(re.findall(r"[a-z_]+/[a-z_]+\.py", doc))
    documented_dirs = set(re.findall(r"\b([a-z_]+)/[,\s:]", doc))
    undocumented = {
        f
        for f in _files_calling_collectives()
        if f not in documented and f.split("/")[0] not in documented_dirs
    }
    assert not undocumented, (
        f"{sorted(undocumented)} call torch.distributed directly: route them through "
        "parallel/comm.py (so comm_bytes counts them) or say why in comm.py's module doc"
    )


@pytest.mark.parametrize(
    ("stages", "num_stages", "sends_per_microbatch"),
    [
        ([0], 2, 1),  # first stage: activations downstream only
        ([1], 2, 1),  # last stage: input gradients upstream only
        ([1], 4, 2),  # a middle stage: both
        ([0, 2], 4, 3),  # interleaved (vpp 2, pp 2), rank 0: chunk 0 sends down, chunk 2 both
        ([1, 3], 4, 3),
    ],
)
def test_pipeline_p2p_bytes(stages, num_stages, sends_per_microbatch):
    assert pipeline_p2p_bytes(stages, num_stages, 6, 1000) == sends_per_microbatch * 6 * 1000
