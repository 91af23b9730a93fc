"""3B H128-MQA (paper's 3B experiments)."""
from configs.paper.common import SCALE_3B, paper_config


def get_config():
    return paper_config(SCALE_3B, head_dim=128, num_heads=24, num_kv_heads=1)
