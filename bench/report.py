"""The README's and docs' results tables, rendered from the newest committed reports.

    python bench/report.py            # print the tables
    python bench/report.py --write    # rewrite the blocks in README.md and docs/benchmarks.md
    python bench/report.py --check    # exit 1 if either file's block differs from the render

Every figure in those tables comes from a report under bench/results/ (written by bench/run.py
or bench/evidence.py on real hardware, never edited by hand): each table takes the newest
report that measured its section, and says which (device, versions, date, commit, command).
A cell that no report measured says "not measured". tests/test_bench.py checks that the files
hold exactly what this renders.
"""
import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
TARGETS = {"readme": ROOT / "README.md", "docs": ROOT / "docs" / "benchmarks.md"}
BEGIN, END = "<!-- bench/report.py: {} begins; edit the reports, not this -->", "<!-- bench/report.py: ends -->"
NOT_MEASURED = "not measured"

LECTURE = (64, 6, 256, 64)  # B, H, T, D: the lecture's attention
TRAIN_COLUMNS = [("lecture", "lecture"), ("nanoGPT-style SDPA", "sdpa-batched"),
                 ("nanoGPT-style, compiled", "sdpa-compiled"), ("ours", "project"),
                 ("ours, compiled", "project-compiled"), ("ours, captured", "project-graphed")]
ATTENTION_COLUMNS = [("ours (triton)", "triton"), ("auto", "project-auto"),
                     ("SDPA flash", "sdpa-flash"), ("SDPA cuDNN", "sdpa-cudnn"),
                     ("FlexAttention", "flex")]


def load(folder=RESULTS):
    """Every report in folder, newest first (by the date it records, then by file name)."""
    reports = []
    for path in sorted(folder.glob("*.json")):
        report = json.loads(path.read_text())
        report["_file"] = f"bench/results/{path.name}"
        reports.append(report)
    return sorted(reports, key=lambda r: (r.get("date") or "", r["_file"]), reverse=True)


def newest(reports, has):
    """The newest report for which has(report) is true, or None."""
    return next((r for r in reports if has(r)), None)


def command(report):
    """The command that wrote the report, as it records it (or as run.py's settings say)."""
    settings = report.get("settings", {})
    if settings.get("command"):
        return settings["command"]
    words = ["python bench/run.py"]
    words += [f"--only {s}" for s in settings.get("sections", [])
              if len(settings.get("sections", [])) < 5]
    if settings.get("dtypes") and settings["dtypes"] != ["bfloat16", "float16"]:
        words += [f"--dtype {d}" for d in settings["dtypes"]]
    return " ".join(words)


def caption(report):
    if report is None:
        return "No report has measured this yet."
    v = report.get("versions", {})
    commit = report.get("commit") or "not recorded"
    return (f"{report['device']}, torch {v.get('torch')}, triton {v.get('triton')}, "
            f"{report['date'][:10]}, commit {commit}: `{report['_file']}` (`{command(report)}`"
            f"{'' if report.get('complete', True) else ', cut short'})")


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _cell(value, fmt):
    return NOT_MEASURED if value is None else format(value, fmt)


def _attention_ms(report, impl, point, p):
    B, H, T, D = point
    for r in (report or {}).get("attention", []):
        if (r["impl"], r["pass"], r["dtype"], r["B"], r["H"], r["T"], r["D"]) == (
                impl, p, "bfloat16", B, H, T, D) and "ms" in r and not r.get("Hk"):
            return r["ms"]
    return None


def training(reports):
    """Tokens/s of the lecture GPT's training step (bf16 autocast) and of generation."""
    report = newest(reports, lambda r: any(row.get("dtype") == "bfloat16" and "tokens_per_s" in row
                                           for row in r.get("gpt_train", [])))
    rows_by = {(r["impl"], r.get("dtype")): r for r in (report or {}).get("gpt_train", [])}
    train = ["training step, bf16 autocast"] + [
        _cell(rows_by.get((impl, "bfloat16"), {}).get("tokens_per_s"), ",.0f")
        for _, impl in TRAIN_COLUMNS]
    gen_by = {r["impl"]: r for r in (report or {}).get("generate", [])}
    # (nanoGPT-style rows have no generation of their own; the captured step is training's)
    gen = ["generate, batch 1"] + [_cell(gen_by.get(impl, {}).get("tokens_per_s"), ",.0f")
                                   if impl in ("lecture", "project", "project-compiled") else "n/a"
                                   for _, impl in TRAIN_COLUMNS]
    return caption(report), _table(["lecture GPT, tokens/s"] + [c for c, _ in TRAIN_COLUMNS],
                                   [train, gen])


def attention(reports, full=False):
    """bf16 causal attention, ms: the lecture's shape and 16k tokens at D 128 (full: every
    T and D of the grid)."""
    report = newest(reports, lambda r: any(row.get("dtype") == "bfloat16" and "ms" in row
                                           for row in r.get("attention", [])))
    points = [("lecture's (64, 6, 256, 64)", LECTURE, "fwd+bwd")]
    Ts, Ds = ((1024, 4096, 16384), (64, 128)) if full else ((16384,), (128,))
    for p in ("fwd", "fwd+bwd"):
        for D in Ds:
            for T in Ts:
                H = 2048 // D
                points.append((f"D {D}, T {T // 1024}k, {H} heads", (16384 // T, H, T, D), p))
    rows = [[f"{label}, {p}"] + [_cell(_attention_ms(report, impl, point, p), ".3f")
                                 for _, impl in ATTENTION_COLUMNS]
            for label, point, p in points]
    return caption(report), _table(["bf16 causal attention, ms"] + [c for c, _ in ATTENTION_COLUMNS],
                                   rows)


def features(reports):
    """The newest features at one shape each, ours against the best alternative (ms, fwd+bwd;
    decode: one step): what bench/evidence.py's step 6 measures."""
    report = newest(reports, lambda r: r.get("decode") or any(
        "ms" in row for row in r.get("varlen", []) + r.get("flash_api", [])))
    r = report or {}

    def best(section, ours, others, fields):
        timed = [row for row in r.get(section, []) if row.get("pass") == "fwd+bwd" and "ms" in row
                 and row.get("dtype") == "bfloat16"]
        mine = next((row for row in timed if row["impl"] == ours), None)
        theirs = [row for row in timed if row["impl"] in others]
        alt = min(theirs, key=lambda row: row["ms"]) if theirs else None
        shape = ", ".join(f"{k} {mine[k]}" for k in fields if k in mine) if mine else ""
        return (shape, mine and mine["ms"], alt and alt["ms"], alt and alt["impl"])

    gqa_rows = [row for row in r.get("attention", []) if row.get("Hk")]
    gqa = best("attention", "triton", ("sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "flex"),
               ("B", "H", "Hk", "T", "D")) if gqa_rows else ("", None, None, None)
    rows = [("grouped heads, fwd+bwd",) + gqa,
            ("packed documents (varlen), fwd+bwd",) + best(
                "varlen", "triton", ("sdpa-padded", "sdpa-masked", "flex-document"), ("tokens", "docs")),
            ("sliding window, flash_attn_func, fwd+bwd",) + best(
                "flash_api", "triton-flash-api", ("sdpa-window-mask",), ("T", "window"))]
    # the batch of unequal lengths: the rows serving traffic makes (a mask is needed)
    decode = {row["impl"]: row for row in r.get("decode", [])
              if "ms" in row and row.get("lengths") == "unequal"}
    d = decode.get("project", {})
    rows.append(("decode step, one query a row", f"B {d['B']}, S {d['S']}" if d else "",
                 d.get("ms"), decode.get("sdpa-masked", {}).get("ms"),
                 "sdpa-masked" if decode.get("sdpa-masked") else None))
    table = [[what, shape or "", _cell(ours, ".3f"), _cell(alt, ".3f"), name or "",
              _cell(alt / ours if ours and alt else None, ".2f")]
             for what, shape, ours, alt, name in rows]
    return caption(report), _table(["feature, ms", "shape", "ours", "best alternative", "which",
                                    "ours vs it"], table)


def render(which, reports):
    """The block for README.md ("readme") or docs/benchmarks.md ("docs")."""
    parts = []
    for title, (cap, table) in (("The lecture's GPT", training(reports)),
                                ("Attention", attention(reports, full=which == "docs")),
                                ("The newest features", features(reports))):
        parts.append(f"{title}. {cap}\n\n{table}")
    return "\n\n".join(parts)


def blocks(text, which):
    """(before, block, after) of a file's text around its rendered block."""
    begin = BEGIN.format(which)
    if begin not in text or END not in text:
        raise ValueError(f"no block markers for {which!r}: {begin} ... {END}")
    head, rest = text.split(begin, 1)
    block, tail = rest.split(END, 1)
    return head + begin, block.strip("\n"), END + tail


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write", action="store_true", help="rewrite the blocks in the files")
    p.add_argument("--check", action="store_true", help="exit 1 if a file's block differs")
    args = p.parse_args(argv)
    reports = load()
    stale = []
    for which, path in TARGETS.items():
        want = render(which, reports)
        head, have, tail = blocks(path.read_text(), which)
        if args.write and have != want:
            path.write_text(f"{head}\n{want}\n{tail}")
            print(f"rewrote the block in {path.relative_to(ROOT)}")
        elif args.check and have != want:
            stale.append(str(path.relative_to(ROOT)))
        elif not (args.write or args.check):
            print(f"== {path.relative_to(ROOT)}\n{want}\n")
    if stale:
        sys.exit(f"out of date (run python bench/report.py --write): {', '.join(stale)}")


if __name__ == "__main__":
    main()
