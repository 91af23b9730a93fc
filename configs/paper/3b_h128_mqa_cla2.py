"""3B H128-MQA-CLA2 (paper's Table 5: 8192 KV bytes/token, as 3B H64-MQA)."""
from configs.paper.common import SCALE_3B, paper_config


def get_config():
    return paper_config(SCALE_3B, head_dim=128, num_heads=24, num_kv_heads=1, kv_sharing=2)
