"""Speculum's shared kernel: configs, sampling and verification math, model adapter, stats, errors.

Shape vocabulary used in comments and assertions across the project:
    B batch · T tokens · K draft length · V vocab · D hidden · N visual tokens per image · I images
"""
