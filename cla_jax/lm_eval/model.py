"""`ClaJaxLM`: lm_eval's LM over a training run's checkpoint, registered as "cla_jax" on import.

The model_args, and the conventions by which requests become tokens, are in the package's
docstring (`cla_jax.lm_eval`) and `conventions`; the device work is `scoring`'s.
"""
from __future__ import annotations

import collections
import functools
import logging
import os

import jax
import numpy as np
from lm_eval import utils as lm_eval_utils
from lm_eval.api.model import TemplateLM
from tqdm import tqdm

from cla_jax import checkpoint, sharding
from cla_jax.data.corpus import corpus_tokenizer
from cla_jax.errors import UserError
from cla_jax.lm_eval import conventions
from cla_jax.lm_eval.scoring import DEFAULT_CHUNK, IN_FLIGHT, make_scorer, pack_rows
from cla_jax.serving import Batcher, Engine, Request
from cla_jax.serving.engine import bucket_for, buckets
from cla_jax.storage import as_path

MODEL_NAME = "cla_jax"
DEFAULT_BATCH_SIZE = 16
LOG = logging.getLogger(__name__)


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
    """lm_eval's LM over a training run's checkpoint (model_args: see `cla_jax.lm_eval`)."""

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
        self.hf_conventions = conventions.uses_hf_conventions(self.tokenizer)
        self.add_bos_token = _optional_bool(add_bos_token, "add_bos_token")
        train_len = run.config.get("train", {}).get("seq_len")
        default_length = conventions.default_max_length(run.model, train_len,
                                                         self.hf_conventions)
        self._max_length = int(max_length or default_length)
        if not 1 < self._max_length <= run.model.max_seq_len:
            raise UserError(f"max_length must be in [2, model.max_seq_len="
                            f"{run.model.max_seq_len}], got {self._max_length}")
        self._prefix_token_id, self._eot_token_id = conventions.special_ids(
            self.tokenizer, self.hf_conventions, run.model.vocab_size, prefix_token_id)
        shards = sharding.num_batch_shards(self.mesh)
        self.batch_size = -(-_batch_size(batch_size) // shards) * shards  # rows split evenly
        self.cache_dtype, self.max_gen_toks, self.seed = cache_dtype, int(max_gen_toks), seed
        self.buckets = buckets(min(16, self._max_length), self._max_length)
        self._score = make_scorer(run.model, self.mesh, int(loss_chunk_size))
        self._quiet = jax.process_index() != 0
        self._ignored: set[str] = set()  # generation arguments already warned about

    @classmethod
    def create_from_arg_string(cls, arg_string, additional_config=None):
        """model_args win over the CLI's own batch_size (which is 1 unless given)."""
        return cls.create_from_arg_obj(lm_eval_utils.simple_parse_args_string(arg_string),
                                       additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict, additional_config=None):
        """The model from model_args as a dict; `additional_config` fills only what they
        leave unset."""
        extra = {k: v for k, v in (additional_config or {}).items()
                 if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    # --- what lm_eval asks of a model -------------------------------------------------------

    @property
    def max_length(self) -> int:
        """Tokens a scored row sees (its last max_length + 1 are kept)."""
        return self._max_length

    @property
    def eot_token_id(self) -> int:
        """The end-of-text token (`conventions.special_ids`)."""
        return self._eot_token_id

    @property
    def prefix_token_id(self) -> int:
        """The token before an empty context and each rolling window."""
        return self._prefix_token_id

    @property
    def tokenizer_name(self) -> str:
        """The tokenizer's identity, for lm_eval's request cache and results."""
        return self.tokenizer.identity

    def get_model_info(self) -> dict:
        """What lm_eval records of the model in its results."""
        return {"cla_jax_step": self.run.step, "cla_jax_mesh": dict(self.mesh.shape),
                "cla_jax_batch_size": self.batch_size, "max_length": self.max_length,
                "cla_jax_conventions": "hf" if self.hf_conventions else "document",
                "add_bos_token": self.add_bos_token, "prefix_token_id": self.prefix_token_id}

    def tok_encode(self, string: str, add_special_tokens=None, left_truncate_len=None,
                   **kwargs) -> list[int]:
        """HFLM's tok_encode for an HF tokenizer; the bare ids for a model trained here,
        whose bos `_encode_pair` and the rolling windows put first (`conventions.encode`)."""
        return conventions.encode(self.tokenizer, self.hf_conventions, string,
                                  self.add_bos_token, self.prefix_token_id,
                                  add_special_tokens, left_truncate_len)

    def tok_decode(self, tokens, **kwargs) -> str:
        """Token ids -> text."""
        return self.tokenizer.decode(tokens)

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        """lm_eval's loglikelihood, with the progress bar on process 0 only."""
        return super().loglikelihood(requests, disable_tqdm or self._quiet)

    def _encode_pair(self, context: str, continuation: str):
        context_enc, continuation_enc = super()._encode_pair(context, continuation)
        if self.hf_conventions or self.add_bos_token is False:
            return context_enc, continuation_enc
        return [self.tokenizer.bos_id] + context_enc, continuation_enc

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """(request strings or None, context ids, continuation ids) -> (logprob, is_greedy)."""
        rows, num_scored = [], []
        for strings, context_enc, continuation_enc in requests:
            if not context_enc:  # HFLM asserts; scoring the first token from nothing is no score
                context = (strings or ("",))[0]
                raise UserError(f"the context {context!r} encodes to no tokens (its trailing "
                                "spaces moved to the continuation, and this tokenizer adds no "
                                "bos): give the task a context, or add_bos_token=True")
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
        """(prompt ids, Request sampling settings, stop strings) for one request
        (`conventions.generation_settings`), the context cut from the left to leave room for
        max_tokens."""
        eos = self.tokenizer.decode_with_special_tokens([self.eot_token_id]) \
            if self.hf_conventions else None
        settings, until, unused = conventions.generation_settings(
            gen_kwargs, self.max_gen_toks, self.max_length, eos)
        if set(unused) - self._ignored:
            self._ignored |= set(unused)
            LOG.warning("cla_jax ignores these generation arguments: %s", unused)
        max_tokens = settings["max_tokens"]
        if self.hf_conventions:
            prompt = self.tok_encode(context, left_truncate_len=self.max_length - max_tokens)
        else:
            bos = [] if self.add_bos_token is False else [self.tokenizer.bos_id]
            prompt = (bos + self.tok_encode(context))[-(self.max_length - max_tokens):]
        return prompt, settings, until

    @property
    def _stop_ids(self) -> tuple[int, ...]:
        return conventions.stop_ids(self.tokenizer, self.hf_conventions)


def register() -> None:
    """Registers "cla_jax" with lm_eval (by name, so importing this module under two names,
    as `python -m` does, registers the same target)."""
    # lm_eval's built-in names first: its registry loads them only while it is empty.
    import lm_eval.models  # noqa: F401, PLC0415
    from lm_eval.api.registry import model_registry  # noqa: PLC0415
    model_registry.register(MODEL_NAME, target="cla_jax.lm_eval.model:ClaJaxLM")


def main() -> None:
    """lm_eval's command line (`cla-lm-eval`), with the "cla_jax" model registered."""
    from lm_eval.__main__ import cli_evaluate  # noqa: PLC0415
    cli_evaluate()


register()
