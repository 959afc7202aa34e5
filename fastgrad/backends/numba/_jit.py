"""The two ways this backend compiles its module-level kernels, shared by every file.

``fastmath`` is off by default, so results follow IEEE rules like NumPy's.
Set ``FASTGRAD_NUMBA_FASTMATH=1`` before fastgrad loads the backend to
compile with ``fastmath=True`` (reassociated sums, no NaN/inf guarantees).
Clear the cache (``fastgrad/backends/numba/__pycache__``) or point
``NUMBA_CACHE_DIR`` elsewhere when switching, so neither variant is loaded
for the other.
"""

from __future__ import annotations

import os

from numba import njit

FASTMATH = os.environ.get("FASTGRAD_NUMBA_FASTMATH", "").strip() == "1"

# error_model="numpy": division by zero gives inf/NaN like NumPy, instead of a
# Python exception that costs a check on every division in the hot loops.
serial = njit(cache=True, nogil=True, fastmath=FASTMATH, error_model="numpy")
parallel = njit(cache=True, nogil=True, fastmath=FASTMATH, error_model="numpy", parallel=True)
