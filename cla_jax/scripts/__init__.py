"""The command lines: train, eval and generate (top-level train.py, eval.py and generate.py,
and the cla-train, cla-eval and cla-generate console scripts of `pip install .`, all run these).

Each module defines its absl flags on import, so import only the one you run.
"""
