"""A tiny, randomly initialised LLaVA built offline (transformers 5.x), for the ``llava`` oracle tests.

Recipe from the workspace's ENVIRONMENT.md: a ``tokenizers`` WordLevel vocabulary (the digits,
``<image>`` and a few words) wrapped in ``PreTrainedTokenizerFast``; ``CLIPImageProcessorPil``
(the torchvision-backed class cannot be used here); a tiny CLIP vision tower (hidden 32, 2 layers,
32x32 images, patch 8 -> 16 patches) and a tiny Llama (hidden 32, 2 layers); a ``LlavaProcessor``
with ``patch_size=8`` and ``num_additional_image_tokens=1`` (the CLS token) and a chat template.
Everything is saved with ``save_pretrained`` so the oracle loads it back with ``from_pretrained``.
"""

from __future__ import annotations

from pathlib import Path

#: Words of the vocabulary besides the special tokens; anything else is ``<unk>``.
WORDS = [str(d) for d in range(10)] + [
    "USER", "ASSISTANT", ":", ".", ",", "(", ")", "the", "a", "of", "image", "attribute", "score",
    "Score", "Attribute", "Image", "Response", "to", "brightness", "redness", "size",
    "is", "and", "or", "with", "only", "digit", "single", "from", "in", "how",
]
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)


def build_tiny_llava(folder: Path, seed: int = 0) -> Path:
    """Write processor and model files of a tiny LLaVA into ``folder``; return the folder."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab: dict[str, int] = {}
    for token in specials + WORDS:
        vocab.setdefault(token, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>",
                                        bos_token="<s>", eos_token="</s>")
    # Registered as a special token, or the processor's <image> is split into unknown pieces.
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")

    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=CHAT_TEMPLATE)

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token_id,
                         image_seq_length=16, vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    # Random weights put almost no next-token probability on the digits; give their output rows
    # larger weights so that the model "answers" with a digit a good part of the time.
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        digits = tokenizer.convert_tokens_to_ids([str(d) for d in range(6)])
        generator = torch.Generator().manual_seed(seed + 1)
        head[digits] = torch.randn(len(digits), head.shape[1], generator=generator) * 0.2
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
