"""The writer's etcd client: the connection (``connection``), its raw watch stream
(``stream``) and the hand decoder of WatchResponse (``decode``), on ``shmcache.etcdapi``."""
