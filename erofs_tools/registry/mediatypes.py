"""Media types and annotation keys of OCI, Docker and Nydus images (ecosystem.md §2)."""

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_TAR_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_TAR_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_TAR_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

NYDUS_BLOB = "application/vnd.oci.image.layer.nydus.blob.v1"
NYDUS_CONFIG = "application/vnd.nydus.image.config.v1+json"
NYDUS_MANIFEST_ARTIFACT = "application/vnd.nydus.image.manifest.v1+json"
NYDUS_OS_FEATURE = "nydus.remoteimage.v1"

ANNOTATION_NYDUS_BLOB = "containerd.io/snapshot/nydus-blob"
ANNOTATION_NYDUS_BOOTSTRAP = "containerd.io/snapshot/nydus-bootstrap"
ANNOTATION_NYDUS_FS_VERSION = "containerd.io/snapshot/nydus-fs-version"

MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)
# Sent as Accept on manifest GETs: without it registries may down-convert to schema 1.
ALL_MANIFEST_TYPES = MANIFEST_TYPES + INDEX_TYPES
