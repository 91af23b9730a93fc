"""The KV-sharing family at the demo's scale (issue 29; docs/guides/kv_sharing.md).

Each configs/family/<design>.py is configs/default.py's MQA model with only its KV map
changed, trained on 512-token sequences (2 x 512 tokens a step, the demo's 8 x 128) so that a
128-token local window is a real limit. Serve the last one with --cache_dtype=int8 for the
Character.AI stack (MQA, local attention, CLA2, int8).
"""
import ml_collections

from configs import default


def family_config(**kv_map) -> ml_collections.ConfigDict:
    config = default.get_config()
    config.model.update(kv_sharing=1, group_sizes="", layer_types="", local_window=0,
                        kv_sources="")
    config.model.update(kv_map)
    config.model.max_seq_len = 2048  # RoPE only: capacity and serving can plan a 2k context
    config.train.update(seq_len=512, batch_size=2)
    return config
