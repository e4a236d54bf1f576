"""Small terminal helpers for the CLIs: aligned tables, a progress bar, the rolling-update progress view.

Pure functions returning strings (no printing, no terminal queries), so every CLI renders the same way and tests
check the exact text.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

# "Clear screen, cursor home": what `top` does between refreshes. Only written when stdout is a terminal.
CLEAR_SCREEN = "\x1b[H\x1b[2J"


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], *, gap: int = 2) -> str:
    """Rows under upper-cased headers, columns padded to their widest cell; numeric columns right-aligned.

    None renders as "-", booleans as yes/no. A row shorter or longer than the headers is a programming error.
    """
    for i, row in enumerate(rows):
        if len(row) != len(headers):
            raise ValueError(f"row {i} has {len(row)} cells, the table has {len(headers)} columns")
    cells = [[_cell(v) for v in row] for row in rows]
    # A column is numeric when every non-missing value in it is a number (a table of ints with a "-" stays right).
    numeric = [
        any(_is_number(row[c]) for row in rows) and all(_is_number(row[c]) or row[c] is None for row in rows)
        for c in range(len(headers))
    ]
    titles = [h.upper() for h in headers]
    widths = [max([len(titles[c]), *(len(r[c]) for r in cells)]) for c in range(len(headers))]
    sep = " " * gap

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)]
        return sep.join(parts).rstrip()

    return "\n".join([line(titles), *(line(r) for r in cells)])


def progress_bar(done: float, total: float, *, width: int = 30, fill: str = "#", empty: str = "-") -> str:
    """`[#########---------------------]  30%` for done/total; total <= 0 renders as complete (nothing to do).

    Values outside [0, total] are clamped; NaN counts as 0.
    """
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    if total <= 0:
        fraction = 1.0
    else:
        fraction = 0.0 if math.isnan(done) else min(max(done / total, 0.0), 1.0)
    filled = int(fraction * width + 1e-9)  # floor: a bar is only full when the work is
    return f"[{fill * filled}{empty * (width - filled)}] {int(fraction * 100 + 1e-9):3d}%"


# Steps of one replica's update, in the order llmgw.rollout runs them (names as in RolloutStatus dicts).
ROLLOUT_STEPS = ("drain_routing", "drain_rpc", "restart", "rejoin", "undrain")
_FINISHED_STEPS = ("done", "skipped")


def rollout_fraction(status: Mapping) -> tuple[float, int]:
    """(work done in replicas, replica count) of a RolloutStatus dict: finished replicas count 1, the replica in
    progress counts the share of its steps already completed."""
    replicas = status.get("replicas") or []
    done = 0.0
    for rep in replicas:
        step = rep.get("step")
        if step in _FINISHED_STEPS:
            done += 1.0
        elif step in ROLLOUT_STEPS:
            done += ROLLOUT_STEPS.index(step) / len(ROLLOUT_STEPS)
    return done, len(replicas)


def _seconds(start: object, end: object) -> str:
    if isinstance(start, (int, float)) and isinstance(end, (int, float)):
        return f"{end - start:.1f}s"
    return "-"


def render_rollout(status: Mapping, *, width: int = 30, now: float | None = None) -> str:
    """The rolling-update view: a headline with the bar, then one line per replica, then the error if any.

        rolling update to v2: running  [##########--------------------]  33%  1/3 replicas
          replica-1  done           12.0s  incarnation 5 -> 9
          replica-2  restart         2.1s
          replica-3  pending

    `status` is llmgw.rollout.RolloutStatus.to_dict() (also what GET /admin/rollout returns). `now` (same clock
    as the status times) shows the running time of the replica in progress.
    """
    done, total = rollout_fraction(status)
    finished = sum(1 for r in status.get("replicas") or [] if r.get("step") in _FINISHED_STEPS)
    state = status.get("state", "?")
    lines = [(f"rolling update to {status.get('new_version', '?')}: {state}  "
              f"{progress_bar(done, total, width=width)}  {finished}/{total} replicas")]
    id_width = max([len(str(r.get("replica_id", ""))) for r in status.get("replicas") or []] or [0])
    for rep in status.get("replicas") or []:
        step = rep.get("step", "?")
        started, ended = rep.get("started_at"), rep.get("finished_at")
        took = _seconds(started, ended if ended is not None else now)
        parts = [f"  {str(rep.get('replica_id', '?')).ljust(id_width)}  {step:<13}"]
        if started is not None:
            parts.append(f"{took:>7}")
        if step == "done" and rep.get("new_incarnation") is not None:
            parts.append(f"  incarnation {rep.get('old_incarnation')} -> {rep.get('new_incarnation')}")
        if rep.get("error"):
            parts.append(f"  error: {rep['error']}")
        lines.append("".join(parts).rstrip())
    if status.get("error"):
        restored = status.get("restored")
        suffix = "" if restored is None else (" (routing restored)" if restored else " (routing NOT restored)")
        lines.append(f"  {state}: {status['error']}{suffix}")
    return "\n".join(lines)


def rewind(lines: int) -> str:
    """Move the cursor to the start of the `lines`-th line above and clear to the end of the screen: redraws a
    block of that many lines in place (a terminal-only escape; callers check isatty)."""
    return f"\x1b[{lines}F\x1b[J" if lines > 0 else ""
