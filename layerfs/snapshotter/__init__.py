"""layerfs as containerd's snapshotter: its snapshots API served over gRPC on a unix socket (a proxy plugin)."""
