"""Write kernels/flash_tuned.py from GPU reports: the configs autotuning chose, per arch.

    python bench/run.py --autotune ...                     # on a GPU: reports with "autotune"
    python bench/tuned_configs.py bench/results/*.json     # then, anywhere: the table

Each report's "autotune" section lists, per specialisation the run met, the config chosen
after timing every candidate, and the GPU's arch. A specialisation without dropout, split keys
or the atomic dQ path stands for its (arch, kernel, dtype, head dim, length buckets); where
reports disagree, the newest wins. Rows without an arch (reports older than this script, or
CPU runs) are left out. The table replaces the file whole; kernels/flash_configs.py tries an
entry's config first on its arch.
"""
import argparse
import json
import re
import sys
from pathlib import Path

TABLE = Path(__file__).resolve().parents[1] / "kernels" / "flash_tuned.py"
CHOSEN = re.compile(r"(\d+)x(\d+), (\d+) warps, (\d+) stages")


def entries(reports):
    """{(arch, kernel, dtype, head dim, tq bucket, tk bucket): (BLOCK_M, BLOCK_N, warps,
    stages)} from report dicts, oldest first (later ones overwrite)."""
    table = {}
    for report in sorted(reports, key=lambda r: r.get("date", "")):
        for row in report.get("autotune", []):
            m = CHOSEN.fullmatch(row.get("chosen", ""))
            if (m is None or not row.get("arch") or row.get("DROPOUT") or row.get("SPLIT")
                    or row.get("DETERMINISTIC") is False or not row.get("timed_ms")):
                continue  # untuned choices say nothing about speed
            key = (row["arch"], row["kernel"], row["dtype"], row["HEAD_DIM"], row["TQ_BUCKET"],
                   row["TK_BUCKET"])
            table[key] = tuple(int(x) for x in m.groups())
    return table


DOC = '''"""The configs GPU reports measured fastest, per specialisation, for the GPUs that ran them.

    (arch, kernel, dtype, padded head dim, query bucket, key bucket) -> (BLOCK_M, BLOCK_N, warps, stages)

arch is a devices.Target label ("sm_90", "gfx942"). flash_configs.candidates() tries an entry's
config first on that arch; every other specialisation, and every other GPU, takes the first
config that fits. Written by bench/tuned_configs.py from the "autotune" section of reports that
`bench/run.py --autotune` wrote on a GPU (bench/results/), never by hand.
"""'''


def render(table, sources):
    """flash_tuned.py's text for `table`, naming the reports it came from."""
    lines = [DOC, f"# From: {', '.join(sources) or 'no report yet (no GPU run with --autotune)'}",
             "TUNED = {"]
    lines += [f"    {key!r}: {value!r}," for key, value in sorted(table.items())]
    return "\n".join(lines) + "\n}\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("reports", nargs="+", help="report JSON files bench/run.py wrote on a GPU")
    p.add_argument("--out", default=str(TABLE), help="the table to write (default %(default)s)")
    args = p.parse_args(argv)
    reports = [json.loads(Path(path).read_text()) for path in args.reports]
    table = entries(reports)
    Path(args.out).write_text(render(table, [Path(path).name for path in args.reports]))
    print(f"{len(table)} tuned configs from {len(reports)} reports written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
