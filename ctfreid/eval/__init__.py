"""Evaluation: Market-1501-protocol CMC / mAP, the Table-4 rows (float, each code length, CtF) with query
times, and the tables and plots of reports. NumPy + numba (matplotlib for plots); never imports torch."""
