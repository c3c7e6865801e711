"""The verify service: the target model, its per-session KV caches, and block verification."""
