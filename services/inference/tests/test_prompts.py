"""The simulated engine's tokenizer gives the ids transformers gives, without importing it (or torch)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from sluice.common.v1 import common_pb2
from sluice_inference import tiny_model
from sluice_inference.prompts import ChatTemplateError, FastPromptTokenizer, HfPromptTokenizer
from sluice_inference.settings import DEFAULT_TINY_MODEL_DIR

# ChatML with the helpers Hugging Face templates use.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'assistant' and loop.first %}{{ raise_exception('the first turn must be the user\\'s') }}"
    "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MESSAGES = [
    common_pb2.ChatMessage(role=common_pb2.ROLE_SYSTEM, content="You are terse."),
    common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="Name a river, ünïcode and all."),
]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny model as it is (no chat template) and a copy with one."""
    plain = tiny_model.ensure(DEFAULT_TINY_MODEL_DIR)
    templated = tmp_path_factory.mktemp("templated")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(plain / name, templated / name)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    (templated / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
    return plain, templated


@pytest.mark.parametrize("templated", [False, True])
def test_prompts_and_chats_encode_to_the_same_ids_as_transformers(
    model_dirs: tuple[Path, Path], templated: bool
) -> None:
    model_dir = model_dirs[templated]
    fast = FastPromptTokenizer(model_dir)
    hf = HfPromptTokenizer(AutoTokenizer.from_pretrained(model_dir))
    assert fast.has_chat_template == hf.has_chat_template == templated
    text = "The river runs\tto the sea; ünïcode, \x07 and  spaces."
    assert fast.encode(text) == hf.encode(text)
    assert fast.encode_chat(MESSAGES) == hf.encode_chat(MESSAGES)
    assert fast.longest_token_chars == hf.longest_token_chars


def test_a_template_that_refuses_the_messages_is_a_chat_template_error(model_dirs: tuple[Path, Path]) -> None:
    fast = FastPromptTokenizer(model_dirs[1])
    with pytest.raises(ChatTemplateError, match="first turn must be the user"):
        fast.encode_chat([common_pb2.ChatMessage(role=common_pb2.ROLE_ASSISTANT, content="Hi")])
