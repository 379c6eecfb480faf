"""File names and tolerances of TVM artifacts, shared by the compiler (``build.py``)
and the loader (``runtime.py``) without importing either."""

LIBRARY = "model.so"
LIBRARY_TAR = "model.tar"
TARGET_FILE = "target.json"
FLOAT_TOLERANCE = 1e-4
QDQ_TOLERANCE = 5e-2
