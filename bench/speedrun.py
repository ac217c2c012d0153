"""The speedrun section (GPU only): wall time from start to a validation loss of 1.47 on Tiny
Shakespeare, the speedrun preset's recipe (gpt/model.py's PRESETS["speedrun"]) run by gpt.train
itself, for this project's model and for the same model with nanoGPT's attention (one SDPA call),
compile included. The text comes from --data's usual sources: $GPT_DATA, else the cached
download (a GPU machine without network needs GPT_DATA).

IMPLS is the registry: name -> (build(cfg) -> model as gpt.train.train takes it, or None for
gpt.train's own GPT; flags added to the preset's).
"""
import tempfile

from lecture_flash.gpt.train import parse_args, train

from harness import log, print_never_ran, progress
from gpt_train import _nanogpt_style

IMPLS = {
    "project": (None, []),
    # Compiling is in the clock, and a cold compile of the lecture's model takes tens of
    # seconds: the captured step without torch.compile may reach the target first (CUDA only).
    "project:no-compile": (None, ["--no-compile", "--cuda-graphs"]),
    "sdpa-batched": (_nanogpt_style, []),
}
NEEDS_CUDA = "--cuda-graphs"
GPU_ONLY = "a GPU run: the lecture's model to val loss 1.47 takes minutes even there"


# The run: the preset as it is (tests/test_bench.py swaps in a tiny one to run on a CPU).
ARGV = ["--preset", "speedrun"]
TARGET = 1.47


def run(opts, rows, save):
    device = opts.device
    bar = progress(len(IMPLS), "speedrun")
    for name, (build, flags) in IMPLS.items():
        row = dict(impl=name, target=TARGET)
        rows.append(row)
        if device.type != "cuda" and (ARGV == ["--preset", "speedrun"] or NEEDS_CUDA in flags):
            row["skipped"] = GPU_ONLY if NEEDS_CUDA not in flags else "CUDA graphs need a GPU"
            bar.update(1)
            continue
        report = {}
        with tempfile.TemporaryDirectory() as out:
            args = parse_args([*ARGV, *flags, "--target-loss", str(TARGET), "--out-dir", out,
                               "--no-progress", "--sample-tokens", "0", "--device", str(device)])
            _, losses = train(args, **({} if build is None else {"build_model": build}),
                              report=report)
        if "target_seconds" in report:
            row.update(seconds=report["target_seconds"], steps=report["target_step"],
                       val=report["target_val"])
        else:
            row["skipped"] = f"did not reach {TARGET} (val {losses['val']:.4f} at the last step)"
        log(f"  speedrun {name}: " + (f"{row['seconds']:.1f} s, {row['steps']} steps"
                                      if "seconds" in row else row["skipped"]))
        bar.update(1)
        save()
    bar.close()


def print_table(rows, opts):
    if not rows:
        return
    print(f"\n== speedrun (Tiny Shakespeare to val loss {rows[0]['target']}, the speedrun preset; "
          "wall time from the start, compile included) ==")
    ran = [r for r in rows if "seconds" in r]
    if ran:
        print(f"{'impl':14} {'seconds':>8} {'steps':>6} {'val':>7}")
        for r in ran:
            print(f"{r['impl']:14} {r['seconds']:8.1f} {r['steps']:6d} {r['val']:7.4f}")
    print_never_ran(rows)


def verdict(rows, opts):
    got = {r["impl"]: r["seconds"] for r in rows if "seconds" in r}
    ours = {name: seconds for name, seconds in got.items() if name.startswith("project")}
    if not ours:
        return []
    best = min(ours, key=ours.get)
    line = f"speedrun: {best} reaches val loss {rows[0]['target']} in {ours[best]:.1f} s"
    if "sdpa-batched" in got:
        line += f", {got['sdpa-batched'] / ours[best]:.2f}x faster than nanoGPT-style SDPA"
    return [line]
