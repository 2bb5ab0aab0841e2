"""Heartbeats: a stopped or hung rank is reported by rank and step long before the collective
timeout (parallel.timeout_s) ends the run.

Each rank runs a daemon thread that rewrites OUT/.heartbeat/rank_00003 every `interval_s` with
a counter, the rank's current step, its host and pid. The thread beats while the main thread
waits inside a collective (the wait releases the GIL), so a rank blocked on a peer keeps
beating and only the rank that is truly stuck (SIGSTOPped, a deadlocked process, a lost node)
goes silent. The logging rank's watchdog, in its own thread, reads every rank's file and logs
an error naming each rank whose counter has not moved for `stall_s` (by its own clock: no clock
is compared across hosts) and the step it was on. The run folder is shared storage for every
rank already (checkpoints are written into it), so files need no extra channel. A hang of the
logging rank itself is left to the collective timeout.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

HEARTBEAT_DIR = ".heartbeat"


@dataclass
class _Seen:
    count: int
    step: int
    since: float  # local monotonic time the count last changed
    reported: bool = False


def beat_path(folder: Path, rank: int) -> Path:
    return folder / f"rank_{rank:05d}"


def stalled_ranks(
    seen: dict[int, _Seen], beats: dict[int, dict], now: float, stall_s: float
) -> list[tuple[int, dict, float]]:
    """Update `seen` with the latest beats; return (rank, beat, silent seconds) for each rank
    newly silent for at least stall_s. A rank that beats again may be reported again later."""
    newly = []
    for rank, beat in beats.items():
        entry = seen.get(rank)
        if entry is None or beat["count"] != entry.count:
            if entry is not None and entry.reported:
                logger.warning("rank %d is beating again (step %d)", rank, beat["step"])
            seen[rank] = _Seen(beat["count"], beat["step"], now)
            continue
        if not entry.reported and now - entry.since >= stall_s:
            entry.reported = True
            newly.append((rank, beat, now - entry.since))
    return newly


class Heartbeat:
    """One rank's beating thread, plus the watchdog thread on the watching rank."""

    def __init__(
        self,
        folder: Path,
        rank: int,
        world_size: int,
        step: Callable[[], int],
        stall_s: float,
        watch: bool,
    ) -> None:
        self.folder, self.rank, self.world_size = Path(folder), rank, world_size
        self.step, self.stall_s, self.watch = step, stall_s, watch
        self.interval_s = max(min(stall_s / 4, 5.0), 0.01)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._count = 0

    def start(self) -> Heartbeat:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._beat()
        loops = [self._beat_loop] + ([self._watch_loop] if self.watch else [])
        for loop in loops:
            thread = threading.Thread(target=loop, name=f"moefold-{loop.__name__}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()
        self._threads = []

    def _beat(self) -> None:
        self._count += 1
        beat = {
            "count": self._count,
            "step": int(self.step()),
            "host": socket.gethostname(),
            "pid": os.getpid(),
        }
        path = beat_path(self.folder, self.rank)
        tmp = path.with_name(f".tmp-{path.name}")
        try:
            tmp.write_text(json.dumps(beat))
            os.replace(tmp, path)
        except OSError as error:  # a full or vanished disk: the run itself reports that
            logger.debug("heartbeat not written: %s", error)

    def _beat_loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._beat()

    def read_beats(self) -> dict[int, dict]:
        beats = {}
        for rank in range(self.world_size):
            try:
                beats[rank] = json.loads(beat_path(self.folder, rank).read_text())
            except (OSError, ValueError):
                continue  # not started yet, or being replaced
        return beats

    def _watch_loop(self) -> None:
        seen: dict[int, _Seen] = {}
        while not self._stop.wait(self.interval_s):
            for rank, beat, silent in stalled_ranks(
                seen, self.read_beats(), time.monotonic(), self.stall_s
            ):
                logger.error(
                    "rank %d (pid %s on %s) has sent no heartbeat for %.0f s; it was at step "
                    "%d. It may be stopped or hung; the run fails after parallel.timeout_s",
                    rank,
                    beat.get("pid"),
                    beat.get("host"),
                    silent,
                    beat["step"],
                )
