"""The weights and the model: config, the transformer, checkpoint and GGUF I/O, tokenizer, LoRA."""
