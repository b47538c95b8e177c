"""Talk to a running raymoe app (`make serve`) with the official OpenAI client.

    .venv/bin/python examples/openai_client.py [--base-url http://127.0.0.1:8000/v1]
"""

from __future__ import annotations

import argparse

from openai import OpenAI


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    args = parser.parse_args()

    client = OpenAI(base_url=args.base_url, api_key="unused")
    model = client.models.list().data[0].id
    print(f"model: {model}")

    completion = client.completions.create(model=model, prompt="The capital of France is", max_tokens=16,
                                           temperature=0)
    print("completion:", repr(completion.choices[0].text), completion.usage)

    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Write one sentence about experts."}],
        max_tokens=32,
        stream=True,
    )
    print("chat (streamed): ", end="", flush=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()


if __name__ == "__main__":
    main()
