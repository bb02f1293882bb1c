"""Search: packed binary codes -> Hamming and coarse-to-fine rankings, the ``CtFIndex``, DTO thresholds
and the exact merge of several indexes' hits. NumPy + numba only: never imports torch (checked by a test)."""
