"""A cla-jax checkpoint as an lm-evaluation-harness model, "cla_jax": loglikelihood,
loglikelihood_rolling and generate_until.

    cla-lm-eval --model cla_jax --model_args workdir=workdir/demo,batch_size=32 \\
        --include_path tests/fixtures/lm_eval --tasks shakespeare_mc,shakespeare_rolling
    python -m cla_jax.lm_eval ...                # the same, without the console script

    import cla_jax.lm_eval, lm_eval              # registers "cla_jax"
    lm_eval.simple_evaluate(model="cla_jax", model_args={"workdir": ...}, tasks=[...])

lm_eval 0.4.13 finds a model only in its own registry (it reads no entry points), so
importing this package registers "cla_jax" and `main` runs lm_eval's own CLI after that.
(`cla_jax.lm_eval_adapter`, the module this package grew from, still works as a name for it.)

model_args: workdir (required), step (default: the newest good one), batch_size (rows per
device call, rounded up to a multiple of the mesh's data x fsdp; without it, lm_eval's own
--batch_size, whose default is 1: give batch_size=16 or more; 16 from Python without either),
max_length (tokens a row sees), add_bos_token (True/False), prefix_token_id, mesh (e.g.
"fsdp=4;tensor=2": ';' because lm_eval splits model_args on ','; default the run's
config.mesh), cache_dtype (generation's KV cache, default float32), cache_dir (where the run's
tokenizer is), max_gen_toks (default 256), seed (of sampled generations), loss_chunk_size
(positions unembedded at a time, default 128). Multi-host: distributed=True
(jax.distributed.initialize finds the cluster on TPU pods, SLURM, Open MPI, Kubernetes), or
coordinator_address=host:port,num_processes=N,process_id=i.

    conventions.py  how requests become tokens: HFLM's for a model with its own Hugging Face
                    tokenizer, the training documents' for a model trained here
    scoring.py      the jitted scorer (logprobs chunk by chunk) and the padded rows it reads
    model.py        `ClaJaxLM`, lm_eval's LM over a checkpoint; `register` and `main`

Multi-host: lm_eval's rank/world_size stay 0/1, so every process gets every request, in the
same order, and computes them all on the global mesh: inputs are replicated, rows split over
the mesh's data axes inside the program, and results come back replicated, so every process
returns the same numbers (and simple_evaluate returns results on each).
"""
from cla_jax.lm_eval.model import MODEL_NAME, ClaJaxLM, main, register

__all__ = ["MODEL_NAME", "ClaJaxLM", "main", "register"]
