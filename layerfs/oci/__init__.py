"""OCI image formats, without FUSE: a container's changes written as an image layer."""
