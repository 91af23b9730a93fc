"""The cla_jax lm-eval adapter against lm_eval's own HFLM (`--model hf`) on the same weights.

tests/fixtures/lm_eval/make_hflm_outputs.py ran HFLM (lm-eval 0.4.13, transformers, torch) on
two tiny Llamas whose tokenizer files are those of two kinds of real model (GPT-2/SmolLM2-style:
nothing added to a text; Llama 3-style: <|begin_of_text|> added, the tokenizer's eos not the
model's) under four model_args, and kept every request's token ids and results. Here the same
directories go through cla-hf-import, and the adapter must give HFLM's token ids exactly, its
log-likelihoods within float32 round-off (hence its is_greedy and acc), its rolling
log-likelihoods within 1e-4 relative and its generations, with the same model_args.
"""
import json
import os
import pathlib
import tempfile

os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="cla-jax-hf-datasets-"))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

from cla_jax.hf_import import import_checkpoint  # noqa: E402

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "lm_eval"
HFLM = json.loads((FIXTURES / "hflm_outputs.json").read_text())
REQUESTS = HFLM["requests"]
VARIANTS = {"default": {}, "add_bos_token=True": {"add_bos_token": "True"},
            "add_bos_token=False": {"add_bos_token": "False"}, "max_length=24": {"max_length": 24}}


@pytest.fixture(scope="module", params=sorted(HFLM["models"]))
def imported(request, tmp_path_factory):
    """(model name, workdir of its cla-hf-import)."""
    workdir = tmp_path_factory.mktemp(request.param)
    import_checkpoint(FIXTURES / "hf_models" / request.param, workdir)
    return request.param, workdir


def adapter(workdir, **model_args):
    from cla_jax.lm_eval import ClaJaxLM
    return ClaJaxLM(workdir=str(workdir), batch_size=4, cache_dir=str(workdir / "cache"),
                    **model_args)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_request_type_equals_hflm(imported, variant):
    name, workdir = imported
    expected = HFLM["models"][name][variant]
    lm = adapter(workdir, **VARIANTS[variant])
    assert (lm.max_length, lm.prefix_token_id, lm.eot_token_id) == (
        expected["max_length"], expected["prefix_token_id"], expected["eot_token_id"])

    scored = []
    score = lm._loglikelihood_tokens
    lm._loglikelihood_tokens = lambda reqs, *a, **kw: (  # noqa: E731 (records the token ids)
        scored.extend([c, x] for _, c, x in reqs) or score(reqs, *a, **kw))
    pairs = REQUESTS["loglikelihood"]
    results = lm.loglikelihood([Instance("loglikelihood", {}, tuple(p), i)
                                for i, p in enumerate(pairs)])
    lm._loglikelihood_tokens = score
    assert scored == expected["encoded"]
    got, want = np.array([r[0] for r in results]), np.array([r[0] for r in
                                                             expected["loglikelihood"]])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    assert [r[1] for r in results] == [r[1] for r in expected["loglikelihood"]]

    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), i)
                                        for i, text in enumerate(REQUESTS["loglikelihood_rolling"])])
    np.testing.assert_allclose(rolling, expected["loglikelihood_rolling"], rtol=1e-4)

    generated = lm.generate_until([Instance("generate_until", {}, (c, dict(k)), i)
                                   for i, (c, k) in enumerate(REQUESTS["generate_until"])])
    assert generated == expected["generate_until"]


def test_an_imported_model_gets_hf_conventions_and_bad_args_one_error(imported):
    """The HF conventions follow the tokenizer: an imported model gets HFLM's, and its
    prefix is the tokenizer's bos; a bad flag value is one clear error."""
    from cla_jax.errors import UserError
    name, workdir = imported
    lm = adapter(workdir)
    assert lm.hf_conventions and lm.get_model_info()["cla_jax_conventions"] == "hf"
    with pytest.raises(UserError, match="add_bos_token must be True or False"):
        adapter(workdir, add_bos_token="maybe")
    with pytest.raises(UserError, match="prefix_token_id=100000 is not a token id"):
        adapter(workdir, prefix_token_id=100000)


def test_a_context_of_no_tokens_is_refused_not_scored(imported):
    """HFLM asserts on a context that encodes to nothing (a whitespace context whose spaces
    move to the continuation, with a tokenizer that adds no bos); scoring it would give the
    continuation a perfect (0.0, True). The Llama 3-style tokenizer adds bos, so it scores."""
    from cla_jax.errors import UserError
    name, workdir = imported
    lm = adapter(workdir)
    requests = [Instance("loglikelihood", {}, ("   ", "Hello world"), 0)]
    if name == "gpt2_style":
        with pytest.raises(UserError, match="encodes to no tokens"):
            lm.loglikelihood(requests)
    else:
        (logprob, _), = lm.loglikelihood(requests)
        assert logprob < 0


def test_a_text_starting_with_the_prefix_tokens_text_gets_no_bos(tmp_path):
    """HFLM compares a text's start with `tokenizer.decode(prefix_token_id)`, the decoded text
    (" the"), not the vocabulary entry ("Ġthe"): with prefix_token_id=260 on the Llama 3-style
    model, HFLM encoded " the cat" as [260, 220, 66, 270] (no bos: the text brings its own)."""
    workdir = tmp_path / "llama3_style"
    import_checkpoint(FIXTURES / "hf_models" / "llama3_style", workdir)
    lm = adapter(workdir, prefix_token_id=260)
    assert lm.tok_encode(" the cat") == [260, 220, 66, 270]
    assert adapter(workdir).tok_encode(" the cat")[0] == 300  # bos by default
