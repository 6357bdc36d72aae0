"""Where the writer's time goes while it ingests events, and while it builds a snapshot.

    python bench/profile_writer.py [--keys 100000] [--events 30000]

Ingest: a writer (``python -m shmcache serve``) against its own etcd holding
--keys keys is stopped (SIGSTOP) while --events single-put revisions are written,
then continued and sampled with py-spy (``pip install py-spy``; needs ptrace
rights) until it has caught up. Prints the ingest rate and the functions the
writer's threads spent their samples in (own time and inclusive).
Snapshot: ``snapshot.build`` + ``fill`` of --keys keys under cProfile.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import io
import mmap
import multiprocessing as mp
import os
import pstats
import shutil
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C  # noqa: E402


def summarize_raw(path: str, top: int = 25) -> str:
    """py-spy's raw (collapsed stack) output -> own and inclusive sample shares per function."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            if not stack:
                continue
            c = int(count)
            frames = [fr.split(" (")[0] + " (" + fr.split(" (")[1].split(":")[0].split("/")[-1] + ")"
                      if " (" in fr else fr for fr in stack.split(";")]
            if frames and frames[0].startswith("process "):
                frames = frames[1:]
            if frames and frames[0].startswith("thread "):
                frames = frames[1:]
            if not frames:
                continue
            total += c
            own[frames[-1]] += c
            for fr in set(frames):
                incl[fr] += c
    lines = [f"{total} samples; own time:"]
    lines += [f"  {100 * c / total:5.1f}%  {fn}" for fn, c in own.most_common(top)]
    lines += ["inclusive:"]
    lines += [f"  {100 * c / total:5.1f}%  {fn}" for fn, c in incl.most_common(top)]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--events", type=int, default=30_000)
    args = ap.parse_args()
    import shmcache
    from tests.etcdserver import EtcdServer
    from tests.helpers import WriterProcess, etcd_current_revision

    n = args.keys
    prefix = C.cache_prefix(n)
    ctx = mp.get_context("spawn")
    pyspy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    with EtcdServer(extra_args=C.etcd_args()) as etcd:
        client = etcd.api_client()
        C.load_etcd(client, prefix, n)
        w = WriterProcess(f"profw{os.getpid()}", etcd.endpoint, prefix, ring_size="64MiB")
        w.start()
        try:
            r = shmcache.Reader(w.name)
            base = etcd_current_revision(client)
            r.wait(base, timeout=60)
            os.kill(w.pid, signal.SIGSTOP)
            lt = C.LoadThread(ctx, "127.0.0.1", etcd.port, prefix, n, 0, max_events=args.events)
            res = lt.wait()
            raw = f"/tmp/shmcache-pyspy-{os.getpid()}.txt"
            spy = None
            if os.path.exists(pyspy):
                spy = subprocess.Popen([pyspy, "record", "--pid", str(w.pid), "--rate", "200",
                                        "--format", "raw", "--output", raw, "--nonblocking",
                                        "--threads"], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)
                time.sleep(1.0)  # py-spy attaches
            t0 = time.monotonic()
            os.kill(w.pid, signal.SIGCONT)
            ok = r.wait(res["last_revision"], timeout=600)
            dt = time.monotonic() - t0
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                spy.wait(30)
            events = res["last_revision"] - base
            print(f"writer ingest at {n} keys: {events} events in {dt:.2f}s = {events / dt:,.0f} "
                  f"events/s (caught up: {ok})")
            if spy is not None and os.path.exists(raw):
                print(summarize_raw(raw))
                os.unlink(raw)
            else:
                print("(py-spy not found: pip install py-spy for the sampled profile)")
            r.close()
        finally:
            w.close()
            client.close()
    # Snapshot build, in this process, under cProfile.
    from sortedcontainers import SortedDict

    from shmcache.format import snapshot

    kv = SortedDict((C.key(prefix, i), (C.value(i), 5, 5, 1, 0)) for i in range(n))
    pr = cProfile.Profile()
    t0 = time.perf_counter()
    pr.enable()
    size, fill = snapshot.build(kv.items(), len(kv), 10, 1)
    buf = mmap.mmap(-1, size)
    fill(buf)
    pr.disable()
    print(f"\nsnapshot build+fill of {n} keys: {time.perf_counter() - t0:.2f}s under cProfile")
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(10)
    print(s.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
