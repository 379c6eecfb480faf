"""The onnxc version, in a module of its own so that any module can import it
without importing the package (whose __init__ imports compress)."""

__version__ = "0.1.0"
