"""The demo world: seeded synthetic scenes, a text-only instruction set, and the recipe that trains
the small LLaVA target shipped under `models/demo/target`.

Everything here is a pure function of a seed, so `python -m demo_world build` rebuilds the shipped
checkpoint bit for bit on the same machine type. Nothing in this package serves requests.
"""
