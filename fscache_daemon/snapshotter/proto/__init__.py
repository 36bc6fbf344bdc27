"""Generated protobuf/gRPC stubs of containerd's APIs (do not edit by hand).

snapshots.proto and mount.proto: containerd's snapshots service, which the snapshotter
serves as a proxy plugin (and which `fscache-daemon rpull` calls on containerd itself).
descriptor.proto, content.proto, images.proto, leases.proto, diff.proto: the parts of
containerd's client API that `fscache-daemon rpull` uses (and content and images List,
which the snapshotter's imagerefs.py asks). cri_image.proto: the CRI
PullImage request the image-service proxy reads (image_proxy.py). Each describes only the
messages used. The *_pb2*.py(i) files are committed, generated with grpcio-tools 1.85.1
(protobuf gencode 7.35.1, hence the protobuf>=7.35.1,<8 and grpcio>=1.85.1
requirements) from the repository's top directory by:

    python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. \
        fscache_daemon/snapshotter/proto/*.proto
    rm fscache_daemon/snapshotter/proto/mount_pb2_grpc.py \
        fscache_daemon/snapshotter/proto/descriptor_pb2_grpc.py \
        fscache_daemon/snapshotter/proto/cri_image_pb2_grpc.py    # no service in them
"""
