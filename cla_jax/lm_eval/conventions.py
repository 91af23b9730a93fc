"""How lm_eval's requests become tokens: one of two conventions, chosen by the run's tokenizer.

- A model with its own Hugging Face tokenizer (imported by cla-hf-import, or adapted from one):
  lm_eval's HFLM (`--model hf`), defaults and model_args included, so numbers compare with
  published ones. A text is encoded as transformers' `tokenizer.encode` would: with the
  special tokens tokenizer.json's post-processor adds (Llama 3's <|begin_of_text|>; none for
  GPT-2-style BPE such as SmolLM2's), none with add_bos_token=False, bos first with
  add_bos_token=True; not when the text starts with the prefix token's text. The prefix token
  (empty contexts, rolling windows) is the tokenizer's bos, else its eos; max_length is the
  model's max_seq_len (HFLM reads max_position_embeddings); generation stops at the
  tokenizer's eos text and the model's eos ids, with the context cut to max_length -
  max_gen_toks.
- A model trained here (its tokenizer trained by cla-jax): every document it saw started with
  bos, so a context is [bos] + encode(context) (add_bos_token=False drops it), rolling windows
  start from bos, max_length is the run's train.seq_len (the longest context it was trained
  on), and generation stops at bos, the document separator.

Either way a context/continuation pair is encoded whole and split where the context's tokens
end, trailing spaces of the context move to the continuation, and a row keeps its last
max_length + 1 tokens; rolling perplexity uses lm_eval's own disjoint windows (context_len 1).
Generation runs through the serving engine's continuous batching (cla_jax.serving) with the
stop strings, max_gen_toks and stop ids.

`hf` below is whether the first convention applies (`uses_hf_conventions`).
"""
from __future__ import annotations

from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

from cla_jax.data.tokenizer import HFModelTokenizer
from cla_jax.errors import UserError


def uses_hf_conventions(tokenizer) -> bool:
    """Whether HFLM's conventions apply: the run's tokenizer is a model's own HF tokenizer."""
    return isinstance(tokenizer, HFModelTokenizer)


def default_max_length(model, train_seq_len: int | None, hf: bool) -> int:
    """HFLM's max_length (the model's max_seq_len) for an HF model; for one trained here, the
    run's train.seq_len (at most max_seq_len)."""
    if hf:
        return model.max_seq_len
    return min(train_seq_len or model.max_seq_len, model.max_seq_len)


def special_ids(tokenizer, hf: bool, vocab_size: int, prefix_token_id=None) -> tuple[int, int]:
    """(prefix token, end-of-text token): HFLM's (the tokenizer's bos else its eos; its
    eos) for an HF tokenizer, else bos for both (the document separator). A given
    prefix_token_id wins."""
    prefix = eot = tokenizer.bos_id
    if hf:
        bos, eos = tokenizer.tokenizer_token_id("bos"), tokenizer.tokenizer_token_id("eos")
        eot = tokenizer.eos_id if eos is None else eos
        prefix = bos if bos is not None else eot
    if prefix_token_id is not None:
        prefix = int(prefix_token_id)
        if not 0 <= prefix < vocab_size:
            raise UserError(f"prefix_token_id={prefix} is not a token id (0..{vocab_size - 1})")
    return prefix, eot


def encode(tokenizer, hf: bool, string: str, add_bos_token: bool | None, prefix_token_id: int,
           add_special_tokens=None, left_truncate_len=None) -> list[int]:
    """HFLM's tok_encode for an HF tokenizer (see the module docstring); the bare ids for
    a model trained here, whose bos the context encoding and the rolling windows put first."""
    ids = tokenizer.encode(string)
    if hf:
        special = add_bos_token if add_special_tokens is None else add_special_tokens
        prefix_text = tokenizer.decode_with_special_tokens([prefix_token_id])  # HFLM's
        if add_special_tokens is None and prefix_text and string.startswith(prefix_text):
            special = False  # the text brings its own bos
        if special is not False:
            ids = tokenizer.encode_with_special_tokens(string)
            bos = tokenizer.tokenizer_token_id("bos")
            if special and bos is not None and ids[:1] != [bos]:
                ids = [bos] + ids  # transformers' add_bos_token=True
    return ids[-left_truncate_len:] if left_truncate_len else ids


def generation_settings(gen_kwargs: dict, max_gen_toks: int, max_length: int,
                        eos_text: str | None) -> tuple[dict, tuple[str, ...], list[str]]:
    """(Request sampling settings, stop strings, the generation arguments left unused) for
    one generate_until request, as HFLM: lm_eval's own normalisation of the arguments,
    `eos_text` (HF conventions: the end-of-text token's text) among the stop strings, and
    max_tokens at most max_length - 1 (a model trained here at 128 tokens still answers a
    task's default 256, where HFLM would stop with an assertion)."""
    kwargs = normalize_gen_kwargs(gen_kwargs, max_gen_toks)
    until = tuple(s for s in handle_stop_sequences(kwargs.pop("until", None), eos_text) if s)
    max_tokens = max(1, min(int(kwargs.pop("max_gen_toks")), max_length - 1))
    do_sample = bool(kwargs.pop("do_sample", False))
    temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
    settings = dict(max_tokens=max_tokens,
                    temperature=(temperature or 1.0) if do_sample else 0.0,
                    top_k=int(kwargs.pop("top_k", 0) or 0),
                    top_p=float(kwargs.pop("top_p", 1.0) or 1.0))
    return settings, until, sorted(kwargs)


def stop_ids(tokenizer, hf: bool) -> tuple[int, ...]:
    """The ids a generation ends at: the model's eos ids (transformers' generate stops at
    generation_config's) for an HF model, the document separator bos for one trained here."""
    return tuple(tokenizer.eos_ids) if hf else tuple(tokenizer.stop_ids)
