"""Models in and out of cllm: Hugging Face GPT-2 folders in (`cllm import`), Hugging Face
folders and GGUF files out (`cllm export`).

hf_import   a GPT-2 checkpoint folder (or a model of the local Hugging Face cache) -> Model
hf_export   Model -> a folder that transformers loads (GPT2LMHeadModel, or the crystalline
            model with its own modeling file from remote/)
gguf_export Model -> a GGUF file that llama.cpp runs (architecture gpt2)
tensorfile  safetensors files read from untrusted sources and written as a stream
"""
