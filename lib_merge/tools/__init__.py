"""Tools on single models and their parts: normalize and noise (transform.py), reports (report.py),
checkpoint info (info.py)."""
