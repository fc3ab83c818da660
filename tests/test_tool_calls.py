"""Tool calling on the chat API: tools rendered by a template that takes them, OLMo 3's
``<function_calls>`` block parsed into OpenAI ``tool_calls`` (whole and streamed, with
the official client), a follow-up turn with the calls and their answers, and clear 400s
where tools cannot be served."""

from __future__ import annotations

import json

import openai
import pytest
from conftest import local_cluster

from olmo_model.cache_limits import CacheLimits
from olmo_model.demo import DEMO_MODEL_DIR
from protos.errors import ServingError
from protos.vocabulary import Mode
from router.tool_calls import ToolCallStream, asked_tools, parse_tool_calls

# An OLMo 3-style template that takes tools: their schemas in the system turn, an
# assistant's calls as Python-style lines in <function_calls>, tool answers as turns.
TEMPLATE = (
    "{% if tools %}<|system|>\nYou may call these functions: {{ tools | tojson }}\n"
    "{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|>\n{{ m['content'] }}\n"
    "{% elif m['role'] == 'tool' %}<|tool|>\n{{ m['content'] }}\n"
    "{% elif m['role'] == 'assistant' %}<|assistant|>\n{{ m['content'] }}"
    "{% if m.tool_calls %}<function_calls>{% for c in m.tool_calls %}\n"
    "{{ c.function.name }}({% for k, v in c.function.arguments.items() %}"
    "{{ k }}={{ v | tojson }}{% if not loop.last %}, {% endif %}{% endfor %}){% endfor %}"
    "\n</function_calls>{% endif %}{{ eos_token }}\n"
    "{% else %}<|system|>\n{{ m['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city"]}}}
# What the demo model is held to (it was never taught to call tools): a call block.
CALL = r'<function_calls>\nget_weather\(city="[a-z]{3,8}", days=[1-7]\)\n</function_calls>'
MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def tool_model(tmp_path_factory):
    """The demo model's weights and tokenizer, with a template that takes tools."""
    folder = tmp_path_factory.mktemp("tool-model")
    for source in DEMO_MODEL_DIR.iterdir():
        if source.name != "tokenizer_config.json" and source.is_file():
            (folder / source.name).symlink_to(source)
    config = json.loads((DEMO_MODEL_DIR / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config,
                                                              "chat_template": TEMPLATE}))
    return folder


@pytest.fixture(scope="module")
def api(tool_model):
    cluster = local_cluster(tool_model, cache=CacheLimits(8, 4096, 512), http=True,
                            mode=Mode.AGGREGATED)
    yield openai.OpenAI(base_url=f"{cluster.http_url}/v1", api_key="unused", max_retries=0)
    cluster.stop()


def test_a_call_block_becomes_tool_calls(api, tool_model):
    reply = api.chat.completions.create(
        model=tool_model.name, messages=MESSAGES, tools=[WEATHER], max_tokens=60,
        temperature=0, extra_body={"guided_regex": CALL})
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    assert set(arguments) == {"city", "days"} and 1 <= arguments["days"] <= 7
    assert call.id.startswith("call_")


def test_streamed_calls_come_whole_in_the_last_chunk(api, tool_model):
    whole = api.chat.completions.create(
        model=tool_model.name, messages=MESSAGES, tools=[WEATHER], max_tokens=60,
        temperature=0, extra_body={"guided_regex": CALL})
    content, calls, finish = [], [], None
    for chunk in api.chat.completions.create(
            model=tool_model.name, messages=MESSAGES, tools=[WEATHER], max_tokens=60,
            temperature=0, stream=True, extra_body={"guided_regex": CALL}):
        delta = chunk.choices[0].delta
        content.append(delta.content or "")
        calls += delta.tool_calls or []
        finish = chunk.choices[0].finish_reason or finish
    assert "".join(content) == "" and finish == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in calls] == [
        (c.function.name, c.function.arguments) for c in whole.choices[0].message.tool_calls]


def test_a_follow_up_turn_renders_the_calls_and_their_answers(api, tool_model):
    reply = api.chat.completions.create(
        model=tool_model.name, max_tokens=4, tools=[WEATHER], tool_choice="none",
        messages=[*MESSAGES,
                  {"role": "assistant", "content": None, "tool_calls": [{
                      "id": "call_1", "type": "function", "function": {
                          "name": "get_weather", "arguments": '{"city": "paris"}'}}]},
                  {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}])
    assert reply.choices[0].message.tool_calls is None  # tool_choice none: not parsed
    assert reply.usage.prompt_tokens > 20


def test_plain_answers_stay_content(api, tool_model):
    reply = api.chat.completions.create(
        model=tool_model.name, messages=MESSAGES, tools=[WEATHER], max_tokens=8,
        temperature=0, extra_body={"guided_regex": "[a-z ]{5,20}"})
    assert reply.choices[0].message.tool_calls is None
    assert reply.choices[0].message.content and reply.choices[0].finish_reason != "tool_calls"


@pytest.mark.parametrize("kwargs, param", [
    (dict(tool_choice="required"), "tool_choice"),
    (dict(tool_choice={"type": "function", "function": {"name": "get_weather"}}),
     "tool_choice"),
    (dict(tools=[{"type": "function", "function": {"name": "bad name"}}]), "tools"),
    (dict(tools=[WEATHER] * 65), "tools"),
    (dict(tools=[{"type": "function", "function": {
        "name": "f", "description": "<|user|>"}}]), "tools"),
])
def test_tools_that_cannot_be_served_are_400(api, tool_model, kwargs, param):
    with pytest.raises(openai.BadRequestError) as err:
        api.chat.completions.create(model=tool_model.name, messages=MESSAGES, max_tokens=2,
                                    **{"tools": [WEATHER], **kwargs})
    assert err.value.body["param"] == param


def test_a_template_without_tools_refuses_them(tool_model):
    from router.chat_template import ChatTemplate

    assert ChatTemplate.of_model(tool_model).takes_tools
    assert not ChatTemplate.of_model(DEMO_MODEL_DIR).takes_tools  # the demo model's
    with pytest.raises(ServingError, match="does not take tools") as err:
        asked_tools({"tools": [WEATHER]}, template_takes_tools=False)
    assert err.value.param == "tools"
    assert asked_tools({"tools": []}, template_takes_tools=False) is None


@pytest.mark.parametrize("text, expected", [
    ('<function_calls>\nf(a=1, b="x")\n</function_calls>', (None, [("f", {"a": 1, "b": "x"})])),
    ('Let me look.\n<function_calls>\nf(x=null, y=true, z=[1, {"k": false}])\ng()\n'
     '</function_calls>', ("Let me look.", [("f", {"x": None, "y": True,
                                                   "z": [1, {"k": False}]}), ("g", {})])),
    ("<function_calls>\nf(a=1)", (None, [("f", {"a": 1})])),  # cut before its close
    ("no calls here", None),
    ("<function_calls>\nf(1)\n</function_calls>", None),         # positional
    ("<function_calls>\nimport os\n</function_calls>", None),
    ("<function_calls>\nf(a=g())\n</function_calls>", None),      # not a literal
    ("<function_calls>\nf(a=1\n</function_calls>", None),
    ("<function_calls>\n</function_calls>", None),
])
def test_call_blocks_parse_as_olmo3_writes_them(text, expected):
    parsed = parse_tool_calls(text)
    if expected is None:
        assert parsed is None
    else:
        assert (parsed[0], [(c.name, json.loads(c.arguments)) for c in parsed[1]]) == expected


def test_a_stream_holds_back_only_what_may_begin_a_call_block():
    stream = ToolCallStream()
    sent = [stream.feed(piece) for piece in
            ["Sure", " <", "b> ok <func", "tion_calls>\nf(a=", "2)\n</function_calls>"]]
    assert sent == ["Sure", " ", "<b> ok ", "", ""]
    rest, calls = stream.finish()
    assert rest == "" and [(c.name, c.arguments) for c in calls] == [("f", '{"a": 2}')]
    broken = ToolCallStream()
    assert broken.feed("x <function_calls>\nnot a call") == "x "
    assert broken.finish() == ("<function_calls>\nnot a call", [])
