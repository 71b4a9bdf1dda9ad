"""Glue between lowrank_ops and other projects (vLLM, transformers).

Each integration is its own submodule and imports its optional package itself; nothing here imports an optional
package, so `import lowrank_ops` works without any of them. The vLLM plugin is `lowrank_ops.integrations.vllm`,
loaded by vLLM through the `vllm.general_plugins` entry point.
"""
