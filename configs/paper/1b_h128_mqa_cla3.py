"""1B H128-MQA-CLA3 (paper's Table 1). CLA3 over 20 layers is uneven: six groups of three and one of two (7 K/V layers)."""
from configs.paper.common import SCALE_1B, paper_config


def get_config():
    return paper_config(SCALE_1B, head_dim=128, num_heads=16, num_kv_heads=1, kv_sharing=3)
