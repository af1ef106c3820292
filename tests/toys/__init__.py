"""A toy search space, compared method and baseline, one file each: each registers itself
when imported, as a new extension of dop would (tests/test_registries.py)."""
