"""Drives a running `llmos serve` with the official `openai` Python package.

Usage: openai_client.py BASE_URL. Prints one JSON object with what the server returned.
"""
import json
import sys

from openai import OpenAI

base = sys.argv[1]
client = OpenAI(base_url=f"{base}/v1", api_key="not-needed")
model = client.models.list().data[0].id

completion = client.completions.create(
    model=model, prompt="Once upon a time", max_tokens=30, temperature=0
)
streamed = "".join(
    chunk.choices[0].text
    for chunk in client.completions.create(
        model=model, prompt="Once upon a time", max_tokens=30, temperature=0, stream=True
    )
    if chunk.choices
)
chat = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Tell me a story."}],
    max_tokens=20,
    temperature=0,
)
chat_streamed = "".join(
    chunk.choices[0].delta.content or ""
    for chunk in client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Tell me a story."}],
        max_tokens=20,
        temperature=0,
        stream=True,
    )
    if chunk.choices
)
print(
    json.dumps(
        {
            "model": model,
            "completion": completion.choices[0].text,
            "completion_finish": completion.choices[0].finish_reason,
            "completion_tokens": completion.usage.completion_tokens,
            "streamed": streamed,
            "chat": chat.choices[0].message.content,
            "chat_role": chat.choices[0].message.role,
            "chat_streamed": chat_streamed,
        }
    )
)
