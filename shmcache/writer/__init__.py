"""The write side: Writer, its etcd feed, the publisher and the segments it builds, the
consistent-read server, the verifier and fault points. Empty on purpose: importing a module
here must not import grpc or protobuf unless that module needs it."""
