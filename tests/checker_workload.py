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
    from tests.etcdserver import use_pure_python_protobuf

    use_pure_python_protobuf()
    import etcd3
    from etcd3.etcdrpc import rpc_pb2

    from shmcache.format import layout

    rnd = random.Random(seed)
    host, port = endpoint.rsplit(":", 1)
    client = etcd3.client(host=host.split("//")[-1], port=int(port), timeout=2)
    while not stop.is_set():
        try:
            op = rnd.random()
            key = rnd.choice(KEYS)
            if op < 0.55:
                client.kvstub.Put(rpc_pb2.PutRequest(key=key, value=_value(rnd)), 2)
            elif op < 0.7:
                client.kvstub.DeleteRange(rpc_pb2.DeleteRangeRequest(key=key), 2)
            elif op < 0.74:
                sub = PREFIX + b"sub/"
                client.kvstub.DeleteRange(rpc_pb2.DeleteRangeRequest(
                    key=sub, range_end=layout.prefix_range_end(sub)), 2)
            elif op < 0.9:
                ops = []
                for k in rnd.sample(KEYS, rnd.randrange(2, 8)):
                    if rnd.random() < 0.7:
                        ops.append(rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(
                            key=k, value=_value(rnd))))
                    else:
                        ops.append(rpc_pb2.RequestOp(
                            request_delete_range=rpc_pb2.DeleteRangeRequest(key=k)))
                client.kvstub.Txn(rpc_pb2.TxnRequest(success=ops), 2)
            elif op < 0.96:
                lease = client.lease(rnd.choice([1, 2]))  # expires by itself
                for k in rnd.sample(KEYS, 2):
                    client.kvstub.Put(rpc_pb2.PutRequest(key=k, value=b"leased", lease=lease.id), 2)
            else:
                lease = client.lease(30)
                for k in rnd.sample(KEYS, 3):
                    client.kvstub.Put(rpc_pb2.PutRequest(key=k, value=b"revoked", lease=lease.id), 2)
                lease.revoke()  # all its keys deleted in one revision
            counter.value += 1
        except Exception:
            time.sleep(0.2)  # etcd down for a moment: a fault being injected
        time.sleep(rnd.random() * 0.01)
    client.close()
