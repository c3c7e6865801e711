"""The draft service: drafters that propose candidate blocks, and their per-session state."""
