"""Building blocks of the demo MLLM: vocabulary, tokenizer, processor, model config, and the
one prompt format that training and evaluation share."""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

from . import shapes

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", IMAGE_TOKEN)
PROMPT_WORDS = (
    "user", "assistant", ":", "?", ".", ",",
    "is", "there", "a", "an", "what", "color", "colour", "the", "how", "many", "are",
    "where", "relative", "to", "written", "on", "label", "of", "and", "in", "image",
    "it", "which", "object", "objects", "shape", "answer", "with", "one", "word",
)  # fmt: skip

# The chat template puts the user's question both before and after the image: under causal
# attention the visual tokens then already see the question, and the model answers after
# reading it a second time. Any text items of a user turn are joined; images become
# <image> placeholders, which the processor expands to 144 image tokens.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- set ns = namespace(text='', images=0) -%}"
    "{%- if message['content'] is string -%}{%- set ns.text = message['content'] -%}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'text' -%}{%- set ns.text = (ns.text + ' ' + item['text']) | trim -%}"
    "{%- elif item['type'] == 'image' -%}{%- set ns.images = ns.images + 1 -%}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "user : {{ ns.text }} {{ '<image>' * ns.images }} {{ ns.text }} "
    "{%- else -%}"
    "{%- if message['content'] is string -%}{%- set t = message['content'] -%}"
    "{%- else -%}{%- set t = message['content'] | selectattr('type', 'equalto', 'text') "
    "| map(attribute='text') | join(' ') -%}{%- endif -%}"
    "assistant : {{ t }} </s> "
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}assistant :{%- endif -%}"
)


def vocabulary() -> list[str]:
    words = list(SPECIAL_TOKENS) + list(PROMPT_WORDS)
    for s in shapes.SHAPES:
        words += [s, shapes.PLURALS[s]]
    for answers in shapes.ANSWER_SETS.values():
        words += [a.lower() for a in answers]
    seen: set[str] = set()
    return [w for w in words if not (w in seen or seen.add(w))]


def build_tokenizer():
    from transformers import PreTrainedTokenizerFast  # heavy: transformers, only when the demo is built

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left",
        model_max_length=512,
    )


def build_processor(image_size: int = shapes.IMAGE_SIZE, patch_size: int = 8):
    from transformers import LlavaProcessor  # heavy: transformers, only when the demo is built
    from transformers.models.clip.image_processing_pil_clip import (  # heavy: likewise
        CLIPImageProcessorPil,
    )

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,  # CLIP's CLS, dropped by the "default" strategy
    )


@dataclass
class Sizes:
    image_size: int = shapes.IMAGE_SIZE
    patch_size: int = 8
    vision_width: int = 128
    vision_layers: int = 3
    vision_heads: int = 4
    width: int = 128
    layers: int = 8
    heads: int = 4
    mlp: int = 512


def build_model(processor, sizes: Sizes = Sizes()):
    """A fresh, randomly initialised LLaVA (CLIP tower + Llama decoder) for the processor's
    vocabulary."""
    from transformers import (  # heavy: transformers, only when the demo is built
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    tok = processor.tokenizer
    vision = CLIPVisionConfig(
        hidden_size=sizes.vision_width,
        intermediate_size=4 * sizes.vision_width,
        num_hidden_layers=sizes.vision_layers,
        num_attention_heads=sizes.vision_heads,
        image_size=sizes.image_size,
        patch_size=sizes.patch_size,
        projection_dim=sizes.vision_width,
    )
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=sizes.width,
        intermediate_size=sizes.mlp,
        num_hidden_layers=sizes.layers,
        num_attention_heads=sizes.heads,
        num_key_value_heads=sizes.heads,
        max_position_embeddings=512,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    n_img = (sizes.image_size // sizes.patch_size) ** 2
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        image_seq_length=n_img,
        tie_word_embeddings=True,
    )
    model = LlavaForConditionalGeneration(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    return model


def build_prompt(processor, question: str) -> str:
    """The prompt the demo model was trained on, for one image and one question: the chat
    template with the question (before and after the image) and the generation prompt.
    The model then generates the answer followed by ``</s>``."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
