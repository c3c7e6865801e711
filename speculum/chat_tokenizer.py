"""Train a small byte-level BPE tokenizer with a LLaVA-style chat template.

Used by the tiny test models and by the demo world's recipe, so both load with `AutoTokenizer`.
Byte-level BPE encodes any text without an unknown token, so user prompts never fail to tokenize.
This module trains and wraps a tokenizer; it knows nothing about models.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, IMAGE = "<pad>", "<s>", "</s>", "<image>"
SPECIAL_TOKENS = (PAD, BOS, EOS, IMAGE)  # ids 0, 1, 2, 3 in this order

# One `<image>` per image item; the model adapter expands it to the model's visual-token count.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{{ m['role'].upper() }}: "
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    # An expression, not a literal newline: the chat-template renderer runs Jinja with trim_blocks,
    # which drops a newline written right after a block tag (it used to fuse "ASSISTANT:" onto the prompt).
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# The same conversation with each message's images after its text: `USER: {prompt}\n<image>\nASSISTANT:`.
# Image positions can then attend to the question (the decoder is causal), so a patch can mark itself as
# the object asked about before the answer looks for it. Text-only prompts render as in CHAT_TEMPLATE.
CHAT_TEMPLATE_IMAGE_LAST = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{{ m['role'].upper() }}: "
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] != 'image' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}{{ '\\n' }}<image>{% endif %}{% endfor %}{% endif %}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def train_chat_tokenizer(texts: Iterable[str], vocab_size: int, image_last: bool = False) -> PreTrainedTokenizerFast:
    """Train byte-level BPE on `texts`; specials get ids 0-3 (pad, bos, eos, image).
    `image_last` picks CHAT_TEMPLATE_IMAGE_LAST."""
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size must be at least {len(SPECIAL_TOKENS) + 256} (specials + bytes)")
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE},
    )
    wrapped.chat_template = chat_template(image_last)
    return wrapped


def chat_template(image_last: bool) -> str:
    return CHAT_TEMPLATE_IMAGE_LAST if image_last else CHAT_TEMPLATE
