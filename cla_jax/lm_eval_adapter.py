"""The lm-evaluation-harness adapter's former name, kept so that `python -m
cla_jax.lm_eval_adapter`, `import cla_jax.lm_eval_adapter` (which registers "cla_jax") and
`from cla_jax.lm_eval_adapter import ClaJaxLM` keep working. The adapter is `cla_jax.lm_eval`.
"""
import sys

from cla_jax.lm_eval import MODEL_NAME, ClaJaxLM, main, register

__all__ = ["MODEL_NAME", "ClaJaxLM", "main", "register"]

if __name__ == "__main__":
    sys.exit(main())
