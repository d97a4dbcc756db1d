"""The FUSE-free core: layers, lookup, whiteouts, copy-up and the union filesystem built from them."""
