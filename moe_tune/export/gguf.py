"""llama.cpp's own converter (``convert_hf_to_gguf.py``, from the folder ``make llama-cpp``
fills), with one registration added: a byte-level BPE tokenizer whose pre-tokenizer is declared
exactly as a family llama.cpp implements is converted as that family.

Why: llama.cpp recognises a BPE pre-tokenizer by hashing the ids its test text encodes to, and
upstream adds one hash per published tokenizer. A tokenizer with a vocabulary of its own (the
shipped tiny model's was trained here) hashes to a value no list holds, although it splits text
exactly as GPT-2 does; the converter then stops with "BPE pre-tokenizer was not recognized".
Here the tokenizer's declared setup decides instead, and only when the hash is unknown and the
declaration is identical to the family's (the test compares llama.cpp's answers with
transformers' on held-out prompts, which a wrong split would change).

    python -m moe_tune.export.gguf LLAMA_CPP_HOME MODEL_DIR [converter options...]
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

# llama.cpp's converter writes these types itself; the others are llama-quantize's, from an f16 file
# (here, in a module that imports nothing heavy, so that `moe-tune export --help` lists them)
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")
QUANTIZE_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k_m", "q4_k_m", "q5_k_m", "q6_k", "iq4_nl")
GGUF_TYPES = CONVERTER_TYPES + QUANTIZE_TYPES

# llama.cpp's name for a pre-tokenizer -> (tokenizer.json's "pre_tokenizer", its "normalizer")
DECLARED_FAMILIES = {
    "gpt-2": ({"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}, None),
}


def declared_family(model_dir: Path) -> str | None:
    """The llama.cpp pre-tokenizer a tokenizer.json declares exactly, if any."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        return None
    spec = json.loads(path.read_text())
    if spec.get("model", {}).get("type") != "BPE":
        return None
    for family, (pre, normalizer) in DECLARED_FAMILIES.items():
        if spec.get("pre_tokenizer") == pre and spec.get("normalizer") == normalizer:
            return family
    return None


def main(home: str, model_dir: str, *options: str) -> None:
    source = Path(home) / "llama.cpp"
    sys.path[:0] = [str(source / "gguf-py"), str(source)]
    from conversion.base import TextModel  # noqa: PLC0415  (llama.cpp's, found through sys.path)

    by_hash = TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        family = declared_family(self.dir_model)
        converter_log = logging.getLogger("hf-to-gguf")
        level = converter_log.level
        if family:  # its warnings about an unknown hash do not apply
            converter_log.setLevel(logging.ERROR)
        try:
            return by_hash(self, tokenizer)
        except NotImplementedError:
            if family is None:
                raise
            return family
        finally:
            converter_log.setLevel(level)

    TextModel.get_vocab_base_pre = get_vocab_base_pre
    sys.argv = [str(source / "convert_hf_to_gguf.py"), model_dir, *options]
    import convert_hf_to_gguf  # noqa: PLC0415

    convert_hf_to_gguf.main()


if __name__ == "__main__":
    main(*sys.argv[1:])
