"""1B H128-MQA-CLA2-DenseFront (paper's Table 1). DenseFront: the first two layers keep their own K/V, CLA2 after them (1, 1, 2x9)."""
from configs.paper.common import SCALE_1B, paper_config


def get_config():
    return paper_config(SCALE_1B, head_dim=128, num_heads=16, num_kv_heads=1, group_sizes='1x2,2x9')
