"""1B H128-MQA-CLA2-DenseBack (paper's Table 1). DenseBack: CLA2 first, the last two layers keep their own K/V (2x9, 1, 1)."""
from configs.paper.common import SCALE_1B, paper_config


def get_config():
    return paper_config(SCALE_1B, head_dim=128, num_heads=16, num_kv_heads=1, group_sizes='2x9,1x2')
