"""Text generation with pretrained decoder LLMs (Gemma 3 and Llama-style): weights from a GGUF
file or a Hugging Face directory, the tokenizer, a paged KV cache, and the continuous-batching
engine. See docs/architecture.md, "Generation"."""
