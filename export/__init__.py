"""ragtune.export: GGUF files for llama.cpp and Ollama, offline, checked against transformers.

    ragtune export gguf runs/adapter --out runs/gguf/policies-f16.gguf            # adapter merged on the fly
    ragtune export gguf runs/adapter --out runs/gguf/policies-q4.gguf --type q4_k_m
    ragtune export gguf runs/adapter --lora --out runs/gguf/policies-lora.gguf    # llama.cpp LoRA adapter
    ragtune export setup                                                          # fetch + verify the converter

    from ragtune.export.build import export_gguf
    res = export_gguf("runs/adapter", "runs/gguf/policies-f16.gguf")      # res.path, res.check, res.modelfile

One module per job:

    pin        the pinned llama-cpp-python sdist that carries llama.cpp's converter (sha256-checked)
    convert    llama.cpp's convert_hf_to_gguf.py / convert_lora_to_gguf.py, run as a subprocess
    quantize   the GGUF types ragtune writes and llama.cpp's quantize API
    header     a fast reader of a GGUF file's scalar metadata
    ollama     the Modelfile: Ollama's Go TEMPLATE derived from the chat template and verified
    parity     the check that llama.cpp answers like transformers on fixed prompts
    source     what is being exported (adapter folder or model dir) and its content hash
    build      export_gguf: the steps above in order, written atomically, recorded in the run card
    cache      cached_gguf: export once per content hash, for the llama.cpp serving engine
    cli        the `ragtune export` command

Train and serve both use this package; it runs llama.cpp through serve's `LlamaCppEngine` (imported
inside the functions that need it) and merges adapters with `ragtune.train.merge`.
"""
