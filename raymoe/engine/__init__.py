"""The single-process engine: paged latent KV cache, continuous batching, sampling (nano-vllm's split).

`from raymoe import LLM, SamplingParams` for offline generation; `raymoe.engine.llm_engine.LLMEngine`
for the step API a server drives (on an executor from `raymoe.executors.build_executor`);
`raymoe.engine.executor` for the device-side contract that the expert-parallel runtime implements.
Submodules are imported on use, so this package stays light.
"""
