"""Offline batch generation with the single-process engine (the embedded default).

    .venv/bin/python examples/offline_generate.py [--model PATH]

Without --model it uses the tiny DeepSeek-V3-shaped checkpoint that raymoe generates on first use.
"""

from __future__ import annotations

import argparse

from raymoe import LLM, SamplingParams
from raymoe.model.tiny import default_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint directory (Hugging Face layout)")
    args = parser.parse_args()

    llm = LLM(model=args.model or str(default_checkpoint()), dtype="float32")
    prompts = ["The capital of France is", "Mixture-of-experts models route each token to", "Ray is"]
    greedy = SamplingParams(max_tokens=24, temperature=0.0, logprobs=True)
    for prompt, out in zip(prompts, llm.generate(prompts, greedy), strict=True):
        mean_lp = sum(out.logprobs) / len(out.logprobs) if out.logprobs else float("nan")
        print(f"{prompt!r} -> {out.text!r} ({len(out.token_ids)} tokens, {out.finish_reason}, "
              f"mean logprob {mean_lp:.3f})")

    sampled = SamplingParams(max_tokens=24, temperature=0.8, top_p=0.95, seed=7)
    print("sampled:", llm.generate(["Once upon a time"], sampled)[0].text)


if __name__ == "__main__":
    main()
