"""The benchmarks: python bench/run.py (the report), compile_report.py, host_overhead.py."""
