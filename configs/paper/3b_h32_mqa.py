"""3B H32-MQA (paper's Table 7: 4096 KV bytes/token, as 3B H64-MQA-CLA2)."""
from configs.paper.common import SCALE_3B, paper_config


def get_config():
    return paper_config(SCALE_3B, head_dim=32, num_heads=96, num_kv_heads=1)
