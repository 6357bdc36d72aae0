"""The read side: Reader and everything it maps read-only (view, history, pages, index reads,
watches, the demultiplexer, asyncio, subscriptions). Imports no etcd, gRPC or protobuf."""
