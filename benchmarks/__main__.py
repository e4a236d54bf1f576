"""Benchmark runner without asv: `python -m benchmarks [FILTER ...]` (also `python -m llmgw bench core`).

Discovers benchmarks/bench_*.py, instantiates every class that has `time_*` methods (expanding asv-style
`params`/`param_names`), calls `setup(*params)` / `teardown(*params)` around it, times each method with timeit
(auto-ranged to about `--min-time` seconds per repeat, best of `--repeat`) and prints one table. A class or method
attribute `ops_per_call` (ignored by asv) adds a per-operation column for methods that loop over a batch.
Afterwards each matching module's `report()` runs; if it returns a str, that is printed.

FILTER is a substring of "bench_module.Class.method" (any filter may match). `peakmem_*`, `mem_*` and `track_*`
benchmarks are asv-only and are listed as skipped.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import itertools
import os
import sys
import time
import timeit
import traceback
from dataclasses import dataclass

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
ASV_ONLY_PREFIXES = ("peakmem_", "mem_", "track_", "timeraw_")


@dataclass
class Row:
    name: str
    params: str
    seconds_per_call: float | None
    ops_per_call: int | None
    note: str = ""


def discover_modules() -> list[str]:
    """Module names (without package) of every benchmarks/bench_*.py, sorted."""
    return sorted(f[:-3] for f in os.listdir(BENCH_DIR) if f.startswith("bench_") and f.endswith(".py"))


def _matches(name: str, filters: list[str]) -> bool:
    return not filters or any(f in name for f in filters)


def _param_combinations(cls) -> list[tuple]:
    params = getattr(cls, "params", None)
    if params is None or params == []:
        return [()]
    # asv: a list of lists is a grid; a flat list is one parameter.
    if isinstance(params, (list, tuple)) and params and all(isinstance(p, (list, tuple)) for p in params):
        return list(itertools.product(*params))
    return [(p,) for p in params]


def _format_params(cls, combo: tuple) -> str:
    if not combo:
        return ""
    names = getattr(cls, "param_names", None) or [f"p{i}" for i in range(len(combo))]
    return ", ".join(f"{n}={v!r}" for n, v in zip(names, combo, strict=True))


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def measure_best(fn, repeat: int, min_time: float, clock=time.process_time) -> float:
    """Best seconds per call of `fn` over `repeat` rounds of about `min_time` seconds each.

    The default clock is this process's CPU time: on a machine shared with other work, wall time also counts the
    moments the scheduler ran someone else, which makes figures swing by 2x between runs.
    """
    timer = timeit.Timer(fn, timer=clock)
    number, elapsed = timer.autorange()  # >= 0.2 s
    number = max(1, int(number * min_time / max(elapsed, 1e-9)))
    return min(timer.repeat(repeat=repeat, number=number)) / number


def run_class(module_name: str, cls, filters: list[str], repeat: int, min_time: float,
              clock=time.process_time) -> list[Row]:
    rows: list[Row] = []
    methods = sorted(n for n in dir(cls) if n.startswith("time_") and callable(getattr(cls, n)))
    skipped = sorted(n for n in dir(cls) if n.startswith(ASV_ONLY_PREFIXES) and callable(getattr(cls, n)))
    for combo in _param_combinations(cls):
        wanted = [m for m in methods if _matches(f"{module_name}.{cls.__name__}.{m}", filters)]
        if not wanted:
            continue
        label = _format_params(cls, combo)
        instance = cls()
        try:
            if hasattr(instance, "setup"):
                instance.setup(*combo)
        except NotImplementedError:
            continue  # asv convention: setup raising NotImplementedError skips this combination
        try:
            for name in wanted:
                method = getattr(instance, name)
                ops = getattr(method, "ops_per_call", None) or getattr(cls, "ops_per_call", None)
                full = f"{module_name}.{cls.__name__}.{name}"
                try:
                    seconds = measure_best(lambda m=method, c=combo: m(*c), repeat, min_time, clock)
                    rows.append(Row(full, label, seconds, ops))
                except Exception as exc:  # noqa: BLE001 - one broken benchmark should not hide the others
                    rows.append(Row(full, label, None, None, f"error: {exc!r}"))
        finally:
            if hasattr(instance, "teardown"):
                instance.teardown(*combo)
    for name in skipped:
        full = f"{module_name}.{cls.__name__}.{name}"
        if _matches(full, filters):
            rows.append(Row(full, "", None, None, "asv only"))
    return rows


def benchmark_classes(module) -> list[type]:
    return [
        obj
        for _, obj in inspect.getmembers(module, inspect.isclass)
        if obj.__module__ == module.__name__
        and any(n.startswith(("time_",) + ASV_ONLY_PREFIXES) for n in dir(obj))
    ]


def print_table(rows: list[Row], out) -> None:
    headers = ("benchmark", "params", "per call", "per op", "note")
    table = [
        (
            r.name,
            r.params,
            format_seconds(r.seconds_per_call),
            format_seconds(r.seconds_per_call / r.ops_per_call) if r.seconds_per_call and r.ops_per_call else "",
            r.note,
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(row[i]) for row in table)) if table else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    print(line.rstrip(), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip(), file=out)


def main(argv: list[str] | None = None, out=None) -> int:
    out = out or sys.stdout
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("filters", nargs="*", help="substring of bench_module.Class.method")
    parser.add_argument("--repeat", type=int, default=5, help="rounds per benchmark; the best is reported")
    parser.add_argument("--min-time", type=float, default=0.2, help="seconds per round (auto-ranged)")
    parser.add_argument("--quick", action="store_true", help="3 short rounds: for smoke runs, not for figures")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="cpu: process CPU time (default; steadier on a shared machine); wall: as asv measures")
    parser.add_argument("--no-report", action="store_true", help="skip the modules' report() tables")
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.min_time <= 0:
        parser.error("--repeat must be >= 1 and --min-time > 0")
    repeat, min_time = (3, 0.02) if args.quick else (args.repeat, args.min_time)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    package_parent = os.path.dirname(BENCH_DIR)
    if package_parent not in sys.path:
        sys.path.insert(0, package_parent)

    rows: list[Row] = []
    reports = []
    failed = False
    started = time.perf_counter()
    for module_name in discover_modules():
        module_selected = _matches(module_name, args.filters)
        try:
            module = importlib.import_module(f"benchmarks.{module_name}")
        except Exception:  # noqa: BLE001 - reported with its traceback; the other modules still run
            if module_selected or not args.filters:
                rows.append(Row(module_name, "", None, None, "import failed (traceback below)"))
                traceback.print_exc(file=sys.stderr)
                failed = True
            continue
        for cls in benchmark_classes(module):
            rows.extend(run_class(module_name, cls, args.filters, repeat, min_time, clock))
        if module_selected and hasattr(module, "report") and not args.no_report:
            reports.append((module_name, module.report))

    if not rows and not reports:
        print(f"no benchmark matches {args.filters!r} in {BENCH_DIR}", file=out)
        return 1
    print(f"best of {repeat} rounds of ~{min_time:g} s each, {args.clock} clock; python {sys.version.split()[0]}",
          file=out)
    print_table(rows, out)
    failed = failed or any(r.note.startswith(("error", "import")) for r in rows)
    for module_name, report in reports:
        print(f"\n== {module_name}.report() ==", file=out)
        try:
            text = report()
        except Exception:  # noqa: BLE001 - reported with its traceback; the other reports still print
            traceback.print_exc(file=sys.stderr)
            failed = True
            continue
        if isinstance(text, str):
            print(text.rstrip(), file=out)
    print(f"\n({time.perf_counter() - started:.1f} s)", file=out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
