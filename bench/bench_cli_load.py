"""Data and a steady write load for trying ``shmcache bench`` (docs/benchmarks.md).

Loads N keys under a prefix into etcd (Txn requests of 100 puts, pipelined),
then puts random existing keys at a fixed rate (single-key puts, each its own
revision and so one ring record; pipelined with gRPC futures, at most 64 in
flight) until --seconds run out, Ctrl-C or SIGTERM, printing the rate achieved every
5 s on stderr. Needs the writer extra (grpcio, protobuf: it speaks etcd through
shmcache.etcdapi, under either protobuf implementation). ``shmcache bench``
itself never writes; this script is the write load beside it.

    python bench/bench_cli_load.py --endpoint http://127.0.0.1:2379 --prefix /bench-cli/ \\
        --keys 100000 --rate 1000 --seconds 600
    shmcache serve benchcli --endpoints http://127.0.0.1:2379 --prefix /bench-cli/
    shmcache bench benchcli --readers 1,2,8 --op get --seconds 5
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (  # noqa: E402  (the same keys as bench/run.py)
    VALUE_SIZE,
    etcd_client,
    key,
    load_etcd,
)


def write_load(client: Any, prefix: bytes, n: int, rate: float, seconds: float | None) -> None:
    """Single-key puts to random existing keys at ``rate``/s; reports the rate achieved."""
    from shmcache.etcdapi import rpc

    stub, md = client.kv, client.metadata
    rnd = random.Random(7)
    inflight: list[Any] = []
    t0 = last_t = time.monotonic()
    sent = last_sent = 0
    try:
        while seconds is None or time.monotonic() - t0 < seconds:
            now = time.monotonic()
            due = t0 + sent / rate
            if due > now:
                time.sleep(min(due - now, 0.05))
            else:
                value = (b"%020d|" % time.monotonic_ns()).ljust(VALUE_SIZE, b"s")
                req = rpc.PutRequest(key=key(prefix, rnd.randrange(n)), value=value)
                inflight.append(stub.Put.future(req, 30, metadata=md))
                sent += 1
                while len(inflight) >= 64 or (inflight and inflight[0].done()):
                    inflight.pop(0).result()
            if now - last_t >= 5.0:
                print(f"write load: {(sent - last_sent) / (now - last_t):,.0f} puts/s",
                      file=sys.stderr, flush=True)
                last_t, last_sent = now, sent
    except KeyboardInterrupt:
        pass
    for f in inflight:
        f.result()
    dt = time.monotonic() - t0
    print(f"write load: {sent:,} puts in {dt:.1f} s ({sent / dt:,.0f}/s)", file=sys.stderr)


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    # SIGTERM, or SIGINT even where a shell started us in the background with it ignored,
    # ends the load with its summary line.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--endpoint", default="http://127.0.0.1:2379")
    p.add_argument("--prefix", default="/bench-cli/")
    p.add_argument("--keys", type=int, default=100_000, help="keys under the prefix")
    p.add_argument("--skip-load", action="store_true", help="the keys are there already")
    p.add_argument("--rate", type=float, default=1000.0, help="puts/s; 0: load only")
    p.add_argument("--seconds", type=float, default=None, help="default: until Ctrl-C")
    args = p.parse_args()
    from shmcache.etcdapi.dial import parse_endpoint

    client = etcd_client(*parse_endpoint(args.endpoint))
    prefix = args.prefix.encode()
    if not args.skip_load:
        t0 = time.monotonic()
        rev = load_etcd(client, prefix, args.keys)
        print(f"loaded {args.keys:,} keys under {args.prefix} in {time.monotonic() - t0:.1f} s "
              f"(revision {rev})", file=sys.stderr, flush=True)
    if args.rate > 0:
        write_load(client, prefix, args.keys, args.rate, args.seconds)
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
