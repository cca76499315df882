"""Base-model loading: from a store URI or a local path, an HF directory or a GGUF file, cached by content.

A GGUF file is dequantized by transformers on first load and the result kept as an HF directory keyed by the GGUF's
sha256, so later loads take seconds. Every loaded model carries a :class:`ModelFingerprint` that cartridges are
checked against.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from cartridges import layout
from cartridges.artifact import ModelFingerprint
from cartridges.hashing import sha256_bytes, sha256_file
from cartridges.paths import cache_dir, fill_once
from cartridges.store import ObjectInfo, ObjectNotFound, Store, StoreURI

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
CAUSAL_LM_GGUF_ARCHITECTURES = {"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3"}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class ModelLoadError(ValueError):
    """The model source is missing, unreadable, or not a causal language model."""


@dataclass
class LoadedModel:
    """A frozen base model, its tokenizer, and the fingerprint cartridges are bound to."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    fingerprint: ModelFingerprint

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def fingerprint(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, model_id: str, weights_sha256: str
) -> ModelFingerprint:
    config = model.config
    heads = config.num_attention_heads
    rope_params = getattr(config, "rope_parameters", None) or {}
    rope_theta = getattr(config, "rope_theta", None) or rope_params.get("rope_theta", 10000.0)
    rope_type = rope_params.get("rope_type", "default") if rope_params else "default"
    return ModelFingerprint(
        model_id=model_id,
        weights_sha256=weights_sha256,
        tokenizer_sha256=tokenizer_sha256(tokenizer),
        num_layers=config.num_hidden_layers,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        rope_theta=float(rope_theta),
        rope_scaling=None if rope_type == "default" else dict(rope_params),
        rope_parameters=_rope_parameters(config),
    )


def _rope_parameters(config: PretrainedConfig) -> dict[str, object]:
    """All the RoPE settings of a config, which ``rope_theta``/``rope_scaling`` miss: per layer type (Gemma3's
    sliding and full attention rotate with different thetas) and ``partial_rotary_factor`` (Phi rotates part of
    each head), wherever the config version keeps it."""
    parameters = dict(getattr(config, "rope_parameters", None) or {})
    partial = getattr(config, "partial_rotary_factor", None)
    if partial is not None:
        parameters.setdefault("partial_rotary_factor", partial)
    return parameters


def tokenizer_sha256(tokenizer: PreTrainedTokenizerBase) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ModelLoadError(f"{type(tokenizer).__name__} is not a fast tokenizer; cannot fingerprint it")
    return sha256_bytes(backend.to_str().encode())


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A tiny byte-level tokenizer (259 ids) with a chat template: enough for tests of the tiny model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    tokenizer.add_special_tokens(
        {
            "bos_token": "<|endoftext|>",
            "eos_token": "<|im_end|>",
            "additional_special_tokens": ["<|im_start|>"],
        }
    )
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_llama(seed: int = 0, *, layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2) -> LoadedModel:
    """A random Llama-style model (GQA, RoPE) with a byte tokenizer; builds in well under a second."""
    tokenizer = byte_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.requires_grad_(False)  # frozen like every LoadedModel: gradients must only ever reach cartridges
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().numpy().tobytes())
    return LoadedModel(model, tokenizer, fingerprint(model, tokenizer, f"tiny-llama-seed{seed}", digest.hexdigest()))


def _check_gguf_is_causal_lm(path: Path) -> None:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as err:  # the reader raises ValueError/struct errors on garbage
        raise ModelLoadError(f"{path}: not a readable GGUF file ({err})") from err
    field = reader.fields.get("general.architecture")
    if field is None:
        raise ModelLoadError(f"{path}: GGUF has no general.architecture; cannot tell what model it is")
    architecture = bytes(field.parts[field.data[0]]).decode()
    if architecture not in CAUSAL_LM_GGUF_ARCHITECTURES:
        raise ModelLoadError(
            f"{path}: GGUF architecture {architecture!r} is not a supported causal LM "
            f"({', '.join(sorted(CAUSAL_LM_GGUF_ARCHITECTURES))})"
        )


def _hf_dir_sha256(directory: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(directory.iterdir()):
        if path.suffix in WEIGHT_SUFFIXES:
            digest.update(path.name.encode())
            digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def _gguf_as_hf_dir(path: Path, weights_sha256: str) -> Path:
    """Dequantize a GGUF once into an HF directory in the cache (the slow part of a GGUF load)."""

    def dequantize(target: Path) -> None:
        _check_gguf_is_causal_lm(path)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        except (ValueError, KeyError, OSError) as err:
            raise ModelLoadError(f"{path}: transformers cannot load this GGUF as a causal LM ({err})") from err
        model.hf_quantizer = None  # type: ignore[assignment]  # the weights are dequantized now; save them as plain float tensors
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)

    return fill_once(cache_dir() / "models" / "from-gguf" / weights_sha256, dequantize)


def _local_copy(source: str, store: Store) -> Path:
    """Download a store URI (one GGUF object or an HF directory prefix) into the content-keyed cache.

    A directory is keyed by its files' names and sha256s, so spelling the prefix another way finds the same copy."""
    uri = StoreURI.parse(source)
    if uri.key.endswith(".gguf"):
        info = store.stat(source)
        target = cache_dir() / "models" / "store" / (info.sha256 or _unverified_key(info)) / uri.name
        return fill_once(target, lambda path: store.download(source, path, expected_sha256=info.sha256))
    try:
        objects = layout.objects_under(store, source)
    except layout.UnsafePathSegment as err:
        raise ModelLoadError(f"refusing to copy the model {source}: {err}") from err
    if not objects:
        raise ModelLoadError(f"no model files under {source}")
    infos = {name: store.stat(uri) for name, uri in objects}
    listing = "\n".join(f"{name} {info.sha256 or _unverified_key(info)}" for name, info in infos.items())

    def download(target: Path) -> None:
        for name, info in infos.items():
            store.download(info.uri, target / name, expected_sha256=info.sha256)

    return fill_once(cache_dir() / "models" / "store" / sha256_bytes(listing.encode()), download)


def _unverified_key(info: ObjectInfo) -> str:
    """The cache key of an object uploaded without a recorded sha256 (by another tool than this one's store):
    its URI and revision, so replacing it is noticed; its bytes cannot be checked."""
    log.warning("%s has no recorded sha256 (uploaded by another tool?): cached by its revision, not verified", info.uri)
    return sha256_bytes(f"{info.uri} {info.revision}".encode())


def check_model_files(source: str, store: Store) -> None:
    """Fail fast on a model that cannot load, before a server spends a minute starting to find out: a missing
    path or store object (``FileNotFoundError``/``ObjectNotFound``), or files that are no model (``ModelLoadError``).

    Cheap checks only (existence, the GGUF magic, an HF directory's config.json); a store model is only looked up,
    not downloaded."""
    if "://" in source:
        if source.endswith(".gguf"):
            store.stat(source)
        elif not store.list(source):
            raise ObjectNotFound("no model files under", source)
        return
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"model not found: {path}")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path}: an HF model directory needs config.json")
        return
    if path.suffix != ".gguf":
        raise ModelLoadError(f"{path}: a model file must be .gguf (or give an HF directory)")
    with path.open("rb") as file:
        if file.read(4) != GGUF_MAGIC:
            raise ModelLoadError(f"{path}: not a GGUF file (it does not start with {GGUF_MAGIC!r})")


def load_base_model(
    source: str | Path,
    *,
    store: Store | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> LoadedModel:
    """Load a frozen causal LM from a local path or ``s3://``/``file://`` URI (HF directory or ``.gguf``)."""
    text = str(source)
    path = _local_copy(text, store or Store.from_env()) if "://" in text else Path(text)
    if not path.exists():
        raise ModelLoadError(f"model not found: {path}")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{path}: a model file must be .gguf (or give an HF directory)")
        weights_sha256 = sha256_file(path)
        model_dir, model_id = _gguf_as_hf_dir(path, weights_sha256), path.stem
    else:
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{path}: an HF model directory needs config.json")
        weights_sha256, model_dir, model_id = _hf_dir_sha256(path), path, path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
        model.to(device)  # type: ignore[arg-type]
        model.eval()
    except (ValueError, KeyError, OSError) as err:
        raise ModelLoadError(f"{model_dir}: not loadable as a causal LM ({err})") from err
    model.requires_grad_(False)
    _check_vocabulary(model, tokenizer, model_dir)
    return LoadedModel(model, tokenizer, fingerprint(model, tokenizer, model_id, weights_sha256))


def _check_vocabulary(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, model_dir: Path) -> None:
    """A tokenizer with ids past the model's embedding rows (another model's tokenizer in the directory) would fail
    at the first such token, deep in training or serving, with an IndexError: refuse it here, saying so."""
    rows = int(cast(torch.Tensor, model.get_input_embeddings().weight).shape[0])
    if len(tokenizer) > rows:
        raise ModelLoadError(
            f"{model_dir}: the tokenizer has {len(tokenizer)} tokens, the model embeds {rows}; the tokenizer does not "
            "belong to this model"
        )
