"""The ``openai`` oracle against a fake OpenAI-compatible server on 127.0.0.1."""

import dataclasses
import logging
import math
import time
from email.utils import formatdate
from pathlib import Path

import numpy as np
import pytest
from fake_openai import FakeOpenAI, closed_port_url, decode_data_url, request_parts

from gem.interfaces import BuildContext, ImageDataset
from gem.score_cache import ScoreCache
from gem.scoring import score_images
from gem.plugins import Registry, make_plugin_manager
from gem.recipe import RecipeError, validate_recipe
from gem_plugins import openai_oracle
from gem_plugins.openai_oracle import OpenAIOracle, OpenAIOracleOptions, OracleError, parse_retry_after
from gem_plugins.prompts import PROMPT_VERSION

ATTRS = ["brightness", "redness", "size"]
KEY = "sk-test-5ecr3t-DO-NOT-LEAK-0123456789"
FAST = dict(backoff_base=0.001, backoff_max=0.01, timeout=5.0)


def image_scorer(attribute, image):
    """The fake model's answer: attribute k of an image is its channel k at pixel (0, 0) // 51."""
    return int(image[0, 0, ATTRS.index(attribute)]) // 51


def make_images(n, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 16, 16, 3), dtype=np.uint8)
    truth = rng.integers(0, 6, size=(n, 3))
    images[:, 0, 0, :] = np.minimum(truth * 51 + rng.integers(0, 51, size=(n, 3)), 255)
    return images, truth.astype(float)


@pytest.fixture
def server():
    with FakeOpenAI(ATTRS, image_scorer) as fake:
        yield fake


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv("GEM_TEST_OPENAI_KEY", KEY)
    return "GEM_TEST_OPENAI_KEY"


@pytest.fixture
def make_oracle(server, key):
    made = []

    def make(context_dir=None, **overrides):
        # No hedging unless a test asks for it: on a busy machine one slow fake reply would add a
        # request to the exact counts these tests check.
        options = OpenAIOracleOptions(**{"model": "fake-vision", "base_url": server.base_url, "api_key_env": key,
                                         "max_concurrency": 1, "hedge_factor": None, **FAST, **overrides})
        folder = Path(context_dir) if context_dir is not None else None
        oracle = OpenAIOracle(options, BuildContext(seed=0, run_dir=Path("."), cache_dir=folder) if folder else None)
        made.append(oracle)
        return oracle

    yield make
    for oracle in made:
        oracle.close()


def openai_registry():
    registry = Registry(make_plugin_manager())
    if "openai" not in registry.names("oracle"):  # not yet declared as an entry point
        registry = Registry(make_plugin_manager(extra_plugins=(openai_oracle,)))
    return registry


# -- end to end ------------------------------------------------------------------------------

@pytest.mark.parametrize("mode, per_image", [("per_image", 1), ("per_attribute", len(ATTRS))])
def test_scores_end_to_end(make_oracle, server, mode, per_image):
    images, truth = make_images(5)
    oracle = make_oracle(prompt_mode=mode, max_concurrency=3)
    scores = oracle.score(images, np.arange(5), ATTRS)
    np.testing.assert_array_equal(scores, truth)
    assert len(server.requests) == 5 * per_image
    stats = oracle.stats()
    assert stats["requests"] == 5 * per_image
    assert stats["retries"] == stats["failures"] == stats["rate_limited"] == stats["budget_exhausted"] == 0
    assert stats["prompt_tokens"] == 100 * 5 * per_image and stats["completion_tokens"] == 5 * 5 * per_image
    assert oracle.cache_key == f"openai/fake-vision/{mode}/{PROMPT_VERSION}"


def test_request_carries_the_image_and_the_prompt(make_oracle, server):
    images, _ = make_images(2)
    oracle = make_oracle(prompt_mode="per_attribute", temperature=0.0)
    oracle.score(images, np.arange(2), ATTRS)
    seen = {}
    for record in server.requests:
        assert record["path"] == "/v1/chat/completions"
        body = record["body"]
        assert body["model"] == "fake-vision" and body["temperature"] == 0.0 and body["max_tokens"] >= 1
        text, urls = request_parts(body)
        assert len(urls) == 1 and urls[0].startswith("data:image/png;base64,")
        named = [a for a in ATTRS if f'"{a}"' in text]
        assert len(named) == 1 and f"Attribute: {named[0]}" in text and "0 to 5" in text
        pixels = decode_data_url(urls[0])
        row = next(i for i in range(2) if np.array_equal(pixels, images[i]))  # lossless PNG, same pixels
        seen.setdefault(row, set()).add(named[0])
    assert seen == {0: set(ATTRS), 1: set(ATTRS)}


def test_per_image_prompt_names_all_attributes(make_oracle, server):
    images, _ = make_images(1)
    make_oracle().score(images, np.arange(1), ATTRS)
    text, urls = request_parts(server.requests[0]["body"])
    assert all(f'"{a}"' in text for a in ATTRS) and "JSON" in text and "0 to 5" in text
    assert np.array_equal(decode_data_url(urls[0]), images[0])


def test_jpeg_images(make_oracle, server):
    images, _ = make_images(1)
    make_oracle(image_format="jpeg", image_detail="low").score(images, np.arange(1), ATTRS)
    part = server.requests[0]["body"]["messages"][0]["content"][1]
    assert part["image_url"]["url"].startswith("data:image/jpeg;base64,") and part["image_url"]["detail"] == "low"
    assert decode_data_url(part["image_url"]["url"]).shape == images[0].shape


def test_concurrency_is_bounded(make_oracle, server):
    server.default, server.slow_seconds = "slow", 0.1
    images, truth = make_images(6)
    scores = make_oracle(max_concurrency=2).score(images, np.arange(6), ATTRS)
    np.testing.assert_array_equal(scores, truth)
    assert server.max_in_flight == 2


def test_pipeline_score_images(make_oracle):
    images, truth = make_images(7)
    dataset = ImageDataset(images=images, attributes=list(ATTRS))
    scores, _ = score_images(make_oracle(max_concurrency=4), dataset, np.arange(7), batch_size=3, show_progress=False)
    np.testing.assert_array_equal(scores, truth)


# -- the API key -------------------------------------------------------------------------------

def test_authorization_header_and_the_key_stays_secret(make_oracle, server, caplog):
    caplog.set_level(logging.DEBUG)
    images, _ = make_images(1)
    oracle = make_oracle()
    server.script(["500", "401"])
    with pytest.raises(OracleError) as info:
        oracle.score(images, np.arange(1), ATTRS)
    assert "401" in str(info.value) and server.base_url in str(info.value)
    assert all(r["headers"]["Authorization"] == f"Bearer {KEY}" for r in server.requests)
    for text in (repr(oracle), str(oracle), repr(oracle.options), str(oracle.stats()), oracle.cache_key,
                 str(info.value), caplog.text, repr(vars(oracle)), repr(dataclasses.asdict(oracle.options))):
        assert KEY not in text


@pytest.mark.parametrize("env", [None, ""])
def test_no_key_for_a_local_server(server, env):
    images, truth = make_images(2)
    oracle = OpenAIOracle(OpenAIOracleOptions(base_url=server.base_url, api_key_env=env, **FAST))
    try:
        np.testing.assert_array_equal(oracle.score(images, np.arange(2), ATTRS), truth)
    finally:
        oracle.close()
    assert all("Authorization" not in r["headers"] for r in server.requests)


@pytest.mark.parametrize("value", [None, "", "   "])
def test_missing_key_is_an_error_at_build(monkeypatch, tmp_path, value):
    if value is None:
        monkeypatch.delenv("GEM_TEST_MISSING_KEY", raising=False)
    else:
        monkeypatch.setenv("GEM_TEST_MISSING_KEY", value)
    reg = openai_registry().get("oracle", "openai")
    options = reg.options(api_key_env="GEM_TEST_MISSING_KEY")
    with pytest.raises(OracleError, match="GEM_TEST_MISSING_KEY") as info:
        reg.build(options, BuildContext(seed=0, run_dir=tmp_path, cache_dir=tmp_path))
    assert "unset or empty" in str(info.value)


def test_a_key_pasted_into_api_key_env_is_refused_without_echo():
    with pytest.raises(ValueError, match="NAME of an environment variable") as info:
        OpenAIOracleOptions(api_key_env=KEY)
    assert KEY not in str(info.value)


def test_recipe_validation(tmp_path):
    registry = openai_registry()
    recipe = validate_recipe({"oracle": {"plugin": "openai", "api_key_env": None, "base_url": "http://localhost:8000/v1",
                                         "model": "llava", "prompt_mode": "per_attribute", "max_requests": 100,
                                         "image_detail": "low", "timeout": 30}}, registry)
    opts = recipe.plugin_options["oracle"]
    assert opts.api_key_env is None and opts.max_requests == 100 and opts.prompt_mode == "per_attribute"
    assert recipe.to_dict()["oracle"]["max_concurrency"] == 8
    with pytest.raises(RecipeError, match="prompt_mode"):
        validate_recipe({"oracle": {"plugin": "openai", "prompt_mode": "batch"}}, registry)
    with pytest.raises(RecipeError, match="max_concurrency"):
        validate_recipe({"oracle": {"plugin": "openai", "max_concurrency": 0}}, registry)


def test_defaults():
    o = OpenAIOracleOptions()
    assert (o.model, o.base_url, o.api_key_env, o.prompt_mode, o.temperature, o.timeout, o.max_concurrency,
            o.max_requests, o.max_retries, o.image_format, o.backoff_base, o.backoff_max) == \
        ("gpt-4o", "https://api.openai.com/v1", "OPENAI_API_KEY", "per_image", 0.0, 60.0, 8, None, 5, "png", 1.0, 60.0)


# -- failures ----------------------------------------------------------------------------------

def test_429_honours_retry_after_then_succeeds(make_oracle, server):
    server.retry_after = "0.15"
    server.script(["429", "429"])
    images, truth = make_images(1)
    oracle = make_oracle(backoff_max=5.0)
    started = time.perf_counter()
    np.testing.assert_array_equal(oracle.score(images, np.arange(1), ATTRS), truth)
    assert time.perf_counter() - started >= 0.3  # two waits of Retry-After, not the 1 ms backoff
    stats = oracle.stats()
    assert (stats["requests"], stats["retries"], stats["rate_limited"], stats["failures"]) == (3, 2, 2, 0)


def test_retry_after_is_capped(make_oracle, server):
    server.retry_after = "3600"
    server.script(["429"])
    images, truth = make_images(1)
    started = time.perf_counter()
    np.testing.assert_array_equal(make_oracle(backoff_max=0.05).score(images, np.arange(1), ATTRS), truth)
    assert time.perf_counter() - started < 2


def test_parse_retry_after():
    now = time.time()
    assert parse_retry_after("3") == 3.0 and parse_retry_after("0.5") == 0.5
    assert parse_retry_after(formatdate(now + 10, usegmt=True), now=now) == pytest.approx(10, abs=1)
    assert parse_retry_after(formatdate(now - 10, usegmt=True), now=now) == 0.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


def test_backoff_grows_with_jitter_and_is_capped():
    oracle = OpenAIOracle(OpenAIOracleOptions(api_key_env=None, backoff_base=1.0, backoff_max=60.0))
    try:
        for attempt, cap in [(0, 1), (1, 2), (3, 8), (10, 60)]:
            delays = [oracle._delay(attempt, None) for _ in range(50)]
            assert all(cap / 2 <= d <= cap for d in delays) and len(set(delays)) > 1
        assert oracle._delay(0, 7.0) == 7.0 and oracle._delay(0, 600.0) == 60.0
    finally:
        oracle.close()


def test_500_then_success(make_oracle, server):
    server.script(["500"])
    images, truth = make_images(2)
    oracle = make_oracle()
    np.testing.assert_array_equal(oracle.score(images, np.arange(2), ATTRS), truth)
    stats = oracle.stats()
    assert (stats["requests"], stats["retries"], stats["server_errors"], stats["failures"]) == (3, 1, 1, 0)


def test_500_after_max_retries_is_missing(make_oracle, server):
    server.script(["500"] * 3)  # every try of the image (max_retries=2)
    images, truth = make_images(2)
    oracle = make_oracle(max_retries=2)
    assert np.isnan(oracle.score(images[:1], np.arange(1), ATTRS)).all()
    np.testing.assert_array_equal(oracle.score(images[1:], np.arange(1), ATTRS)[0], truth[1])
    stats = oracle.stats()
    assert (stats["requests"], stats["retries"], stats["server_errors"], stats["failures"]) == (4, 2, 3, 3)


def test_timeout_then_success_and_timeout_exhausted(make_oracle, server):
    server.slow_seconds = 0.5
    images, truth = make_images(2)
    oracle = make_oracle(timeout=0.1, max_retries=1)
    server.script(["slow", "ok"])
    np.testing.assert_array_equal(oracle.score(images[:1], np.arange(1), ATTRS)[0], truth[0])  # timed out once
    server.script(["slow", "slow"])
    assert np.isnan(oracle.score(images[1:], np.arange(1), ATTRS)).all()  # timed out on both tries: missing
    stats = oracle.stats()
    assert (stats["requests"], stats["retries"], stats["transport_errors"], stats["failures"]) == (4, 2, 3, 3)


@pytest.mark.parametrize("mode", ["per_image", "per_attribute"])
@pytest.mark.parametrize("bad", ["garbage", "out_of_range"])
def test_invalid_replies_are_retried_then_missing(make_oracle, server, bad, mode):
    images, truth = make_images(1)
    oracle = make_oracle(prompt_mode=mode, max_retries=2)
    server.script([bad])
    np.testing.assert_array_equal(oracle.score(images, np.arange(1), ATTRS), truth)  # retried, then valid
    assert oracle.stats()["invalid_replies"] == 1 and oracle.stats()["failures"] == 0
    server.default = bad
    scores = oracle.score(images, np.arange(1), ATTRS)
    assert np.isnan(scores).all()  # NaN, never 0
    stats = oracle.stats()
    calls = 1 if mode == "per_image" else len(ATTRS)
    assert stats["failures"] == len(ATTRS)
    assert stats["invalid_replies"] == 1 + 3 * calls and stats["retries"] == 1 + 2 * calls


def test_unreachable_server_fails_before_the_first_paid_request(key):
    url = closed_port_url()
    oracle = OpenAIOracle(OpenAIOracleOptions(base_url=url, api_key_env=key, max_retries=5, **FAST))
    images, _ = make_images(2)
    start = time.monotonic()
    try:
        with pytest.raises(OracleError, match=r"cannot reach http://127\.0\.0\.1:\d+/v1: Connection refused "
                                              r"\(GET http://127\.0\.0\.1:\d+/v1/models before scoring") as info:
            oracle.score(images, np.arange(2), ATTRS)
        assert time.monotonic() - start < 5
        assert KEY not in str(info.value)
        assert oracle.stats()["requests"] == 0
    finally:
        oracle.close()


def test_a_server_lost_mid_run_raises_naming_the_url(key):
    url = closed_port_url()
    oracle = OpenAIOracle(OpenAIOracleOptions(base_url=url, api_key_env=key, max_retries=1, preflight=False, **FAST))
    images, _ = make_images(2)
    try:
        with pytest.raises(OracleError, match=r"cannot reach http://127\.0\.0\.1:\d+/v1/chat/completions: "
                                              r"Connection refused") as info:
            oracle.score(images, np.arange(2), ATTRS)
        assert KEY not in str(info.value)
        stats = oracle.stats()
        assert 2 <= stats["transport_errors"] <= stats["requests"] <= 4
    finally:
        oracle.close()


@pytest.mark.parametrize("mode", ["per_image", "per_attribute"])
def test_budget_stops_requests_and_records_missing(make_oracle, server, mode):
    images, truth = make_images(4)
    oracle = make_oracle(prompt_mode=mode, max_requests=3)
    with pytest.warns(RuntimeWarning, match="max_requests=3"):
        scores = oracle.score(images, np.arange(4), ATTRS)
    assert len(server.requests) == 3
    scored = ~np.isnan(scores)
    assert scored.sum() == (9 if mode == "per_image" else 3)
    np.testing.assert_array_equal(scores[scored], truth[scored])
    stats = oracle.stats()
    assert stats["requests"] == 3 and stats["budget_exhausted"] == 12 - scored.sum() and stats["failures"] == 0
    assert any("max_requests=3" in note for note in oracle.notes)
    assert np.isnan(oracle.score(images, np.arange(4), ATTRS)).all()  # nothing more is sent
    assert len(server.requests) == 3 and oracle.stats()["budget_exhausted"] == 24 - scored.sum()


# -- streaming scheduler --------------------------------------------------------------------------

def test_a_partial_json_reply_is_used_and_only_the_rest_is_asked(make_oracle, server):
    images, truth = make_images(1)
    oracle = make_oracle(prompt_mode="per_image")
    server.script(["partial"])  # the first reply holds only the first attribute
    np.testing.assert_array_equal(oracle.score(images, np.arange(1), ATTRS), truth)
    assert len(server.requests) == 2
    text, _ = request_parts(server.requests[1]["body"])
    assert [a for a in ATTRS if f'"{a}"' in text] == ATTRS[1:]  # the re-ask names only the missing ones
    assert oracle.stats()["invalid_replies"] == 1


def test_systematically_unreadable_replies_stop_early_with_an_example(make_oracle, server):
    server.default = "garbage"
    images, _ = make_images(40)
    oracle = make_oracle(max_retries=5, max_concurrency=4)
    with pytest.raises(OracleError, match=r"16 of the first 16 replies of model 'fake-vision' hold no score that "
                                          r"can be read; expected a JSON object .*one reply was: 'I am sorry"):
        oracle.score(images, np.arange(40), ATTRS)
    assert len(server.requests) <= 16 + 4  # not 40 images x 6 tries


def test_a_slow_straggler_is_hedged_and_the_first_answer_kept(make_oracle, server):
    images, truth = make_images(12)
    server.slow_seconds = 3.0
    server.script(["ok"] * 10 + ["slow"])  # the 11th request would take 3 s
    oracle = make_oracle(max_concurrency=1, hedge_factor=4.0)
    oracle._latency.floor = 0.2  # the default floor (1 s) would make this test slower
    start = time.monotonic()
    np.testing.assert_array_equal(oracle.score(images, np.arange(12), ATTRS), truth)
    assert time.monotonic() - start < 2.5
    stats = oracle.stats()
    assert stats["hedged"] == 1 and stats["requests"] == 13 and stats["retries"] == 0


def test_no_hedging_when_hedge_factor_is_null(make_oracle, server):
    images, truth = make_images(12)
    server.slow_seconds = 0.6
    server.script(["ok"] * 10 + ["slow"])
    oracle = make_oracle(max_concurrency=1, hedge_factor=None)
    oracle._latency.floor = 0.2
    np.testing.assert_array_equal(oracle.score(images, np.arange(12), ATTRS), truth)
    assert oracle.stats()["hedged"] == 0 and oracle.stats()["requests"] == 12


def test_concurrency_backs_off_on_429_and_every_score_arrives(make_oracle, server):
    server.capacity, server.slow_seconds, server.default = 2, 0.05, "slow"
    images, truth = make_images(30)
    oracle = make_oracle(max_concurrency=16, max_retries=20, backoff_max=0.2)
    np.testing.assert_array_equal(oracle.score(images, np.arange(30), ATTRS), truth)
    assert oracle._concurrency.rejections >= 1 and oracle._concurrency.limit < 16
    assert server.max_in_flight == 2 and oracle.stats()["rate_limited"] >= 1


def test_adaptive_concurrency_starts_small_lands_on_what_the_server_took_and_probes_for_more():
    from gem_plugins.request_scheduler import AdaptiveConcurrency

    assert AdaptiveConcurrency(4).limit == 4
    limit = AdaptiveConcurrency(64, start=8)
    assert limit.limit == 8
    for _ in range(24):  # slow start: one more per answer, doubling every round
        limit.on_success()
    assert limit.limit == 32
    for _ in range(24):  # 32 sent, 24 turned away: the server took 8
        limit.on_overload()
    assert limit.limit == 8
    for _ in range(4 * 8 + 2):  # from now on one more every four rounds of answers
        limit.on_success()
    assert limit.limit == 9
    limit.probing = False  # every request sent: a probe would only delay the last answers
    for _ in range(100):
        limit.on_success()
    assert limit.limit == 9
    limit.probing = True
    for _ in range(20):
        limit.on_overload()
    assert limit.limit == 1  # never below one
    for _ in range(20000):
        limit.on_success()
    assert limit.limit == 64  # never above max_concurrency


def test_preflight_is_one_free_request_and_a_rejected_key_stops_at_once(make_oracle, server):
    images, truth = make_images(2)
    oracle = make_oracle()
    np.testing.assert_array_equal(oracle.score(images, np.arange(2), ATTRS), truth)
    oracle.score(images, np.arange(2), ATTRS)
    assert server.model_lists == 1 and oracle.stats()["requests"] == 4  # not counted, asked once
    server.models_status = 401
    with pytest.raises(OracleError, match="/v1/models answered HTTP 401"):
        make_oracle().score(images, np.arange(2), ATTRS)
    assert len(server.requests) == 4


def test_a_server_without_a_model_list_is_fine_and_an_unlisted_model_is_a_warning(make_oracle, server, caplog):
    images, truth = make_images(1)
    server.models_status = 404
    np.testing.assert_array_equal(make_oracle().score(images, np.arange(1), ATTRS), truth)
    server.models_status, server.models = 200, ["other-model"]
    with caplog.at_level(logging.WARNING, logger="gem.oracle.openai"):
        make_oracle().score(images, np.arange(1), ATTRS)
    assert "does not list model 'fake-vision' (it lists other-model)" in caplog.text


def test_image_tokens_follow_openais_documented_examples():
    from gem_plugins.openai_oracle import image_tokens

    assert image_tokens(1024, 1024) == 765  # 768 x 768: four tiles
    assert image_tokens(2048, 4096) == 1105  # 768 x 1536: six tiles
    assert image_tokens(64, 64) == 255 and image_tokens(4096, 4096, "low") == 85


def test_estimate_counts_requests_tokens_and_cost_by_hand():
    from gem_plugins.prompts import attribute_prompt

    options = OpenAIOracleOptions(api_key_env=None, prompt_mode="per_attribute", image_tokens=100,
                                  price_per_million_tokens={"input": 2.0, "output": 8.0})
    estimate = OpenAIOracle.estimate(options, [((64, 64), ATTRS), ((64, 64), ATTRS[:1])])
    prompt_tokens = sum(-(-len(attribute_prompt(a)) // 4) for a in ATTRS + ATTRS[:1])
    assert estimate["requests"] == 4 and estimate["input_tokens"] == prompt_tokens + 4 * 100
    assert estimate["output_tokens"] == 4 * 2  # a digit (one token) and the end
    assert estimate["cost"] == pytest.approx((estimate["input_tokens"] * 2 + 8 * 8) / 1e6)
    assert OpenAIOracle.estimate(dataclasses.replace(options, price_per_million_tokens=None), [])["cost"] is None
    with pytest.raises(ValueError, match=r"price_per_million_tokens must be a number or \{input"):
        OpenAIOracleOptions(api_key_env=None, price_per_million_tokens={"in": 1})


# -- structured and soft answers ----------------------------------------------------------------

def test_per_image_asks_for_a_json_schema_reply(make_oracle, server):
    images, truth = make_images(2)
    np.testing.assert_array_equal(make_oracle().score(images, np.arange(2), ATTRS), truth)
    schema = server.requests[0]["body"]["response_format"]["json_schema"]["schema"]
    assert schema["required"] == ATTRS and schema["properties"]["size"]["enum"] == [0, 1, 2, 3, 4, 5]
    assert not schema["additionalProperties"]


def test_a_server_without_json_schema_is_asked_in_plain_text_from_then_on(make_oracle, server):
    server.structured = False
    images, truth = make_images(3)
    oracle = make_oracle()
    np.testing.assert_array_equal(oracle.score(images, np.arange(3), ATTRS), truth)
    with_format = [r for r in server.requests if "response_format" in r["body"]]
    assert len(with_format) == 1 and len(server.requests) == 4  # one refusal, then plain requests
    assert oracle.stats()["retries"] == 0 and oracle.stats()["failures"] == 0


@pytest.mark.parametrize("mode", ["per_image", "per_attribute"])
def test_logprobs_give_the_digit_distribution_beside_the_score(make_oracle, server, mode):
    images, truth = make_images(4)
    server.digit_probs = lambda d: {d: 0.4, 5 - d if 5 - d != d else (d + 1) % 6: 0.6}  # the reply is not the mode
    oracle = make_oracle(prompt_mode=mode, mode="logprobs")
    scores = oracle.score(images, np.arange(4), ATTRS)
    np.testing.assert_array_equal(scores, [[5 - d if 5 - d != d else (d + 1) % 6 for d in row] for row in truth.astype(int)])
    assert server.requests[0]["body"]["logprobs"] is True
    probs = oracle.distributions[2, "size"]
    d = int(truth[2, 2])
    assert probs[d] == pytest.approx(0.4) and probs.sum() == pytest.approx(1.0)
    assert oracle.cache_key.startswith(f"openai/fake-vision/{mode}/logprobs-argmax/")


def test_expected_score_from_logprobs_and_a_reply_without_logprobs_keeps_the_text(make_oracle, server):
    from gem_plugins.openai_oracle import digit_distribution

    images, truth = make_images(3)
    server.digit_probs = lambda d: {d: 0.5, min(d + 2, 5): 0.5}
    scores = make_oracle(prompt_mode="per_attribute", mode="logprobs", score="expected").score(images, np.arange(3), ATTRS)
    np.testing.assert_array_equal(scores, np.rint((truth + np.minimum(truth + 2, 5)) / 2))
    assert digit_distribution([{"token": "{", "logprob": 0.0}], 0) is None
    tokens = [{"token": "Score: ", "logprob": 0.0}, {"token": "4", "logprob": math.log(0.5),
                                                      "top_logprobs": [{"token": " 3", "logprob": math.log(0.25)},
                                                                       {"token": "x", "logprob": math.log(0.25)}]}]
    np.testing.assert_allclose(digit_distribution(tokens, 7), [0, 0, 0, 1 / 3, 2 / 3, 0])


# -- batch mode ---------------------------------------------------------------------------------

def test_batch_mode_scores_through_one_batch_job(make_oracle, server, tmp_path):
    images, truth = make_images(6)
    oracle = make_oracle(submit="batch", batch_poll_seconds=0.01, context_dir=tmp_path)
    np.testing.assert_array_equal(oracle.score(images, np.arange(6), ATTRS), truth)
    assert len(server.requests) == 0 and len(server.batches) == 1  # no chat request: all in the job
    (batch,) = server.batches.values()
    assert len(batch["lines"]) == 6 and {line["url"] for line in batch["lines"]} == {"/v1/chat/completions"}
    assert batch["lines"][0]["body"]["model"] == "fake-vision"
    stats = oracle.stats()
    assert stats["requests"] == 6 and stats["prompt_tokens"] == 600
    with ScoreCache(tmp_path / "oracle_scores.sqlite") as cache:
        assert cache.open_batches(oracle.cache_key) == []  # collected


def test_batch_files_are_cut_at_the_api_limits():
    from gem_plugins.openai_batch import jsonl_line, split_lines

    lines = [{"custom_id": f"r{k}", "body": {"pad": "x" * (10 * k)}} for k in range(7)]
    by_count = split_lines(lines, max_requests=3, max_bytes=10**9)
    assert [[line["custom_id"] for line in f] for f in by_count] == [["r0", "r1", "r2"], ["r3", "r4", "r5"], ["r6"]]
    sizes = [len(jsonl_line(line)) for line in lines]
    limit = sizes[0] + sizes[1] + sizes[2]  # exactly the first three lines
    by_bytes = split_lines(lines, max_requests=100, max_bytes=limit)
    assert [len(f) for f in by_bytes][0] == 3 and sum(map(len, by_bytes)) == 7
    assert all(sum(len(jsonl_line(line)) for line in f) <= limit for f in by_bytes)
    assert [line for f in by_bytes for line in f] == lines  # order kept, nothing lost or repeated
    with pytest.raises(ValueError, match="more than a batch file may hold"):
        split_lines(lines, max_bytes=sizes[6] - 1)


def test_a_scoring_too_large_for_one_batch_file_goes_as_several_jobs(make_oracle, server, tmp_path, monkeypatch):
    from gem_plugins import openai_batch

    monkeypatch.setattr(openai_batch, "MAX_REQUESTS_PER_FILE", 2)
    images, truth = make_images(5)
    oracle = make_oracle(submit="batch", batch_poll_seconds=0.01, context_dir=tmp_path)
    np.testing.assert_array_equal(oracle.score(images, np.arange(5), ATTRS), truth)
    assert len(server.requests) == 0 and sorted(len(b["lines"]) for b in server.batches.values()) == [1, 2, 2]
    with ScoreCache(tmp_path / "oracle_scores.sqlite") as cache:
        assert cache.open_batches(oracle.cache_key) == []


def test_a_killed_batch_run_polls_the_same_job_again_instead_of_paying_twice(make_oracle, server, tmp_path):
    images, truth = make_images(5)
    server.batch_hold = True
    first = make_oracle(submit="batch", batch_poll_seconds=0.01, batch_max_wait=0.1, context_dir=tmp_path)
    with pytest.raises(OracleError, match=r"batch batch_0 is still in_progress after batch_max_wait=0\.1 s; run the "
                                          r"same command again"):
        first.score(images, np.arange(5), ATTRS)
    with ScoreCache(tmp_path / "oracle_scores.sqlite") as cache:
        assert [batch for batch, _ in cache.open_batches(first.cache_key)] == ["batch_0"]
    server.batch_hold = False
    second = make_oracle(submit="batch", batch_poll_seconds=0.01, context_dir=tmp_path)
    np.testing.assert_array_equal(second.score(images, np.arange(5), ATTRS), truth)
    assert len(server.batches) == 1 and len(server.files) == 2  # one upload, one output: nothing paid twice
    assert len(server.requests) == 0


def test_what_a_batch_does_not_answer_is_asked_one_by_one(make_oracle, server, tmp_path):
    images, truth = make_images(4)
    server.script(["ok", "garbage", "500", "ok"])  # the job's four lines
    oracle = make_oracle(submit="batch", batch_poll_seconds=0.01, context_dir=tmp_path)
    np.testing.assert_array_equal(oracle.score(images, np.arange(4), ATTRS), truth)
    assert len(server.requests) == 2  # the two lines without a score, sent as chat requests
    assert oracle.stats()["retries"] == 2


def test_refused_connections_lower_the_concurrency_and_are_retried(make_oracle, server, monkeypatch):
    from gem_plugins.openai_oracle import _TransportError

    images, truth = make_images(10)
    oracle = make_oracle(max_concurrency=8)
    real_chat, refused = oracle._chat, []

    def flaky_chat(body):
        if len(refused) < 3:  # the server's backlog is full for the first three connections
            refused.append(1)
            raise _TransportError("Connection refused", refused=True)
        return real_chat(body)

    monkeypatch.setattr(oracle, "_chat", flaky_chat)
    np.testing.assert_array_equal(oracle.score(images, np.arange(10), ATTRS), truth)
    assert oracle._concurrency.rejections == 3 and oracle.stats()["retries"] == 3
