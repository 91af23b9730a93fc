"""1B H32-MQA (paper's Table 1)."""
from configs.paper.common import SCALE_1B, paper_config


def get_config():
    return paper_config(SCALE_1B, head_dim=32, num_heads=64, num_kv_heads=1)
