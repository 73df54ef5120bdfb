"""Image parts in chat messages: a template that renders image parts (LLaVA's, from llava-hf/llava-1.5-7b-hf)
gets every message's content as text and image parts, as transformers' processors give it; another template
gets the placeholder and a newline in the text. Both collect the images in order."""

import pytest

from jaxllm.server.openai_request import ChatImages, chat_prompt

LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
PNG = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_dir), local_files_only=True)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tok


def test_llava_template_gets_parts(tokenizer):
    tokenizer.chat_template = LLAVA_TEMPLATE
    images = ChatImages("<image>")
    messages = [{"role": "user", "content": [PNG, {"type": "text", "text": "What is this?"}]},
                {"role": "assistant", "content": "A cat."},
                {"role": "user", "content": [{"type": "text", "text": "And this?"}, PNG]}]
    text, ids = chat_prompt(tokenizer, messages, images=images)
    assert text == "USER: <image>\nWhat is this? ASSISTANT: A cat. USER: <image>\nAnd this? ASSISTANT:"
    assert [r.field for r in images.refs] == ["messages[0].content[0]", "messages[2].content[1]"]
    assert ids.count(tokenizer.convert_tokens_to_ids("<image>")) == 2


def test_other_templates_get_the_placeholder_in_the_text(tokenizer, smollm2_dir):
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(str(smollm2_dir), local_files_only=True)
    images = ChatImages("<image>")
    text, _ = chat_prompt(plain, [{"role": "user", "content": [{"type": "text", "text": "Look: "}, PNG]}],
                          images=images)
    assert "Look: <image>\n" in text and len(images.refs) == 1
