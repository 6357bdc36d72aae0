"""The writer's etcd client: the gRPC connection and raw watch stream, and the hand decoder
of WatchResponse."""
