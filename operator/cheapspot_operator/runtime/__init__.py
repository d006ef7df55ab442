"""What both kinds' controllers run on: loops, the object reconciler, the kube client, watch caches, metrics."""
