"""The fault checker's workload (tests/checker.py): random writes under PREFIX to KEYS.

Puts, deletes, range deletes, multi-op transactions and leases (expiring and
revoked), values from empty to 1 MiB, binary keys; it survives etcd restarts.
"""

from __future__ import annotations

import random
import signal
import time
from typing import Any

PREFIX = b"/chk/"
KEYS = [PREFIX + b"k%03d" % i for i in range(60)] + [
    PREFIX + b"bin/\x00\x01", PREFIX + b"bin/\xff\xfe\xfd", PREFIX + "ключ".encode(),
    PREFIX + b"sub/a", PREFIX + b"sub/b", PREFIX + b"sub/c"]


def _value(rnd: random.Random) -> bytes:
    r = rnd.random()
    if r < 0.1:
        return b""
    if r < 0.995:
        return rnd.randbytes(rnd.randrange(1, 300))
    return rnd.randbytes(rnd.choice([64 << 10, 1 << 20]))  # rarely: large, up to 1 MiB


def workload(endpoint: str, seed: int, stop: Any, counter: Any) -> None:
    """Random writes under PREFIX until ``stop`` is set; survives etcd restarts."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from shmcache.etcdapi import rpc
    from shmcache.format import layout
    from tests.etcdserver import ApiClient

    rnd = random.Random(seed)
    client = ApiClient.to(endpoint)
    kv, lease_stub = client.kv, client.stub("Lease")

    def lease(ttl: int) -> int:
        return int(lease_stub.LeaseGrant(rpc.LeaseGrantRequest(TTL=ttl), 2).ID)

    while not stop.is_set():
        try:
            op = rnd.random()
            key = rnd.choice(KEYS)
            if op < 0.55:
                kv.Put(rpc.PutRequest(key=key, value=_value(rnd)), 2)
            elif op < 0.7:
                kv.DeleteRange(rpc.DeleteRangeRequest(key=key), 2)
            elif op < 0.74:
                sub = PREFIX + b"sub/"
                kv.DeleteRange(rpc.DeleteRangeRequest(
                    key=sub, range_end=layout.prefix_range_end(sub)), 2)
            elif op < 0.9:
                ops = []
                for k in rnd.sample(KEYS, rnd.randrange(2, 8)):
                    if rnd.random() < 0.7:
                        ops.append(rpc.RequestOp(request_put=rpc.PutRequest(
                            key=k, value=_value(rnd))))
                    else:
                        ops.append(rpc.RequestOp(
                            request_delete_range=rpc.DeleteRangeRequest(key=k)))
                kv.Txn(rpc.TxnRequest(success=ops), 2)
            elif op < 0.96:
                lease_id = lease(rnd.choice([1, 2]))  # expires by itself
                for k in rnd.sample(KEYS, 2):
                    kv.Put(rpc.PutRequest(key=k, value=b"leased", lease=lease_id), 2)
            else:
                lease_id = lease(30)
                for k in rnd.sample(KEYS, 3):
                    kv.Put(rpc.PutRequest(key=k, value=b"revoked", lease=lease_id), 2)
                # all its keys deleted in one revision
                lease_stub.LeaseRevoke(rpc.LeaseRevokeRequest(ID=lease_id), 2)
            counter.value += 1
        except Exception:
            time.sleep(0.2)  # etcd down for a moment: a fault being injected
        time.sleep(rnd.random() * 0.01)
    client.close()
