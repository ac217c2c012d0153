"""The decode section: one generation step's attention, one new query a row against a KV cache
of fixed size whose rows hold `lengths` keys (lecture_flash.decode_attention).

IMPLS is the registry: name -> factory(device, quick) that returns attend(q, k_cache, v_cache,
lengths) or a string saying why it cannot run here. Each is checked against the oracle
(kernels/testing.py's rule, row by row) before it is timed. Every implementation starts from the
same (q, caches, lengths), as a decode step does. The alternatives are what a model without
decode_attention runs: SDPA over the whole cache with the key mask built from the lengths (the
same fixed shapes, so a CUDA graph can capture it too), and, where every row holds the same
number of keys, SDPA over the cache's first slots, as a cache that grows by one key a step gives
them (the length read on the host; its shapes change every step: no CUDA graph).
"""
import torch
import torch.nn.functional as F

from lecture_flash import decode_attention
from lecture_flash.reference import causal_attention_reference, naive_causal_attention
from lecture_flash.testing import rule_failures

from attention import _geomean, _gqa
from harness import (begin_table, built, log, print_never_ran, progress, row_groups, timed_calls,
                     timing_cells)


def _project(device, quick):
    return lambda q, k, v, lengths: decode_attention(q, k, v, lengths)


def _sdpa_masked(device, quick):
    """The key mask from the lengths, as a step must build it (they change every step; the
    key positions are kept), then SDPA over the whole cache."""
    positions = {}

    def attend(q, k, v, lengths):
        S = k.shape[2]
        if S not in positions:
            positions[S] = torch.arange(S, device=k.device)
        mask = positions[S] < lengths.view(-1, 1, 1, 1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **_gqa(q, k))
    return attend


def _sdpa_sliced(device, quick):
    def attend(q, k, v, lengths):
        n = lengths_equal(lengths)
        if n is None:
            raise ValueError("the rows hold different numbers of keys")
        return F.scaled_dot_product_attention(q, k[:, :, :n], v[:, :, :n], **_gqa(q, k))
    return attend


def lengths_equal(lengths):
    """The one length every row holds, or None (read on the host, once per point)."""
    values = set(lengths.tolist())
    return values.pop() if len(values) == 1 else None


IMPLS = {"sdpa-masked": _sdpa_masked, "sdpa-sliced": _sdpa_sliced, "project": _project}
OURS = "project"


def points(device, dtypes, quick):
    """(dtype, B, H, Hk, S, D, lengths): one sequence (a user's generation: on a CPU the
    lecture's model), a batch of grouped heads whose rows hold different lengths in a cache
    sized for longer ones (serving), and one whose longest rows fill the cache."""
    if device.type == "cuda":
        return [(dt, B, 32, 8, S, 128, lengths) for dt in dtypes for B, S, lengths in (
            (1, 4096, (3000,)), (8, 8192, (4096, 3000, 2048, 3500, 1024, 4000, 2500, 3900)),
            (8, 4096, (4096, 3000, 2048, 3500, 1024, 4096, 2500, 3900)))]
    return [(dt, B, H, Hk, S, 64, lengths) for dt in dtypes for B, H, Hk, S, lengths in (
        (1, 6, 6, 256, (200,)), (4, 8, 2, 512, (300, 131, 200, 77)),
        (8, 6, 6, 256, (256, 40, 180, 220, 100, 256, 60, 150)))]


def _check(impl, q, k, v, lengths):
    """None if impl's output obeys the tests' tolerance rule against the oracle (each row against
    its own keys, in float64), else why."""
    with torch.no_grad():
        out = impl(q, k, v, lengths)
        outs, refs, lows = [], [], []
        for b, n in enumerate(lengths.tolist()):
            qb, kb, vb = q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n]
            outs.append(out[b:b + 1])
            refs.append(causal_attention_reference(qb.double(), kb.double(), vb.double()))
            lows.append(naive_causal_attention(qb, kb, vb))
    failures = rule_failures(outs, refs, lows, names=[f"row {b}" for b in range(len(outs))])
    return f"wrong: {failures[0]}" if failures else None


def run(opts, rows, save):
    device = opts.device
    impls = built(IMPLS, opts)
    grid = getattr(opts, "points", None) or points(device, opts.dtypes, opts.quick)
    bar = progress(len(grid), "decode")
    for dtype, B, H, Hk, S, D, lengths in grid:
        bar.update(1)
        torch.manual_seed(0)
        q = torch.randn(B, H, 1, D, device=device, dtype=dtype)
        k, v = (torch.randn(B, Hk, S, D, device=device, dtype=dtype) for _ in range(2))
        seqlens = torch.tensor(lengths, device=device)
        base = dict(dtype=str(dtype).replace("torch.", ""), **{"pass": "fwd"}, B=B, H=H, S=S, D=D,
                    lengths="equal" if len(set(lengths)) == 1 else "unequal",
                    keys=sum(lengths), **({"Hk": Hk} if Hk != H else {}))
        fns, found = {}, {}
        for name, impl in impls.items():
            row = dict(impl=name, **base)
            found[name] = row
            rows.append(row)
            why = impl if isinstance(impl, str) else None
            if why is None:
                try:
                    why = _check(impl, q, k, v, seqlens)
                except Exception as e:
                    why = f"skipped: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
            if why:
                row["skipped"] = why
            else:
                fns[name] = (lambda impl=impl: impl(q, k, v, seqlens))
        with torch.no_grad():  # (a CPU call takes microseconds: 50 of them per timing)
            for name, got in timed_calls(fns, device, inner=50).items():
                if isinstance(got, str):
                    found[name]["skipped"] = got
                else:
                    found[name].update(ms=got[0], ms_p20=got[1], ms_p80=got[2])
        log(f"  decode {base['dtype']} B={B} H={H}/{Hk} S={S}: " + ", ".join(
            f"{n} {found[n]['ms'] * 1e3:.1f} us" if "ms" in found[n] else f"{n} {found[n]['skipped']}"
            for n in fns))
        save()
    bar.close()


def print_table(rows, opts):
    absent = begin_table(rows, "decode (one new query a row against a fixed-size KV cache; "
                               "vs sdpa-masked)")
    if absent is None:
        return
    print(f"{'dtype':9} {'B':>3} {'H':>5} {'S':>6} {'D':>4} {'lengths':8}  {'impl':12} "
          f"{'ms':>9} {'vs sdpa-masked':>14}  note")
    for rs in row_groups(rows, ("dtype", "B", "H", "Hk", "S", "D", "keys"), absent):
        base = next((r.get("ms") for r in rs if r["impl"] == "sdpa-masked"), None)
        for r in rs:
            heads, ms, _, vs = timing_cells(r, base, False)
            print(f"{r['dtype']:9} {r['B']:>3} {heads:>5} {r['S']:>6} {r['D']:>4} "
                  f"{r['lengths']:8}  {r['impl']:12} {ms} {vs:>14}  {r.get('skipped', '')}")
        print()
    print_never_ran(rows)
    if opts.device.type != "cuda":
        print("(sdpa-sliced: SDPA over the cache's first slots, where every row holds the same "
              "number of keys, as a cache grown a key a step gives them)")


def verdict(rows, opts):
    """Ours against SDPA with the key mask (the same call on the same fixed shapes), and
    against SDPA on the sliced cache where it ran, geometric means over the points."""
    groups = [{r["impl"]: r["ms"] for r in rs if "ms" in r}
              for rs in row_groups(rows, ("dtype", "B", "H", "Hk", "S", "D", "keys"))]
    parts = []
    for alt, what in (("sdpa-masked", "SDPA with the key mask"),
                      ("sdpa-sliced", "SDPA on the cache's first slots (rows of one length)")):
        ratios = [ms[alt] / ms[OURS] for ms in groups if OURS in ms and alt in ms]
        if ratios:
            parts.append(f"{_geomean(ratios):.2f}x {what} (geometric mean over {len(ratios)} "
                         f"points; worst {min(ratios):.2f}x)")
    return [f"decode: {OURS} " + ", ".join(parts)] if parts else []
