"""`python -m cla_jax.lm_eval ARGS`: lm_eval's command line with "cla_jax" registered."""
import sys

from cla_jax.lm_eval.model import main

if __name__ == "__main__":
    sys.exit(main())
