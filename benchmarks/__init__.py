"""llmgw benchmarks in asv layout: bench_*.py modules with classes whose time_*/peakmem_* methods asv runs.

Run them with `asv run` (see asv.conf.json) or without asv: `python -m benchmarks [FILTER]` or
`python -m llmgw bench core`. Whole-system suites live in run_<suite>.py modules (`python -m llmgw bench <suite>`).
"""
