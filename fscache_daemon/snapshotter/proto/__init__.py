"""Generated protobuf/gRPC stubs of containerd's snapshots service (do not edit by hand).

snapshots.proto and mount.proto here describe only the messages the snapshotter uses.
The *_pb2*.py(i) files are committed, generated with grpcio-tools 1.85.1 (protobuf
gencode 7.35.1, hence the protobuf>=7.35.1,<8 and grpcio>=1.85.1 requirements) from the
repository's top directory by:

    python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. \
        fscache_daemon/snapshotter/proto/mount.proto \
        fscache_daemon/snapshotter/proto/snapshots.proto
    rm fscache_daemon/snapshotter/proto/mount_pb2_grpc.py   # no service in mount.proto
"""
