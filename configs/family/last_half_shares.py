"""Gemma 3n / YOCO style: the last 3 of 6 layers reuse the K/V of layer 2 (half the cache)."""
from configs.family.common import family_config


def get_config():
    return family_config(kv_sources="last:3")
