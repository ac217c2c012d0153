"""The configs GPU reports measured fastest, per specialisation, for the GPUs that ran them.

    (arch, kernel, dtype, padded head dim, query bucket, key bucket) -> (BLOCK_M, BLOCK_N, warps, stages)

arch is a devices.Target label ("sm_90", "gfx942"). flash_configs.candidates() tries an entry's
config first on that arch; every other specialisation, and every other GPU, takes the first
config that fits. Written by bench/tuned_configs.py from the "autotune" section of reports that
`bench/run.py --autotune` wrote on a GPU (bench/results/), never by hand.
"""
# From: no report yet (no GPU run with --autotune)
TUNED = {
}
