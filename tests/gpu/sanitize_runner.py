"""The command line shared by the compute-sanitizer case scripts (tests/gpu/sanitize_*.py, run by
scripts/gpu_sanitize.sh): --no-check, --only and --seed, then each case in turn with a line per
case and a summary line that the shell script reads."""

import argparse
import random
import secrets
import time

import torch


def run_cases(tag, doc, cases):
    """Runs `cases` (an iterable of (name, fn, positional args[, keyword args])): each call is
    fn(rng, check, *args, **kwargs), then a device synchronisation. `tag` prefixes the output
    lines; `doc` (the script's docstring) gives the --help description. Returns the exit status."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--no-check", action="store_true", help="skip the reference comparisons")
    ap.add_argument("--only", default="", help="run the cases whose name contains this")
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print(f"{tag}: no CUDA device")
        return 2
    seed = args.seed if args.seed is not None else secrets.randbits(63)
    print(f"{tag}: seed {seed} (--seed {seed} replays)", flush=True)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    n = 0
    for case in cases:
        name, fn, pos = case[0], case[1], case[2]
        kw = case[3] if len(case) > 3 else {}
        if args.only not in name:
            continue
        t = time.time()
        fn(rng, not args.no_check, *pos, **kw)
        torch.cuda.synchronize()
        n += 1
        print(f"  ok  {name}  ({time.time() - t:.1f}s)", flush=True)
    print(f"{tag}: {n} cases ok{' (not checked against the reference)' if args.no_check else ''}")
    return 0
