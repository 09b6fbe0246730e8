"""One progress display over the whole demo run: stage, step, loss, elapsed and remaining time.

The run is planned as a list of jobs, each with an expected cost in *reference seconds* (measured on the
2-core reference machine). Progress is counted in those units, so the remaining time is
``remaining units * (seconds spent / units done)``: it adapts to a faster or slower machine after the first job.
The display is a tqdm bar (hidden with ``UMARVEL_NO_PROGRESS=1``) plus an INFO log line at every job start and
end and at most every ``log_every`` seconds inside a job, so that logs and CI show the same information.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

logger = logging.getLogger(__name__)


def format_seconds(seconds: float) -> str:
    """``m:ss`` (or ``h:mm:ss``) of a duration."""
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


@dataclass
class Job:
    """A planned piece of work: key, label shown to the user, expected cost in reference seconds."""

    key: str
    label: str
    cost: float


class Progress:
    """Track a planned sequence of jobs.

    Args:
        jobs: the plan, in run order (the total defines 100%).
        log_every: seconds between in-job log lines.
        disable: hide the tqdm bar (log lines stay).
    """

    def __init__(self, jobs: list[Job], log_every: float = 15.0, disable: bool = False):
        from tqdm.auto import tqdm

        self.jobs = {j.key: j for j in jobs}
        self.order = [j.key for j in jobs]
        self.total = float(sum(j.cost for j in jobs))
        self.done = 0.0            # units of finished jobs
        self.current: Job | None = None
        self.fraction = 0.0        # of the current job
        self.start = time.perf_counter()
        self.log_every = log_every
        self._last_log = 0.0
        self.detail = ""
        self.bar = tqdm(total=round(self.total, 1), unit="ref-s", desc="demo", disable=disable,
                        bar_format="{desc}: {percentage:3.0f}%|{bar:20}| {elapsed}<{remaining} {postfix}")

    # ------------------------------------------------------------------------------ time accounting
    def elapsed(self) -> float:
        """Seconds since the start of the run."""
        return time.perf_counter() - self.start

    def units_done(self) -> float:
        """Reference seconds of work done (finished jobs + the done part of the current one)."""
        cur = self.current.cost * self.fraction if self.current else 0.0
        return self.done + cur

    def remaining(self) -> float | None:
        """Estimated seconds left (None before any work is done)."""
        done = self.units_done()
        if done <= 0:
            return None
        return (self.total - done) * self.elapsed() / done

    def status(self) -> str:
        """``elapsed m:ss, remaining ~m:ss``."""
        rem = self.remaining()
        return f"elapsed {format_seconds(self.elapsed())}, remaining ~{format_seconds(rem) if rem is not None else '?'}"

    # ------------------------------------------------------------------------------ updates
    def begin(self, key: str) -> None:
        """Start job ``key`` (a job not in the plan is an error of the caller)."""
        self.current = self.jobs[key]
        self.fraction = 0.0
        self.detail = ""
        index = self.order.index(key) + 1
        logger.info("[%d/%d] %s (%s)", index, len(self.order), self.current.label, self.status())
        self._refresh()

    def update(self, fraction: float, detail: str = "") -> None:
        """Report the current job ``fraction`` (0..1) done, with a short ``detail`` (e.g. step and loss)."""
        self.fraction = min(max(fraction, 0.0), 1.0)
        self.detail = detail
        self._refresh()
        now = time.perf_counter()
        if now - self._last_log >= self.log_every:
            self._last_log = now
            logger.info("  %s: %s (%s)", self.current.label if self.current else "", detail, self.status())

    def end(self, summary: str = "") -> None:
        """Finish the current job."""
        if self.current is None:
            return
        self.done += self.current.cost
        label = self.current.label
        self.current, self.fraction, self.detail = None, 0.0, ""
        self._refresh()
        logger.info("  done: %s%s (%s)", label, f": {summary}" if summary else "", self.status())

    def close(self) -> None:
        """Close the bar."""
        self.bar.close()

    def _refresh(self) -> None:
        self.bar.n = round(min(self.units_done(), self.total), 1)
        label = self.current.label if self.current else ""
        self.bar.set_postfix_str(f"{label} {self.detail}".strip(), refresh=False)
        self.bar.refresh()


__all__ = ["Job", "Progress", "format_seconds"]
