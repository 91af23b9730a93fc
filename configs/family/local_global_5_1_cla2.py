"""5:1 local:global (window 128) with CLA2 among consecutive local layers; add int8 at
serving time (--cache_dtype=int8) for the full Character.AI stack."""
from configs.family.common import family_config


def get_config():
    return family_config(layer_types="5:1", local_window=128, kv_sharing=2)
