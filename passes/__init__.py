"""All onnxc passes. One file per pass; importing it registers it (``@register_pass``).

To add a pass: write ``passes/<name>.py`` with a ``Pass`` subclass decorated by
``@register_pass`` and add its import below.
"""

from . import cleanup, fold_bn  # noqa: F401
from . import prune, sparsify  # noqa: F401  (channel pruning, sparsity)
from . import int8  # noqa: F401  (quantization)
from . import ternary, binary  # noqa: F401  (low-bit weights)
from . import recover  # noqa: F401  (distillation, runs last)
from . import lowrank  # noqa: F401  (SVD / Tucker-2 / CP splitting)
from . import gap  # noqa: F401  (GlobalAveragePool replacement of FC heads)
from . import qdebug  # noqa: F401  (`onnxc qdebug`: per-layer int8 debugger)
