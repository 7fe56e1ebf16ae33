"""The ``llava`` relation oracle: a local LLaVA-family model through Hugging Face transformers.

It loads any LLaVA-family checkpoint (``llava-hf/llava-1.5-7b-hf``, LLaVA-NeXT, LLaVA-OneVision,
or a local folder; ``HF_HUB_OFFLINE=1`` works with a local folder or a filled cache) with
``AutoProcessor`` and ``AutoModelForImageTextToText`` (``LlavaForConditionalGeneration`` when the
auto class does not know the model), asks the paper's per-attribute question
(:func:`gem_plugins.prompts.attribute_prompt`) through the processor's chat template, and reads
the answer in one of two ways:

``mode: logits`` (default)
    One forward pass per image-attribute pair (batched, left padding), then the next-token
    probabilities of the digit tokens 0-5. Each digit's probability is the mass of all its
    single-token spellings (``"3"``, ``"▁3"``, ``"Ġ3"``); the six masses are renormalised into a
    score distribution. The score is its argmax (``score: argmax``) or its expected value rounded
    to the nearest integer (``score: expected``; the rankers expect integer scores). Both, and the
    distribution, stay available after each call as ``last_argmax``, ``last_expected`` (not
    rounded) and ``last_probs``; ``last_digit_mass`` is how much of the next-token probability
    fell on digits at all (a low mass means the model wanted to say something else first: try
    ``answer_prefix`` or ``mode: generate``).
``mode: generate``
    Greedy generation of a few tokens, parsed with :func:`gem_plugins.prompts.parse_score`;
    an unreadable reply is a missing score (NaN). For tokenizers without single-token digits.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import os
import socket
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import numpy as np
import torch

from gem import hookimpl
from gem.errors import ConfigurationError, GemError
from gem.interfaces import BuildContext, RelationOracle
from gem_plugins.prompts import MAX_SCORE, MIN_SCORE, PROMPT_VERSION, attribute_prompt, parse_score

log = logging.getLogger("gem.oracle.llava")

DIGITS = [str(d) for d in range(MIN_SCORE, MAX_SCORE + 1)]
#: Markers tokenizers put before a word that follows a space (SentencePiece, byte-level BPE).
_SPACE_MARKERS = ("▁", "Ġ", " ")
#: Below this mean next-token mass on the digits, warn that the scores are probably not answers.
LOW_DIGIT_MASS = 0.05
#: The LLaVA-1.5 conversation format, for processors that come without a chat template.
FALLBACK_TEMPLATE = "USER: <image>\n{prompt} ASSISTANT:"


@dataclass
class LlavaOracleOptions:
    model: str = "llava-hf/llava-1.5-7b-hf"
    """Hugging Face hub id or local folder of a LLaVA-family model."""
    mode: Literal["logits", "generate"] = "logits"
    """logits: read the digit probabilities of the next token; generate: generate text and parse it."""
    score: Literal["argmax", "expected"] = "argmax"
    """logits mode: most likely digit, or expected value of the digit distribution (rounded)."""
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    """auto: bfloat16 (float16 without bf16 support) on a GPU, float32 on the CPU."""
    device: Optional[str] = None
    """torch device; null: the run's accelerator device, else the CPU."""
    batch_size: int = 8
    """Image-attribute prompts per forward pass."""
    max_new_tokens: int = 8
    """generate mode: tokens to generate per answer."""
    answer_prefix: str = ""
    """Text appended after the chat template's assistant turn opener (e.g. " " or "Score:")."""
    trust_remote_code: bool = False
    revision: Optional[str] = None
    """Hub revision (branch, tag or commit) of the model."""

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model must be a hub id or a local folder")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")


class ModelNotFoundError(GemError, FileNotFoundError):
    """The model folder or hub id cannot be loaded; the message says what to give instead."""


def _looks_like_path(model: str) -> bool:
    """A local path rather than a hub id (``org/name`` or ``name``): it starts with ``/``, ``.`` or
    ``~``, has more than one ``/``, or its first part is a folder that exists here."""
    if os.path.isabs(model) or model.startswith((".", "~")) or model.count("/") > 1 or os.sep != "/" and os.sep in model:
        return True
    parent = Path(model).parent
    return str(parent) not in ("", ".") and parent.is_dir()


def _missing_folder_message(source: str) -> str:
    local = Path(source).expanduser()
    parent = local.parent if str(local.parent) else Path(".")
    near = []
    if parent.is_dir():
        names = [p.name for p in parent.iterdir() if p.is_dir()]
        near = difflib.get_close_matches(local.name, names, n=3, cutoff=0.6)
    hint = f"; in {str(parent)!r} there is {', '.join(repr(str(parent / n)) for n in near)}" if near else ""
    return (f"llava oracle: model folder {source!r} does not exist{hint}; give a folder written by save_pretrained "
            f"or a Hugging Face hub id such as llava-hf/llava-1.5-7b-hf")


def _hub_unreachable(timeout: float = 3.0) -> Optional[str]:
    """Why the Hugging Face hub cannot be reached in ``timeout`` seconds, or None if it can (or a
    proxy is configured, which this check cannot see through)."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    endpoint = os.environ.get("HF_ENDPOINT")
    if not endpoint:
        from huggingface_hub import constants

        endpoint = constants.ENDPOINT
    parts = urllib.parse.urlsplit(endpoint)
    host, port = parts.hostname or "huggingface.co", parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        return f"{endpoint} cannot be reached ({exc.strerror or exc})"
    return None


def _transformers_version() -> tuple[int, ...]:
    import transformers

    parts = []
    for piece in transformers.__version__.split(".")[:2]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def digit_token_ids(tokenizer: Any, model_name: str = "the model") -> list[list[int]]:
    """For each digit 0-5, the ids of every single token that spells it (with or without a space marker).

    Raises ConfigurationError (a ValueError) when a digit has no single-token spelling (then use
    ``mode: generate``).
    """
    vocab = tokenizer.get_vocab()
    unk = getattr(tokenizer, "unk_token_id", None)
    out = []
    for digit in DIGITS:
        ids = {vocab[s] for s in [digit, *(m + digit for m in _SPACE_MARKERS)] if s in vocab}
        encoded = tokenizer.encode(digit, add_special_tokens=False)
        if len(encoded) == 1 and encoded[0] != unk:
            ids.add(encoded[0])
        ids.discard(unk)
        if not ids:
            raise ConfigurationError(
                f"llava oracle: the tokenizer of {model_name} has no single token for the digit {digit!r}, so "
                f"scores cannot be read from the next-token probabilities; set oracle.mode: generate")
        out.append(sorted(ids))
    return out


class LlavaOracle(RelationOracle):
    """Scores attributes with a local LLaVA-family model (next-token digit probabilities or generation)."""

    def __init__(self, options: LlavaOracleOptions, context: Optional[BuildContext] = None):
        from transformers import AutoProcessor

        self.options = options
        accelerator = getattr(context, "accelerator", None)
        device = options.device or (getattr(accelerator, "device", None) if accelerator is not None else None) or "cpu"
        self.device = torch.device(device)
        self.dtype = resolve_dtype(options.dtype, self.device)
        source = options.model
        local = Path(source).expanduser()
        if local.exists():
            if not local.is_dir():
                raise ModelNotFoundError(f"llava oracle: model {source!r} is a file; give the model's folder "
                                         "or a hub id")
            if not (local / "config.json").is_file():
                raise ModelNotFoundError(f"llava oracle: cannot load model {source!r}: the folder has no config.json "
                                         f"(not a folder written by save_pretrained)")
            source = str(local.resolve())
        elif _looks_like_path(source):
            raise ModelNotFoundError(_missing_folder_message(source))
        self.model_source = source
        common = {"trust_remote_code": options.trust_remote_code, "revision": options.revision}
        if source == options.model and os.environ.get("HF_HUB_OFFLINE", "") in ("", "0"):
            # Without a network, transformers retries for minutes before failing: check in seconds.
            reason = _hub_unreachable()
            if reason is not None:
                from huggingface_hub import try_to_load_from_cache

                if not isinstance(try_to_load_from_cache(source, "config.json", revision=options.revision), str):
                    raise ModelNotFoundError(
                        f"llava oracle: model {source!r} is not a local folder, not in the Hugging Face cache, and "
                        f"{reason}. Download it where there is a network (huggingface-cli download {source} "
                        f"--local-dir models/{source.rsplit('/', 1)[-1]}) and give that folder as oracle.model, "
                        f"or set HF_HUB_OFFLINE=1 to load only from the cache")
                log.info("llava oracle: %s; loading %s from the local cache", reason, source)
                common["local_files_only"] = True
        try:
            self.processor = AutoProcessor.from_pretrained(source, **common)
            self.model = self._load_model(source, common)
        except (OSError, ValueError) as exc:
            offline = " (HF_HUB_OFFLINE is set: the model must be a local folder or already in the cache)" \
                if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") else ""
            error = ModelNotFoundError if isinstance(exc, OSError) else ConfigurationError
            raise error(f"llava oracle: cannot load model {options.model!r}{offline}: {exc}") from None
        self.model.to(self.device).eval()
        self.tokenizer = getattr(self.processor, "tokenizer", None)
        if self.tokenizer is None:
            raise ConfigurationError(f"llava oracle: the processor of {options.model!r} has no tokenizer")
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.digit_ids = digit_token_ids(self.tokenizer, repr(options.model)) if options.mode == "logits" else None
        forward = inspect.signature(self.model.forward).parameters
        self._extra_forward = {}
        if "logits_to_keep" in forward:
            self._extra_forward["logits_to_keep"] = 1
        self._pass_positions = "position_ids" in forward
        key = f"llava/{source}/{options.mode}"
        if options.mode == "logits" and options.score == "expected":
            key += "-expected"
        if options.answer_prefix:
            key += f"/prefix={options.answer_prefix!r}"
        self.cache_key = f"{key}/{PROMPT_VERSION}"
        self._prompts: dict[str, str] = {}
        self.last_probs: Optional[np.ndarray] = None
        self.last_argmax: Optional[np.ndarray] = None
        self.last_expected: Optional[np.ndarray] = None
        self.last_digit_mass: Optional[np.ndarray] = None
        self._counts = {"prompts": 0, "forward_passes": 0, "failures": 0, "low_digit_mass": 0}

    def _load_model(self, source: str, common: dict[str, Any]) -> Any:
        from transformers import AutoModelForImageTextToText, LlavaForConditionalGeneration

        kwargs = {**common, ("dtype" if _transformers_version() >= (4, 56) else "torch_dtype"): self.dtype}
        try:
            return AutoModelForImageTextToText.from_pretrained(source, **kwargs)
        except ValueError as exc:  # a configuration the auto class does not map
            log.info("llava oracle: AutoModelForImageTextToText cannot load %s (%s); trying LlavaForConditionalGeneration",
                     source, exc)
            return LlavaForConditionalGeneration.from_pretrained(source, **kwargs)

    def __repr__(self) -> str:
        o = self.options
        return f"LlavaOracle(model={o.model!r}, mode={o.mode!r}, score={o.score!r}, device={str(self.device)!r})"

    # -- prompts ---------------------------------------------------------------------------------
    def prompt_text(self, attribute: str) -> str:
        """The full model input text for one attribute (chat template applied, image placeholder included)."""
        if attribute not in self._prompts:
            question = attribute_prompt(attribute)
            if getattr(self.processor, "chat_template", None):
                conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
                text = self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
            else:
                text = FALLBACK_TEMPLATE.format(prompt=question)
            self._prompts[attribute] = text + self.options.answer_prefix
        return self._prompts[attribute]

    def _inputs(self, texts: list[str], images: list[Any]) -> dict[str, Any]:
        batch = self.processor(text=texts, images=images, return_tensors="pt", padding=True)
        inputs = {}
        for name, value in batch.items():
            if isinstance(value, torch.Tensor):
                value = value.to(self.device)
                if value.is_floating_point():
                    value = value.to(self.dtype)
            inputs[name] = value
        return inputs

    # -- scoring ---------------------------------------------------------------------------------
    def score(self, images: np.ndarray, indices: np.ndarray, attributes: Sequence[str]) -> np.ndarray:
        from PIL import Image

        attributes = list(attributes)
        n_images, n = len(images), len(attributes)
        pil = [Image.fromarray(np.asarray(im, dtype=np.uint8).squeeze()).convert("RGB") for im in images]
        pairs = [(row, col) for row in range(n_images) for col in range(n)]
        self._counts["prompts"] += len(pairs)
        if self.options.mode == "generate":
            flat = self._generate(pairs, pil, attributes)
            scores = flat.reshape(n_images, n)
            self._counts["failures"] += int(np.isnan(scores).sum())
            return scores
        probs, mass = self._digit_probs(pairs, pil, attributes)
        probs, mass = probs.reshape(n_images, n, len(DIGITS)), mass.reshape(n_images, n)
        levels = np.arange(MIN_SCORE, MAX_SCORE + 1, dtype=np.float64)
        self.last_probs = probs
        self.last_digit_mass = mass
        self.last_argmax = probs.argmax(axis=-1).astype(np.float64) + MIN_SCORE
        self.last_expected = probs @ levels
        low = int((mass < LOW_DIGIT_MASS).sum())
        self._counts["low_digit_mass"] += low
        if len(pairs) and float(mass.mean()) < LOW_DIGIT_MASS:
            log.warning("llava oracle: on average only %.1f%% of the next-token probability is on the digits 0-5; "
                        "the model may want to say something else first (try answer_prefix or mode: generate)",
                        100 * float(mass.mean()))
        if self.options.score == "expected":
            return np.rint(self.last_expected)
        return self.last_argmax.copy()

    @torch.no_grad()
    def _digit_probs(self, pairs: list[tuple[int, int]], pil: list[Any], attributes: list[str]):
        """Renormalised digit probabilities (P, 6) and the raw digit mass (P,) of every pair."""
        probs = np.zeros((len(pairs), len(DIGITS)))
        mass = np.zeros(len(pairs))
        for start in range(0, len(pairs), self.options.batch_size):
            chunk = pairs[start:start + self.options.batch_size]
            inputs = self._inputs([self.prompt_text(attributes[c]) for _, c in chunk], [pil[r] for r, _ in chunk])
            if self._pass_positions and "attention_mask" in inputs:
                # Left padding: count positions from each sequence's first real token.
                inputs["position_ids"] = (inputs["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
            logits = self.model(**inputs, **self._extra_forward).logits[:, -1, :].float()
            p = torch.softmax(logits, dim=-1)
            per_digit = torch.stack([p[:, ids].sum(dim=-1) for ids in self.digit_ids], dim=-1)
            total = per_digit.sum(dim=-1)
            probs[start:start + len(chunk)] = (per_digit / total.clamp_min(1e-30).unsqueeze(-1)).cpu().numpy()
            mass[start:start + len(chunk)] = total.cpu().numpy()
            self._counts["forward_passes"] += 1
        return probs, mass

    @torch.no_grad()
    def _generate(self, pairs: list[tuple[int, int]], pil: list[Any], attributes: list[str]) -> np.ndarray:
        out = np.full(len(pairs), np.nan)
        self.last_replies: list[str] = []
        for start in range(0, len(pairs), self.options.batch_size):
            chunk = pairs[start:start + self.options.batch_size]
            inputs = self._inputs([self.prompt_text(attributes[c]) for _, c in chunk], [pil[r] for r, _ in chunk])
            generated = self.model.generate(**inputs, max_new_tokens=self.options.max_new_tokens, do_sample=False,
                                            pad_token_id=self.tokenizer.pad_token_id)
            replies = self.tokenizer.batch_decode(generated[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            self._counts["forward_passes"] += 1
            for k, reply in enumerate(replies):
                self.last_replies.append(reply)
                value = parse_score(reply)
                if value is not None:
                    out[start + k] = value
        return out

    def stats(self) -> dict[str, int]:
        return dict(self._counts)

    def close(self) -> None:
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


@hookimpl
def gem_register_oracles(register):
    register("llava", LlavaOracle, options=LlavaOracleOptions,
             description="a local LLaVA-family model through transformers (digit probabilities or generation)")
