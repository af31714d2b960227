"""Protocol codecs with no I/O (bytes in, bytes or events out); see each module's overview.

The codec modules lib.native.MODULES may run compiled by mypyc (scripts/build_native.py):
``install`` below puts the build first on this package's path when it matches the sources and
``SHROUD_PURE`` is not set; otherwise the sources here run. lib.native.STATUS says which.
"""
from lib import native as _native

_native.install(__path__)
