"""Chat templates in the sandbox: HF globals, errors as TemplateError, no escape from the sandbox."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from router.preprocess.templating import ChatTemplate, TemplateError
from tests.fixtures.tiny_models import CHATML_TEMPLATE

REPO = Path(__file__).resolve().parents[2]


def test_chatml_renders_with_generation_prompt() -> None:
    template = ChatTemplate(CHATML_TEMPLATE, "<s>", "</s>")
    text = template.render([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>user\nhi<|im_end|>" in text


def test_gemma_config_template() -> None:
    source = "".join(json.loads((REPO / "configs/gemma-3-270m.json").read_text())["model"]["chat_template"])
    template = ChatTemplate(source, "<bos>", "<eos>")
    text = template.render(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Capital of France?"},
        ]
    )
    assert text == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nCapital of France?<end_of_turn>\n<start_of_turn>model\n"
    )


def test_raise_exception_and_helpers() -> None:
    template = ChatTemplate(
        "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}"
        "{{ strftime_now('%Y') | length }}{{ tools | tojson }}",
        "",
        "",
    )
    with pytest.raises(TemplateError, match="first must be user"):
        template.render([{"role": "system", "content": "x"}])
    assert template.render([{"role": "user", "content": "x"}], tools=[{"a": "é"}]) == '4[{"a": "é"}]'


def test_sandbox_blocks_python_internals() -> None:
    template = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}", "", "")
    with pytest.raises(TemplateError):
        template.render([{"role": "user", "content": "x"}])
    mutating = ChatTemplate("{% set _ = messages.append(1) %}{{ messages | length }}", "", "")
    with pytest.raises(TemplateError):
        mutating.render([{"role": "user", "content": "x"}])


def test_bad_template_syntax() -> None:
    with pytest.raises(TemplateError, match="does not compile"):
        ChatTemplate("{% for %}", "", "")
