"""A toy search space, compared method and baseline, one file each: each registers itself
when imported, as a new extension of dop would (tests/search/test_registries.py)."""
