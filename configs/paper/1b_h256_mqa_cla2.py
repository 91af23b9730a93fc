"""1B H256-MQA-CLA2 (paper's Table 1)."""
from configs.paper.common import SCALE_1B, paper_config


def get_config():
    return paper_config(SCALE_1B, head_dim=256, num_heads=8, num_kv_heads=1, kv_sharing=2)
