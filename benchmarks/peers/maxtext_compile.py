"""MaxText's own ahead-of-time compile of its train step (maxtext.trainers.pre_train
.train_compile, as `compile_topology=` runs it), keeping what cla-compile reads: the memory
analysis and the optimized HLO. Run with MaxText's environment (maxtext_env.sh):

    python maxtext_compile.py OUT_PREFIX key=value ...   # MaxText config overrides
writes OUT_PREFIX.json (memory per device, settings) and OUT_PREFIX.hlo.txt.
"""
import json
import pathlib
import sys

import maxtext
from maxtext.trainers.pre_train import train_compile

BASE = pathlib.Path(maxtext.__file__).parent / "configs" / "base.yml"


def main():
    prefix, overrides = pathlib.Path(sys.argv[1]), sys.argv[2:]
    captured = {}
    compile_step = train_compile.jit_and_compile

    def keep(*args, **kwargs):
        captured["compiled"] = compile_step(*args, **kwargs)
        return captured["compiled"]

    train_compile.jit_and_compile = keep
    train_compile.main(["train_compile", str(BASE), *overrides])
    compiled = captured["compiled"]
    memory = compiled.memory_analysis()
    figures = {k: int(getattr(memory, f"{k}_size_in_bytes")) for k in
               ("argument", "output", "alias", "temp", "generated_code")}
    prefix.with_suffix(".hlo.txt").write_text(compiled.as_text())
    prefix.with_suffix(".json").write_text(json.dumps(dict(
        memory=figures, overrides=overrides, maxtext=getattr(maxtext, "__version__", "0.2.5"),
        jax=__import__("jax").__version__), indent=1))


if __name__ == "__main__":
    main()
