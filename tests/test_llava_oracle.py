"""The ``llava`` oracle on a tiny LLaVA built offline in the test (no download)."""

import types
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_llava import build_tiny_llava

from gem.interfaces import BuildContext
from gem.plugins import Registry, make_plugin_manager
from gem.recipe import validate_recipe
from gem_plugins import llava_oracle
from gem_plugins.llava_oracle import LlavaOracle, LlavaOracleOptions, digit_token_ids
from gem_plugins.prompts import PROMPT_VERSION, attribute_prompt, parse_score

ATTRS = ["brightness", "redness", "size", "wall hue"]  # "wall hue" is two tokens: prompts of unequal length


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Two shared cores: torch's default of 2 threads makes these tiny matmuls ~50x slower under load.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, one_thread):
    return build_tiny_llava(tmp_path_factory.mktemp("tiny_llava"))


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    out = rng.integers(0, 256, size=(3, 64, 64, 3), dtype=np.uint8)
    out[1] = 0
    return out


def make(tiny_dir, **overrides):
    return LlavaOracle(LlavaOracleOptions(model=str(tiny_dir), **{"batch_size": 5, **overrides}),
                       BuildContext(seed=0, run_dir=Path("."), cache_dir=Path(".")))


def test_logits_scores_shape_range_and_determinism(tiny_dir, images):
    oracle = make(tiny_dir)
    scores = oracle.score(images, np.arange(3), ATTRS)
    assert scores.shape == (3, 4) and not np.isnan(scores).any()
    assert set(np.unique(scores)) <= set(range(6))
    np.testing.assert_array_equal(oracle.score(images, np.arange(3), ATTRS), scores)
    np.testing.assert_allclose(oracle.last_probs.sum(-1), 1.0, atol=1e-6)
    assert oracle.last_probs.shape == (3, 4, 6)
    assert ((0 <= oracle.last_expected) & (oracle.last_expected <= 5)).all()
    np.testing.assert_array_equal(oracle.last_argmax, scores)
    assert ((0 < oracle.last_digit_mass) & (oracle.last_digit_mass <= 1)).all()
    stats = oracle.stats()
    assert stats["prompts"] == 24 and stats["forward_passes"] == 2 * 3  # 12 prompts in batches of 5
    assert oracle.cache_key == f"llava/{Path(tiny_dir).resolve()}/logits/{PROMPT_VERSION}"
    oracle.close()


def test_logits_agree_with_a_direct_forward(tiny_dir, images):
    """Batched, left-padded scoring gives the digit probabilities of one unpadded forward per prompt."""
    oracle = make(tiny_dir, batch_size=4)
    scores = oracle.score(images, np.arange(3), ATTRS)

    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(tiny_dir)
    model = LlavaForConditionalGeneration.from_pretrained(tiny_dir).eval()
    digits = processor.tokenizer.convert_tokens_to_ids([str(d) for d in range(6)])
    for row in range(3):
        for col, attribute in enumerate(ATTRS):
            conversation = [{"role": "user", "content": [{"type": "image"},
                                                         {"type": "text", "text": attribute_prompt(attribute)}]}]
            text = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
            assert attribute in text and "0 to 5" in text
            inputs = processor(text=[text], images=[Image.fromarray(images[row])], return_tensors="pt")
            with torch.no_grad():
                logits = model(**inputs).logits[0, -1]
            p = torch.softmax(logits.double(), -1)[digits]
            p = (p / p.sum()).numpy()
            np.testing.assert_allclose(oracle.last_probs[row, col], p, atol=1e-4)
            assert scores[row, col] == int(np.argmax(p))
            assert oracle.last_expected[row, col] == pytest.approx(float(p @ np.arange(6)), abs=1e-4)
    oracle.close()


def test_expected_score(tiny_dir, images):
    oracle = make(tiny_dir, score="expected")
    scores = oracle.score(images, np.arange(3), ATTRS)
    np.testing.assert_array_equal(scores, np.rint(oracle.last_expected))
    assert oracle.cache_key == f"llava/{Path(tiny_dir).resolve()}/logits-expected/{PROMPT_VERSION}"


def test_generate_mode(tiny_dir, images):
    oracle = make(tiny_dir, mode="generate", max_new_tokens=3)
    scores = oracle.score(images[:2], np.arange(2), ATTRS[:2])
    assert scores.shape == (2, 2)
    assert all(np.isnan(v) or v in range(6) for v in scores.ravel())
    assert len(oracle.last_replies) == 4
    for value, reply in zip(scores.ravel(), oracle.last_replies):
        parsed = parse_score(reply)
        assert (np.isnan(value) and parsed is None) or value == parsed
    assert oracle.stats()["failures"] == int(np.isnan(scores).sum())
    np.testing.assert_array_equal(oracle.score(images[:2], np.arange(2), ATTRS[:2]), scores)  # greedy: deterministic
    assert oracle.cache_key.endswith(f"/generate/{PROMPT_VERSION}")


def test_prompt_has_image_attribute_and_scale(tiny_dir):
    text = make(tiny_dir).prompt_text("wall hue")
    assert "<image>" in text and '"wall hue"' in text and "0 to 5" in text and text.endswith("ASSISTANT:")


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LlavaOracle(LlavaOracleOptions(model=str(tmp_path / "no-such-model")))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="cannot load model"):
        LlavaOracle(LlavaOracleOptions(model=str(empty)))
    with pytest.raises(FileNotFoundError, match="cannot load model 'gem-tests/no-such-model'"):
        LlavaOracle(LlavaOracleOptions(model="gem-tests/no-such-model"))  # offline: not in the cache


def test_a_mistyped_relative_folder_is_folder_not_found_with_the_near_names(tmp_path, monkeypatch):
    (tmp_path / "models" / "tiny-llava").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"model folder 'models/tiny-lava' does not exist; in 'models' there "
                                                r"is 'models/tiny-llava'"):
        LlavaOracle(LlavaOracleOptions(model="models/tiny-lava"))


def test_a_hub_id_without_network_fails_in_seconds_with_the_offline_hint(tmp_path, monkeypatch):
    import time

    from fake_openai import closed_port_url

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url().removesuffix("/v1"))  # nothing listens there
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    start = time.monotonic()
    with pytest.raises(FileNotFoundError, match=r"model 'gem-tests/no-such-model' is not a local folder, not in the "
                                                r"Hugging Face cache, and http://127\.0\.0\.1:\d+ cannot be reached.*"
                                                r"huggingface-cli download .*HF_HUB_OFFLINE=1"):
        LlavaOracle(LlavaOracleOptions(model="gem-tests/no-such-model"))
    assert time.monotonic() - start < 10


class StubTokenizer:
    unk_token_id = 0

    def __init__(self, vocab):
        self.vocab = vocab

    def get_vocab(self):
        return dict(self.vocab)

    def encode(self, text, add_special_tokens=False):
        return [self.vocab.get(text, 0)]


def test_digit_tokens_take_every_spelling_and_refuse_multi_token_digits():
    vocab = {"<unk>": 0, **{str(d): 10 + d for d in range(6)}, **{f"▁{d}": 20 + d for d in range(6)}, "Ġ3": 33}
    ids = digit_token_ids(StubTokenizer(vocab))
    assert ids[0] == [10, 20] and ids[3] == [13, 23, 33]
    without_five = {k: v for k, v in vocab.items() if not k.endswith("5")}
    with pytest.raises(ValueError, match="digit '5'.*mode: generate"):
        digit_token_ids(StubTokenizer(without_five))


def test_registry_recipe_and_accelerator_device(tiny_dir, images, tmp_path):
    registry = Registry(make_plugin_manager())
    if "llava" not in registry.names("oracle"):  # not yet declared as an entry point
        registry = Registry(make_plugin_manager(extra_plugins=(llava_oracle,)))
    recipe = validate_recipe({"oracle": {"plugin": "llava", "model": str(tiny_dir), "dtype": "float32",
                                         "batch_size": 16}}, registry)
    context = BuildContext(seed=0, run_dir=tmp_path, cache_dir=tmp_path,
                           accelerator=types.SimpleNamespace(device=torch.device("cpu")))
    oracle = registry.get("oracle", "llava").build(recipe.plugin_options["oracle"], context)
    assert oracle.device == torch.device("cpu") and oracle.model.dtype == torch.float32
    assert oracle.score(images[:1], np.arange(1), ATTRS).shape == (1, 4)
    assert oracle.stats()["forward_passes"] == 1
    oracle.close()
