"""A tiny LLaVA (or LLaVA-NeXT) checkpoint, CLIP tower + Llama decoder, saved with its processor.

Built from configs with random weights, no downloads: a word-level tokenizer with the
``<image>`` token, a PIL CLIP image processor, a ``LlavaProcessor`` with a chat template,
all written with ``save_pretrained`` so that ``dop.evaluate.load_model(path)`` takes the
same path as a real checkpoint.

``constant_answer=True`` zeroes the LM head: every logit is 0, greedy decoding picks the
lowest id, and the vocabulary puts ``yes`` at id 0, so the model always answers "yes".
That gives end-to-end accuracies that can be worked out by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

NUM_LAYERS = 2
IMAGE_SIZE = 32
PATCH = 8
NUM_VISUAL_TOKENS = (IMAGE_SIZE // PATCH) ** 2  # CLS dropped ("default" feature strategy)

WORDS = (
    "yes no red green blue yellow one two three four left right above below "
    "is there a an the what color how many of shape circle square triangle star "
    "USER ASSISTANT answer question using single word or phrase ? : . ,"
).split()
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
# a chat template in the style of LLaVA-1.5's: "USER: <image>\n{question} ASSISTANT:"
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% else %} ASSISTANT: {{ message['content'][0]['text'] }}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # "yes" first: with an all-zero LM head greedy decoding always picks it (constant_answer)
    vocab = {w: i for i, w in enumerate(["yes"] + SPECIALS + [w for w in WORDS if w != "yes"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return fast


def build_tiny_llava(
    path: str | Path, *, constant_answer: bool = False, seed: int = 0, family: str = "llava"
) -> Path:
    """Save a tiny random LLaVA (``family="llava"``) or LLaVA-NeXT (``"llava_next"``, any-res
    tiles from 32 px pinpoints) checkpoint + processor to ``path``; returns the path."""
    import transformers as T
    from transformers import CLIPVisionConfig, LlamaConfig
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    if family not in ("llava", "llava_next"):
        raise ValueError(f"family must be 'llava' or 'llava_next', got {family!r}")
    pinpoints = [[32, 32], [32, 64], [64, 32]]

    path = Path(path)
    tokenizer = _tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    common = dict(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    if family == "llava":
        config, model_cls = T.LlavaConfig(**common), T.LlavaForConditionalGeneration
    else:
        config = T.LlavaNextConfig(**common, image_grid_pinpoints=pinpoints, image_seq_length=NUM_VISUAL_TOKENS)
        model_cls = T.LlavaNextForConditionalGeneration
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    if constant_answer:
        with torch.no_grad():
            model.lm_head.weight.zero_()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)

    sizes = dict(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    if family == "llava":
        image_processor, processor_cls = CLIPImageProcessorPil(**sizes), T.LlavaProcessor
    else:
        image_processor = LlavaNextImageProcessorPil(**sizes, image_grid_pinpoints=pinpoints)
        processor_cls = T.LlavaNextProcessor
    processor = processor_cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(path)
    return path


def write_jsonl_dataset(folder: str | Path, rows: list[dict], *, name: str = "data.jsonl") -> Path:
    """Write ``rows`` as JSONL; each row's ``image`` (a colour tuple) becomes a PNG beside it."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, row in enumerate(rows):
        row = dict(row)
        colour = row.pop("colour", (200, 30, 30))
        rel = f"images/{i:03d}.png"
        Image.new("RGB", (40, 40), colour).save(folder / rel)
        lines.append(json.dumps({"image": rel, **row}))
    out = folder / name
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out
