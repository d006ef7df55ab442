"""The pinned versions of everything the local cluster builds from source.

One Kubernetes minor, the etcd its release is tested with, and a kwok release built against
that minor. Changing a version here changes the cache directory, so an old build is never
mistaken for a new one.
"""

from __future__ import annotations

KUBERNETES_VERSION = "v1.36.3"
KUBERNETES_MAJOR = "1"
KUBERNETES_MINOR = "36"
# k8s.io/kubernetes replaces its staging modules with local paths; their published tags
# carry the same patch level under v0.
STAGING_VERSION = "v0.36.3"
ETCD_VERSION = "v3.6.8"
KWOK_VERSION = "v0.8.0"
# The `go` directive of the wrapper module: Kubernetes 1.36 needs Go 1.26. With
# GOTOOLCHAIN=auto an older local `go` downloads this toolchain through the module proxy.
GO_VERSION = "1.26.0"
# Used only when no `go` command is installed: fetched from the module proxy as a toolchain zip.
BOOTSTRAP_GO_TOOLCHAIN = "go1.26.8"

# Binary name -> Go package it is built from ("./etcd" is the wrapper's own main package).
BINARIES: dict[str, str] = {
    "kube-apiserver": "k8s.io/kubernetes/cmd/kube-apiserver",
    "kube-controller-manager": "k8s.io/kubernetes/cmd/kube-controller-manager",
    "kube-scheduler": "k8s.io/kubernetes/cmd/kube-scheduler",
    "kubectl": "k8s.io/kubernetes/cmd/kubectl",
    "kwok": "sigs.k8s.io/kwok/cmd/kwok",
    "etcd": "./etcd",
}

# Modules required by the wrapper, pinned with `go mod edit -require` before `go mod tidy`:
# tidy alone would resolve the newest Kubernetes instead of the one above.
ROOT_REQUIREMENTS: dict[str, str] = {
    "k8s.io/kubernetes": KUBERNETES_VERSION,
    "sigs.k8s.io/kwok": KWOK_VERSION,
    "go.etcd.io/etcd/server/v3": ETCD_VERSION,
}


def build_id() -> str:
    """Names the cache directory; bump a version and a fresh build goes next to the old one."""
    return f"k8s-{KUBERNETES_VERSION}"


def stamp() -> dict[str, str]:
    """What a finished build records, compared on the next run to decide whether to rebuild."""
    return {
        "kubernetes": KUBERNETES_VERSION,
        "staging": STAGING_VERSION,
        "etcd": ETCD_VERSION,
        "kwok": KWOK_VERSION,
        "binaries": ",".join(sorted(BINARIES)),
    }


# The kind tier (cheapspot_localcluster.kindnode): kind's release that pairs with the
# Kubernetes minor above, helm, CoreDNS, and the Debian release the images are built from.
KIND_VERSION = "v0.32.0"
HELM_VERSION = "v3.19.5"
# What helm's release build of that tag stamps into the binary (its Makefile's -ldflags): the
# tag's commit, and the k8s.io/client-go version of its go.mod, from which it derives the
# Kubernetes version `helm lint` and `helm template` assume without a cluster (v0.34 -> 1.34).
HELM_GIT_COMMIT = "4a19a5b6fb912c5c28a779e73f2e0880d9e239a4"
HELM_CLIENT_GO_VERSION = "v0.34.2"
COREDNS_VERSION = "v1.14.2"
DEBIAN_SUITE = "bookworm"
# Built from k8s.io/kubernetes for the node image, beside the control plane binaries above.
NODE_BINARIES: dict[str, str] = {
    "kubelet": "k8s.io/kubernetes/cmd/kubelet",
    "kubeadm": "k8s.io/kubernetes/cmd/kubeadm",
    "kube-proxy": "k8s.io/kubernetes/cmd/kube-proxy",
}
