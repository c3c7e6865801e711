"""EAGLE-style feature-level drafting over a frozen target embedding and LM head (MSD / FLASH switches).

Shape vocabulary: B batch, T positions, K draft tokens, V vocab, D target hidden size, N visual tokens
per image, C compressed latents per image, I images.
"""
