"""Files that `cllm export --to hf` writes beside the weights of a model with crystalline
switches, so that transformers runs it (trust_remote_code=True). They import torch and
transformers: cllm itself never imports them."""
