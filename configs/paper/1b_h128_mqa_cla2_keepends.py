"""1B H128-MQA-CLA2-KeepEnds (paper's Table 1). KeepEnds: the first and last layers keep their own K/V, CLA2 in between (1, 2x9, 1)."""
from configs.paper.common import SCALE_1B, paper_config


def get_config():
    return paper_config(SCALE_1B, head_dim=128, num_heads=16, num_kv_heads=1, group_sizes='1,2x9,1')
