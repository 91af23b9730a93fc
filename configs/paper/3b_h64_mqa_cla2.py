"""3B H64-MQA-CLA2 (paper's 3B experiments)."""
from configs.paper.common import SCALE_3B, paper_config


def get_config():
    return paper_config(SCALE_3B, head_dim=64, num_heads=48, num_kv_heads=1, kv_sharing=2)
