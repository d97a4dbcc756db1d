"""Running a container: namespaces, pivot_root, /proc, /dev and exec (shim), what it may do (confinement), the life
cycle of layerfs run (run), an OCI bundle for runc (bundle)."""
