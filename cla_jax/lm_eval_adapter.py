"""A cla-jax checkpoint as an lm-evaluation-harness model, "cla_jax": loglikelihood,
loglikelihood_rolling and generate_until.

    cla-lm-eval --model cla_jax --model_args workdir=workdir/demo,batch_size=32 \\
        --include_path tests/fixtures/lm_eval --tasks shakespeare_mc,shakespeare_rolling
    python -m cla_jax.lm_eval_adapter ...        # the same, without the console script

    import cla_jax.lm_eval_adapter, lm_eval      # registers "cla_jax"
    lm_eval.simple_evaluate(model="cla_jax", model_args={"workdir": ...}, tasks=[...])

lm_eval 0.4.13 finds a model only in its own registry (it reads no entry points), so
importing this module registers "cla_jax" and `main` runs lm_eval's own CLI after that.

model_args: workdir (required), step (default: the newest good one), batch_size (rows per
device call, default 16, rounded up to a multiple of the mesh's data x fsdp), max_length
(tokens a row sees), add_bos_token (True/False), prefix_token_id, mesh (e.g.
"fsdp=4;tensor=2": ';' because lm_eval splits model_args on ','; default the run's
config.mesh), cache_dtype (generation's KV cache, default float32), cache_dir (where the run's
tokenizer is), max_gen_toks (default 256), seed (of sampled generations), loss_chunk_size
(positions unembedded at a time, default 128). Multi-host: distributed=True
(jax.distributed.initialize finds the cluster on TPU pods, SLURM, Open MPI, Kubernetes), or
coordinator_address=host:port,num_processes=N,process_id=i.

Requests become tokens by one of two conventions, chosen by the run's tokenizer:

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
Rows go longest first into batches of `batch_size` rows padded to a length bucket (powers of
two up to max_length): one compiled program per bucket. The unembedding and log-softmax run
loss_chunk_size positions at a time, so [rows, max_length, vocab] logits never exist (an
imported 8k-context model's rolling windows would need gigabytes). Padding has segment id 0
and is never scored, whatever its token id. Generation runs through the serving engine's
continuous batching (cla_jax.serving) with the stop strings, max_gen_toks and stop ids.

Multi-host: lm_eval's rank/world_size stay 0/1, so every process gets every request, in the
same order, and computes them all on the global mesh: inputs are replicated, rows split over
the mesh's data axes inside the program, and results come back replicated, so every process
returns the same numbers (and simple_evaluate returns results on each).
"""
from __future__ import annotations

import collections
import functools
import logging
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval import utils as lm_eval_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from tqdm import tqdm

from cla_jax import checkpoint, sharding
from cla_jax.data.corpus import corpus_tokenizer
from cla_jax.data.tokenizer import HFModelTokenizer
from cla_jax.errors import UserError
from cla_jax.model import Transformer
from cla_jax.serving import Batcher, Engine, Request
from cla_jax.serving.engine import bucket_for, buckets
from cla_jax.storage import as_path
from cla_jax.train.loss import unembedding

MODEL_NAME = "cla_jax"
DEFAULT_BATCH_SIZE = 16
DEFAULT_CHUNK = 128  # positions unembedded at a time
IN_FLIGHT = 4  # scoring batches dispatched ahead of the one whose results are read
LOG = logging.getLogger(__name__)


def make_scorer(config, mesh, chunk_size: int = DEFAULT_CHUNK):
    """(params, inputs, targets, segment_ids, scored) [B, L] -> (sum of the scored targets'
    logprobs [B] float32, whether each of them is the argmax [B] bool), replicated. The
    logits are made `chunk_size` positions at a time from the final hidden states."""
    model = Transformer(config)

    def chunk_scores(unembed_DV, hidden_BCD, targets_BC):
        """float32 (target logprob, target is the argmax) [B, C] of one chunk of positions."""
        logits_BCV = jnp.einsum("bcd,dv->bcv", hidden_BCD, unembed_DV.astype(hidden_BCD.dtype),
                                preferred_element_type=jnp.float32)
        target_BC = jnp.take_along_axis(logits_BCV, targets_BC[..., None], -1)[..., 0]
        logz_BC = jax.nn.logsumexp(logits_BCV, axis=-1)
        return target_BC - logz_BC, jnp.argmax(logits_BCV, -1) == targets_BC

    def score(params, inputs_BL, targets_BL, segment_ids_BL, scored_BL):
        with sharding.activate(mesh):
            rows = lambda x: sharding.constrain(x, ("batch", "length"))  # noqa: E731
            inputs_BL, targets_BL, segment_ids_BL, scored_BL = map(
                rows, (inputs_BL, targets_BL, segment_ids_BL, scored_BL))
            positions_BL = jnp.broadcast_to(jnp.arange(inputs_BL.shape[1]), inputs_BL.shape)
            hidden_BLD, _ = model.apply({"params": params}, inputs_BL, positions_BL,
                                        segment_ids_BL, return_hidden=True)
            b, length, d = hidden_BLD.shape
            c = min(chunk_size or length, length)  # buckets are powers of two: c divides
            by_chunk = lambda x: x.reshape(b, length // c, c, *x.shape[2:]).swapaxes(0, 1)  # noqa: E731
            logprob_NBC, greedy_NBC = jax.lax.map(
                lambda xs: chunk_scores(unembedding(config, params), *xs),
                (by_chunk(hidden_BLD), by_chunk(targets_BL)))
            scored_NBC = by_chunk(scored_BL)
            sums_B = jnp.sum(jnp.where(scored_NBC, logprob_NBC, 0.0), axis=(0, 2))
            greedy_B = jnp.all(~scored_NBC | greedy_NBC, axis=(0, 2))
            whole = lambda x: sharding.constrain(x, (None,))  # noqa: E731 (every process)
            return whole(sums_B), whole(greedy_B)

    return jax.jit(score, out_shardings=sharding.replicated(mesh))


def pack_rows(rows, num_scored, batch_size: int, length: int):
    """Rows of tokens, each scored on its last num_scored targets -> (inputs, targets,
    segment_ids, scored) [batch_size, length]; padding (columns and whole rows) has segment
    id 0 and is never scored, whatever its token id."""
    inputs = np.zeros((batch_size, length), np.int32)
    targets = np.zeros((batch_size, length), np.int32)
    segment_ids = np.zeros((batch_size, length), np.int32)
    scored = np.zeros((batch_size, length), bool)
    for b, (row, num) in enumerate(zip(rows, num_scored)):
        n = len(row) - 1
        inputs[b, :n], targets[b, :n], segment_ids[b, :n] = row[:-1], row[1:], 1
        scored[b, n - num:n] = True
    return inputs, targets, segment_ids, scored


def _batch_size(value) -> int:
    if value is None or (isinstance(value, str) and value.startswith("auto")):
        return DEFAULT_BATCH_SIZE  # no OOM probing here: give a number to change it
    if int(value) < 1:
        raise UserError(f"batch_size must be >= 1, got {value!r}")
    return int(value)


def _optional_bool(value, name: str) -> bool | None:
    """A model_args flag: lm_eval passes "True"/"False" through as bools, other text as is."""
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "false", "none"):
        return {"true": True, "false": False, "none": None}[text]
    raise UserError(f"{name} must be True or False, got {value!r}")


def _mesh_spec(mesh):
    if mesh is None or isinstance(mesh, (dict, jax.sharding.Mesh)):
        return mesh
    return sharding.parse_mesh(str(mesh).replace(";", ","))


class ClaJaxLM(TemplateLM):
    """lm_eval's LM over a training run's checkpoint (see the module docstring)."""

    def __init__(self, workdir=None, step=None, batch_size=None, max_length=None, mesh=None,
                 cache_dtype="float32", cache_dir="~/.cache/cla-jax", max_gen_toks=256,
                 seed=0, add_bos_token=None, prefix_token_id=None,
                 loss_chunk_size=DEFAULT_CHUNK, distributed=False, coordinator_address=None,
                 num_processes=None, process_id=None, max_batch_size=None, device=None):
        super().__init__()
        del max_batch_size, device  # lm_eval passes them to every model; rows fit no GPU id
        if workdir is None:
            raise UserError("the cla_jax model needs --model_args workdir=<a training run>")
        if (distributed or coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")) \
                and not jax.distributed.is_initialized():
            jax.distributed.initialize(coordinator_address, num_processes, process_id)
        run = checkpoint.restore_model(workdir, step, _mesh_spec(mesh))
        self.run, self.params, self.mesh = run, run.params, run.mesh
        self.tokenizer = corpus_tokenizer(run.config.data, as_path(cache_dir).expanduser(),
                                          max_vocab_size=run.model.vocab_size)
        # HFLM's conventions for a model with its own HF tokenizer, else a model trained here.
        self.hf_conventions = isinstance(self.tokenizer, HFModelTokenizer)
        self.add_bos_token = _optional_bool(add_bos_token, "add_bos_token")
        train_len = run.config.get("train", {}).get("seq_len")
        default_length = run.model.max_seq_len if self.hf_conventions else \
            min(train_len or run.model.max_seq_len, run.model.max_seq_len)
        self._max_length = int(max_length or default_length)
        if not 1 < self._max_length <= run.model.max_seq_len:
            raise UserError(f"max_length must be in [2, model.max_seq_len="
                            f"{run.model.max_seq_len}], got {self._max_length}")
        self._prefix_token_id, self._eot_token_id = self._special_ids(prefix_token_id)
        shards = sharding.num_batch_shards(self.mesh)
        self.batch_size = -(-_batch_size(batch_size) // shards) * shards  # rows split evenly
        self.cache_dtype, self.max_gen_toks, self.seed = cache_dtype, int(max_gen_toks), seed
        self.buckets = buckets(min(16, self._max_length), self._max_length)
        self._score = make_scorer(run.model, self.mesh, int(loss_chunk_size))
        self._quiet = jax.process_index() != 0
        self._ignored: set[str] = set()  # generation arguments already warned about

    def _special_ids(self, prefix_token_id) -> tuple[int, int]:
        """(prefix token, end-of-text token): HFLM's (the tokenizer's bos else its eos; its
        eos) for an HF tokenizer, else bos for both (the document separator)."""
        tokenizer, vocab = self.tokenizer, self.run.model.vocab_size
        prefix = eot = tokenizer.bos_id
        if self.hf_conventions:
            bos, eos = tokenizer.tokenizer_token_id("bos"), tokenizer.tokenizer_token_id("eos")
            eot = tokenizer.eos_id if eos is None else eos
            prefix = bos if bos is not None else eot
        if prefix_token_id is not None:
            prefix = int(prefix_token_id)
            if not 0 <= prefix < vocab:
                raise UserError(f"prefix_token_id={prefix} is not a token id (0..{vocab - 1})")
        return prefix, eot

    @classmethod
    def create_from_arg_string(cls, arg_string, additional_config=None):
        """model_args win over the CLI's own batch_size (which is 1 unless given)."""
        return cls.create_from_arg_obj(lm_eval_utils.simple_parse_args_string(arg_string),
                                       additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict, additional_config=None):
        extra = {k: v for k, v in (additional_config or {}).items()
                 if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    # --- what lm_eval asks of a model -------------------------------------------------------

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def eot_token_id(self) -> int:
        return self._eot_token_id

    @property
    def prefix_token_id(self) -> int:
        return self._prefix_token_id

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.identity

    def get_model_info(self) -> dict:
        return {"cla_jax_step": self.run.step, "cla_jax_mesh": dict(self.mesh.shape),
                "cla_jax_batch_size": self.batch_size, "max_length": self.max_length,
                "cla_jax_conventions": "hf" if self.hf_conventions else "document",
                "add_bos_token": self.add_bos_token, "prefix_token_id": self.prefix_token_id}

    def tok_encode(self, string: str, add_special_tokens=None, left_truncate_len=None,
                   **kwargs) -> list[int]:
        """HFLM's tok_encode for an HF tokenizer (see the module docstring); the bare ids for
        a model trained here, whose bos `_encode_pair` and the rolling windows put first."""
        ids = self.tokenizer.encode(string)
        if self.hf_conventions:
            special = self.add_bos_token if add_special_tokens is None else add_special_tokens
            prefix_text = self.tokenizer.token_text(self.prefix_token_id)
            if add_special_tokens is None and prefix_text and string.startswith(prefix_text):
                special = False  # the text brings its own bos
            if special is not False:
                ids = self.tokenizer.encode_with_special_tokens(string)
                bos = self.tokenizer.tokenizer_token_id("bos")
                if special and bos is not None and ids[:1] != [bos]:
                    ids = [bos] + ids  # transformers' add_bos_token=True
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.tokenizer.decode(tokens)

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return super().loglikelihood(requests, disable_tqdm or self._quiet)

    def _encode_pair(self, context: str, continuation: str):
        context_enc, continuation_enc = super()._encode_pair(context, continuation)
        if self.hf_conventions or self.add_bos_token is False:
            return context_enc, continuation_enc
        return [self.tokenizer.bos_id] + context_enc, continuation_enc

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """(request strings or None, context ids, continuation ids) -> (logprob, is_greedy)."""
        rows, num_scored = [], []
        for _, context_enc, continuation_enc in requests:
            if not 0 < len(continuation_enc) <= self.max_length:
                raise UserError(f"a continuation of {len(continuation_enc)} tokens cannot be "
                                f"scored with max_length {self.max_length}")
            rows.append((context_enc + continuation_enc)[-(self.max_length + 1):])
            num_scored.append(len(continuation_enc))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))  # HFLM's: longest first
        results = [None] * len(rows)
        pending = collections.deque()
        progress = tqdm(total=len(rows), desc="Running loglikelihood requests",
                        disable=disable_tqdm or self._quiet)

        def collect():
            chunk, (sums, greedy) = pending.popleft()
            sums, greedy = np.asarray(sums), np.asarray(greedy)  # one host copy per batch
            for b, i in enumerate(chunk):
                results[i] = (float(sums[b]), bool(greedy[b]))
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
            progress.update(len(chunk))

        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            length = bucket_for(len(rows[chunk[0]]) - 1, self.buckets)
            batch = pack_rows([rows[i] for i in chunk], [num_scored[i] for i in chunk],
                              self.batch_size, length)
            inputs = jax.device_put(batch, sharding.replicated(self.mesh))
            pending.append((chunk, self._score(self.params, *inputs)))
            if len(pending) > IN_FLIGHT:
                collect()
        while pending:
            collect()
        progress.close()
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's logprob over lm_eval's disjoint windows of max_length, summed."""
        windows, owners = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            pairs = lm_eval_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)
            for context_enc, continuation_enc in map(lm_eval_utils.make_disjoint_window, pairs):
                windows.append((None, context_enc, continuation_enc))
                owners.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[i] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continuations through the serving engine's continuous batching, cut at the first
        stop string (lm_eval's `until`), a stop id, or max_gen_toks."""
        prepared = [self._generation(*request.args[:2]) for request in requests]
        longest = max((len(p) + s["max_tokens"] for p, s, _ in prepared), default=1)
        batcher = Batcher(self._engine(bucket_for(longest, self.buckets)), self.tokenizer.decode)
        handles = [batcher.submit(Request(prompt=prompt, seed=self.seed + i,
                                          stop_ids=self._stop_ids, stop=until, **settings))
                   for i, (prompt, settings, until) in enumerate(prepared)]
        progress = tqdm(total=len(handles), desc="Running generate_until requests",
                        disable=disable_tqdm or self._quiet)
        while batcher.step_once():
            progress.update(sum(h.done() for h in handles) - progress.n)
        progress.update(len(handles) - progress.n)
        progress.close()
        texts = [handle.result().text for handle in handles]  # cut before the first stop
        for request, text in zip(requests, texts):
            self.cache_hook.add_partial("generate_until", request.args[:2], text)
        return texts

    # --- generation --------------------------------------------------------------------------

    @functools.lru_cache(maxsize=2)  # noqa: B019 (one adapter per evaluation)
    def _engine(self, max_length: int) -> Engine:
        """A serving engine whose slots hold `max_length` tokens: the bucket of the longest
        prompt + max_gen_toks of a call, not the model's max_length (an 8k-context model's
        slots would reserve gigabytes for 100-token questions)."""
        return Engine(self.run.model, self.params, num_slots=self.batch_size,
                      max_length=max_length, cache_dtype=self.cache_dtype, mesh=self.mesh)

    def _generation(self, context: str, gen_kwargs: dict):
        """(prompt ids, Request sampling settings, stop strings) for one request, as HFLM:
        lm_eval's own normalisation of the generation arguments, the end-of-text token's text
        among the stop strings (HF conventions), the context cut from the left to leave room
        for max_gen_toks (at most max_length - 1: a model trained here at 128 tokens still
        answers a task's default 256, where HFLM would stop with an assertion)."""
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        eos = self.tokenizer.token_text(self.eot_token_id) if self.hf_conventions else None
        until = tuple(s for s in handle_stop_sequences(kwargs.pop("until", None), eos) if s)
        max_tokens = max(1, min(int(kwargs.pop("max_gen_toks")), self.max_length - 1))
        do_sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        settings = dict(max_tokens=max_tokens,
                        temperature=(temperature or 1.0) if do_sample else 0.0,
                        top_k=int(kwargs.pop("top_k", 0) or 0),
                        top_p=float(kwargs.pop("top_p", 1.0) or 1.0))
        if set(kwargs) - self._ignored:
            self._ignored |= set(kwargs)
            LOG.warning("cla_jax ignores these generation arguments: %s", sorted(kwargs))
        if self.hf_conventions:
            prompt = self.tok_encode(context, left_truncate_len=self.max_length - max_tokens)
        else:
            bos = [] if self.add_bos_token is False else [self.tokenizer.bos_id]
            prompt = (bos + self.tok_encode(context))[-(self.max_length - max_tokens):]
        return prompt, settings, until

    @property
    def _stop_ids(self) -> tuple[int, ...]:
        """The ids a generation ends at: the model's eos ids (transformers' generate stops at
        generation_config's) for an HF model, the document separator bos for one trained
        here."""
        return tuple(self.tokenizer.eos_ids) if self.hf_conventions else \
            tuple(self.tokenizer.stop_ids)


def register() -> None:
    """Registers "cla_jax" with lm_eval (by name, so importing this module twice, as
    `python -m` does, registers the same target)."""
    # lm_eval's built-in names first: its registry loads them only while it is empty.
    import lm_eval.models  # noqa: F401, PLC0415
    from lm_eval.api.registry import model_registry  # noqa: PLC0415
    model_registry.register(MODEL_NAME, target="cla_jax.lm_eval_adapter:ClaJaxLM")


def main() -> None:
    """lm_eval's command line, with the "cla_jax" model registered."""
    from lm_eval.__main__ import cli_evaluate  # noqa: PLC0415
    cli_evaluate()


register()

if __name__ == "__main__":
    sys.exit(main())
