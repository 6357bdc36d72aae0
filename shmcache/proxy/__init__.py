"""``shmcache proxy``: etcd's v3 gRPC API served from a cache on this host.

A proxy process attaches to a cache as a Reader and answers etcd clients
(etcdctl, Go/Java/Python clients) from shared memory: ranges and watches over
the cache's prefix are served from the cache, everything else is forwarded to
etcd. See docs/operations.md, "Serve etcd clients from the cache".

The package imports the reader side, ``etcdapi`` and grpcio; never the writer.
"""
