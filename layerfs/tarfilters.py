"""tarfile with its extraction filters (PEP 706), which refuse members that would land outside the
destination: the standard library's from Python 3.11.4 on, PyPI's backport of the same module before
(Debian 12's python3 is 3.11.2, and every user of the machine may run it)."""

import tarfile

if not hasattr(tarfile, "data_filter"):
    from backports import tarfile  # type: ignore[no-redef]

__all__ = ["tarfile"]
