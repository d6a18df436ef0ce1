"""Measuring: the bench, the load test and the soak.

Layer rule: may import every layer of the package; nothing imports it."""
