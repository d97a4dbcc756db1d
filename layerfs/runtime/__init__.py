"""Running a container: namespaces, pivot_root, /proc, /dev and exec (shim), what it may do (confinement), the life
cycle of layerfs run (run), an OCI bundle for runc (bundle)."""

# A container's PATH where its image sets none, as docker and runc give it (here: a build reads it without
# loading the runtime).
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
