"""The union as a filesystem: the kernel's FUSE requests turned into the core Union's calls."""
