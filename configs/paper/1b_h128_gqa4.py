"""1B H128-GQA4 (paper's Table 1)."""
from configs.paper.common import SCALE_1B, paper_config


def get_config():
    return paper_config(SCALE_1B, head_dim=128, num_heads=16, num_kv_heads=4)
