"""Load testing the public API: ghz configurations (ghz/) and a Python generator reporting the same figures."""
