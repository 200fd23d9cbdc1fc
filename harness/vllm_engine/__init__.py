"""vLLM's own multimodal (tower / connector) LoRA path as an engine judged by `mmlora compare REF GOT`
(issue #23): build.py (vLLM's model class and LoRA manager from the reference's checkpoint), runner.py (the
runner's mapping block, reproduced; then vLLM's code), archs.py (a request's inputs as vLLM's per-image items;
names), engine.py (captures, the output bundle), cli.py (`mmlora vllm-engine`). Each says what is vLLM's code
and what is reproduced; the output bundle's manifest says it too (`engine.notes`)."""
