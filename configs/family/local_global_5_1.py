"""Gemma / Character.AI style: five local layers (window 128) per global one."""
from configs.family.common import family_config


def get_config():
    return family_config(layer_types="5:1", local_window=128)
