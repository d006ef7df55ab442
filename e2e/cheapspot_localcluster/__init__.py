"""The local cluster: a real control plane built from source, kwok nodes, an S3 endpoint."""
