"""Request validation: every bad field is named, all at once."""

from __future__ import annotations

from collections.abc import Sequence

import jinja2
import pytest

from sluice.common.v1 import common_pb2
from sluice.inference.v1 import inference_pb2
from sluice_core.errors import InvalidArgument
from sluice_inference import tiny_model
from sluice_inference.prompts import ChatTemplateError, FastPromptTokenizer, HfPromptTokenizer, render_plain
from sluice_inference.requests import validate
from sluice_inference.settings import DEFAULT_TINY_MODEL_DIR


class WordTokenizer:
    """One token per word; a stand-in for the model's tokenizer at this boundary."""

    longest_token_chars = 16

    def encode(self, text: str) -> list[int]:
        return [len(word) for word in text.split()]

    def encode_chat(self, messages: Sequence[common_pb2.ChatMessage]) -> list[int]:
        return self.encode(render_plain(messages))


def request(prompt: str = "the river runs", **sampling: object) -> inference_pb2.GenerateRequest:
    params = common_pb2.SamplingParams(**{"max_tokens": 8, **sampling})  # type: ignore[arg-type]
    return inference_pb2.GenerateRequest(prompt=prompt, sampling=params)


def fields(req: inference_pb2.GenerateRequest, max_model_len: int = 16) -> list[str]:
    with pytest.raises(InvalidArgument) as caught:
        validate(req, WordTokenizer(), max_model_len=max_model_len, vocab_size=100)
    return [v.field for v in caught.value.violations]


def test_a_good_request_passes_with_its_sampling() -> None:
    valid = validate(request(temperature=0.5, seed=7), WordTokenizer(), max_model_len=16, vocab_size=100)
    assert valid.prompt_token_ids == [3, 5, 4]
    assert valid.sampling.temperature == 0.5 and valid.sampling.seed == 7 and valid.sampling.top_p == 1.0
    assert len(valid.request_id) == 32


@pytest.mark.parametrize(
    ("req", "field"),
    [
        (request(prompt="   "), "prompt"),
        (request(max_tokens=0), "sampling.max_tokens"),
        (request(temperature=-0.1), "sampling.temperature"),
        (request(temperature=float("inf")), "sampling.temperature"),
        (request(temperature=2.5), "sampling.temperature"),
        (request(top_p=0.0), "sampling.top_p"),
        (request(top_p=1.5), "sampling.top_p"),
        (request(top_p=float("nan")), "sampling.top_p"),
        (
            inference_pb2.GenerateRequest(
                prompt="hi", priority=-1_000_000, sampling=common_pb2.SamplingParams(max_tokens=1)
            ),
            "priority",
        ),
        (request(top_k=2**32 - 1), "sampling.top_k"),
        (request(seed=2**64 - 1), "sampling.seed"),
        (request(min_p=2.0), "sampling.min_p"),
        (request(repetition_penalty=0.0), "sampling.repetition_penalty"),
        (request(stop=[""]), "sampling.stop"),
        (request(stop=[str(i) for i in range(17)]), "sampling.stop"),
        (request(stop=["x" * 257]), "sampling.stop"),
        (request(min_tokens=9), "sampling.min_tokens"),
        (inference_pb2.GenerateRequest(prompt="hi"), "sampling.max_tokens"),
        (inference_pb2.GenerateRequest(sampling=common_pb2.SamplingParams(max_tokens=1)), "prompt"),
        (
            inference_pb2.GenerateRequest(
                prompt_token_ids=inference_pb2.TokenIds(ids=[1, 100]), sampling=common_pb2.SamplingParams(max_tokens=1)
            ),
            "prompt_token_ids",
        ),
    ],
)
def test_bad_input_names_its_field(req: inference_pb2.GenerateRequest, field: str) -> None:
    assert fields(req) == [field]


def test_every_problem_is_reported_at_once() -> None:
    assert fields(request(prompt="", max_tokens=0, top_p=2.0)) == ["prompt", "sampling.max_tokens", "sampling.top_p"]


def test_prompt_longer_than_the_context_is_refused() -> None:
    assert fields(request(prompt="a " * 16), max_model_len=16) == ["prompt"]


def test_max_tokens_must_fit_beside_the_prompt() -> None:
    # 3 prompt tokens + 14 > 16
    with pytest.raises(InvalidArgument) as caught:
        validate(request(max_tokens=14), WordTokenizer(), max_model_len=16, vocab_size=100)
    assert caught.value.violations[0].field == "sampling.max_tokens"
    assert "at most 13" in caught.value.violations[0].description
    validate(request(max_tokens=13), WordTokenizer(), max_model_len=16, vocab_size=100)


@pytest.mark.parametrize("role", [common_pb2.ROLE_UNSPECIFIED, 7])
def test_chat_messages_need_a_known_role(role: int) -> None:
    messages = common_pb2.ChatMessages(
        messages=[
            common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="hi"),
            common_pb2.ChatMessage(role=role, content="x"),  # type: ignore[arg-type]
        ]
    )
    req = inference_pb2.GenerateRequest(messages=messages, sampling=common_pb2.SamplingParams(max_tokens=1))
    assert fields(req) == ["messages.messages[1].role"]


def test_plain_chat_template_ends_with_an_open_assistant_turn() -> None:
    messages = [
        common_pb2.ChatMessage(role=common_pb2.ROLE_SYSTEM, content="Be terse."),
        common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="Name a river."),
    ]
    assert render_plain(messages) == "System: Be terse.\nUser: Name a river.\nAssistant:"


def chat(*contents: tuple[common_pb2.Role.ValueType, str]) -> common_pb2.ChatMessages:
    return common_pb2.ChatMessages(messages=[common_pb2.ChatMessage(role=r, content=c) for r, c in contents])


def test_the_oldest_history_is_dropped_to_fit_keeping_the_system_message() -> None:
    system, user, assistant = common_pb2.ROLE_SYSTEM, common_pb2.ROLE_USER, common_pb2.ROLE_ASSISTANT
    messages = chat((system, "be brief"), (user, "one two three"), (assistant, "four five six"), (user, "seven"))
    request = inference_pb2.GenerateRequest(
        messages=messages, history_messages=3, sampling=common_pb2.SamplingParams(max_tokens=4)
    )
    # Plain template, one token per word: "System: be brief" 3, "User: one two three" 4,
    # "Assistant: four five six" 4, "User: seven" 2, "Assistant:" 1 -> 14 in all.
    assert validate(request, WordTokenizer(), max_model_len=18, vocab_size=100).history_dropped == 0
    # The whole turn goes: a conversation that starts with the assistant's answer breaks chat templates.
    fitted = validate(request, WordTokenizer(), max_model_len=14, vocab_size=100)
    assert fitted.history_dropped == 2 and len(fitted.prompt_token_ids) == 6  # the system message stays
    assert fields(request, max_model_len=9) == ["sampling.max_tokens"]  # nothing left to drop


class AlternatingTokenizer(WordTokenizer):
    """Like strict chat templates (Mistral's, say): user first, then turns alternating. Counts its renderings."""

    renderings = 0

    def encode_chat(self, messages: Sequence[common_pb2.ChatMessage]) -> list[int]:
        self.renderings += 1
        turns = [m.role for m in messages if m.role != common_pb2.ROLE_SYSTEM]
        if any(role != (common_pb2.ROLE_USER, common_pb2.ROLE_ASSISTANT)[i % 2] for i, role in enumerate(turns)):
            raise ChatTemplateError("Conversation roles must alternate user/assistant/user/assistant/...")
        return super().encode_chat(messages)


def test_a_long_history_is_cut_in_whole_turns_in_a_few_renderings() -> None:
    user, assistant = common_pb2.ROLE_USER, common_pb2.ROLE_ASSISTANT
    history = [(user, "a question of five words"), (assistant, "an answer of five words")] * 128
    request = inference_pb2.GenerateRequest(
        messages=chat(*history, (user, "and now?")),
        history_messages=len(history),
        sampling=common_pb2.SamplingParams(max_tokens=8),
    )
    tokenizer = AlternatingTokenizer()
    fitted = validate(request, tokenizer, max_model_len=64, vocab_size=100)
    # Each turn is 6 + 6 tokens: four turns, the new question (3) and "Assistant:" (1) fit 56.
    assert fitted.history_dropped == 248 and len(fitted.prompt_token_ids) == 52
    assert tokenizer.renderings <= 12, "one rendering per dropped message took seconds for long conversations"


def test_a_history_that_starts_with_an_answer_loses_that_answer() -> None:
    user, assistant = common_pb2.ROLE_USER, common_pb2.ROLE_ASSISTANT
    request = inference_pb2.GenerateRequest(
        messages=chat((assistant, "an answer"), (user, "a question"), (assistant, "its answer"), (user, "and now?")),
        history_messages=3,
        sampling=common_pb2.SamplingParams(max_tokens=1),
    )
    fitted = validate(request, AlternatingTokenizer(), max_model_len=64, vocab_size=100)
    assert fitted.history_dropped == 1


def test_messages_the_chat_template_refuses_are_invalid() -> None:
    user = common_pb2.ROLE_USER
    request = inference_pb2.GenerateRequest(
        messages=chat((user, "one"), (user, "two")), sampling=common_pb2.SamplingParams(max_tokens=1)
    )
    with pytest.raises(InvalidArgument) as caught:
        validate(request, AlternatingTokenizer(), max_model_len=64, vocab_size=100)
    assert caught.value.violations[0].field == "messages"
    assert "must alternate" in caught.value.violations[0].description


def test_a_template_error_becomes_a_chat_template_error() -> None:
    class RaisingTemplate:
        chat_template = "{{ raise_exception('roles must alternate') }}"

        def apply_chat_template(self, *args: object, **kwargs: object) -> str:
            raise jinja2.TemplateError("roles must alternate")

        def get_vocab(self) -> dict[str, int]:
            return {"a": 0}

    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        HfPromptTokenizer(RaisingTemplate()).encode_chat([common_pb2.ChatMessage(role=common_pb2.ROLE_USER)])


class CountingTokenizer(WordTokenizer):
    chars = 0

    def encode(self, text: str) -> list[int]:
        self.chars += len(text)
        return super().encode(text)


def test_input_far_longer_than_the_context_is_refused_without_tokenizing_it() -> None:
    tokenizer = CountingTokenizer()
    # 16 characters a token at most, twice over: 64 tokens of context hold at most 2048 characters,
    # and twice that cannot fit whatever it holds: blank runs count too.
    for prompt in ("river " * 1000, "river" + " " * 5000):
        with pytest.raises(InvalidArgument) as caught:
            validate(request(prompt=prompt), tokenizer, max_model_len=64, vocab_size=100)
        assert [v.field for v in caught.value.violations] == ["prompt"]
        assert "far longer than the model's context of 64 tokens" in caught.value.violations[0].description
    assert tokenizer.chars == 0


def test_input_that_may_not_fit_is_counted_with_bounded_work() -> None:
    tokenizer = CountingTokenizer()
    with pytest.raises(InvalidArgument, match="far longer"):
        validate(request(prompt="river " * 600), tokenizer, max_model_len=64, vocab_size=100)
    assert tokenizer.chars <= 4096  # one piece told it: 600 words are past 64 tokens
    # A tokenizer that folds blank runs away may fit them: counted, then taken.
    taken = validate(request(prompt="river" + " " * 3000), tokenizer, max_model_len=64, vocab_size=100)
    assert taken.prompt_token_ids == [5]


@pytest.fixture(scope="module")
def tiny_tokenizer() -> FastPromptTokenizer:
    return FastPromptTokenizer(tiny_model.ensure(DEFAULT_TINY_MODEL_DIR))


class CountingFast:
    """The tiny model's real tokenizer, counting the characters it is given."""

    def __init__(self, tokenizer: FastPromptTokenizer) -> None:
        self._tokenizer = tokenizer
        self.longest_token_chars = tokenizer.longest_token_chars
        self.chars = 0

    def encode(self, text: str) -> list[int]:
        self.chars += len(text)
        return self._tokenizer.encode(text)

    def encode_chat(self, messages: Sequence[common_pb2.ChatMessage]) -> list[int]:
        raise AssertionError("not a chat")


def test_megabytes_of_ideographic_spaces_are_refused_after_tokenizing_about_a_context(
    tiny_tokenizer: FastPromptTokenizer,
) -> None:
    counting = CountingFast(tiny_tokenizer)
    context = 2048
    most = 2 * context * tiny_tokenizer.longest_token_chars
    for chars in (most + 1, 15_000_000):  # counted, and past any count
        with pytest.raises(InvalidArgument, match="far longer"):
            validate(request(prompt="\u3000" * chars), counting, max_model_len=context, vocab_size=512)
    assert counting.chars <= 4 * context + 4096  # U+3000 is at least a token a character


def test_many_empty_messages_are_a_long_input_refused_untouched() -> None:
    # 400,000 empty messages were rendered and tokenized on the replica's loop, holding its other streams.
    tokenizer = CountingTokenizer()
    empty = [common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="")] * 5000
    request_ = inference_pb2.GenerateRequest(
        messages=common_pb2.ChatMessages(
            messages=[*empty, common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="hi")]
        ),
        sampling=common_pb2.SamplingParams(max_tokens=1),
    )
    with pytest.raises(InvalidArgument, match="far longer"):
        validate(request_, tokenizer, max_model_len=64, vocab_size=100)
    assert tokenizer.chars == 0
