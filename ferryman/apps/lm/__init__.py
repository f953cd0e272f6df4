"""`ferryman finetune` and `ferryman generate`: Hugging Face causal language models on the core engines."""
