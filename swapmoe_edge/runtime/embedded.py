"""The shipped models: small summarisers shipped as HF checkpoints under ``model_data/``, the
Switch one (switch-debian) the default, a decoder-only one (mixtral-debian) beside it.

On first use it is exported, like any user checkpoint, into a per-user cache directory
(``$SWAPMOE_CACHE_DIR``, else ``$XDG_CACHE_HOME/swapmoe_edge``, else
``~/.cache/swapmoe_edge``) and reused afterwards. The export needs no torch, so the
runtime-only install runs the embedded model offline on its first call; the CLI hands
the exporter in (``swapmoe_edge.cli.embedded``), since the runtime never imports it.
It is not validated against PyTorch there (that needs torch); CI exports the shipped checkpoint the same way, validates it, and checks
its summaries token for token against Hugging Face ``generate`` (tests/test_shipped_model.py).
The checkpoint folder may carry ``profile.json``, the importance profile measured on the
corpus's validation split, which is copied into the export.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import sys
from pathlib import Path
from typing import Callable

from swapmoe_edge.artifact.files import check_inside
from swapmoe_edge.artifact.manifest import SCHEMA_VERSION, load_manifest
from swapmoe_edge.artifact.verify import FileCheckError, HashCache, verify_files
from swapmoe_edge.core.errors import ArtifactError
from swapmoe_edge.residency.importance import PROFILE_NAME
from swapmoe_edge.runtime import baseline_cache

Exporter = Callable[..., Path]
EMBEDDED_NAME = "switch-debian"  # the default
MODEL_DATA = Path(__file__).resolve().parent.parent / "model_data"
EMBEDDED_DIR = MODEL_DATA / EMBEDDED_NAME


def shipped_models() -> list[str]:
    """The names of the models shipped in this installation (folders of model_data with a config.json)."""
    return sorted(p.name for p in MODEL_DATA.iterdir() if (p / "config.json").is_file()) if MODEL_DATA.is_dir() else []


def model_dir(name: str | None) -> Path:
    """The checkpoint folder of the shipped model ``name`` (None: the default); ArtifactError for an unknown name."""
    name = name or EMBEDDED_NAME
    if name not in shipped_models():
        known = ", ".join(shipped_models()) or "none"
        raise ArtifactError(f"no shipped model is called {name!r} (this installation has: {known}); "
                            "pass --artifact DIR for a model you exported.")
    return MODEL_DATA / name


def cache_root() -> Path:
    return baseline_cache.cache_dir()


def _fingerprint(ckpt: Path) -> str:
    """Cheap identity of the shipped checkpoint: its config and weight files' sizes and heads."""
    # A new artifact schema, or export's default precision ladder, exports again.
    h = hashlib.sha256(f"schema {SCHEMA_VERSION} ladder int4".encode())
    for p in sorted(ckpt.glob("*")):
        if p.suffix in (".json", ".safetensors"):
            h.update(p.name.encode())
            h.update(str(p.stat().st_size).encode())
            with open(p, "rb") as f:
                h.update(f.read(1 << 16))
    return h.hexdigest()[:12]


def default_artifact(export: Exporter, ckpt: Path | None = None, quiet: bool = False,
                     validate: bool = False, rebuild: bool = False, model: str | None = None) -> Path:
    """The exported shipped model (``model``: its name, None: the default; or ``ckpt``: its
    folder), exported with ``export`` on the first call.

    ``export(checkpoint, out, quiet=, validate=)`` is ``swapmoe_export.export_checkpoint``;
    the caller passes it because the runtime never imports the exporter. ``validate``
    needs torch. ``rebuild`` exports again even when the cache looks complete.

    First use is atomic: the export and its profile are assembled in a hidden staging
    folder and renamed into place complete, under a lock, so concurrent first uses export
    once and a killed one leaves nothing visible. A cache that fails its check is rebuilt,
    with a note on stderr.
    """
    if model is not None:
        ckpt = model_dir(model)
    ckpt = Path(ckpt or EMBEDDED_DIR)
    if not (ckpt / "config.json").is_file():
        raise ArtifactError(
            f"no embedded model is shipped in this installation ({ckpt} is missing). "
            "Export a Switch Transformer with `swapmoe export MODEL_DIR -o DIR` and pass --artifact DIR."
        )
    root = cache_root()
    out = root / f"{ckpt.name}-{_fingerprint(ckpt)}"
    if not rebuild and incomplete(out, ckpt) is None:
        return out
    try:
        root.mkdir(parents=True, exist_ok=True)
        with _locked(root / f".{out.name}.lock"):
            why = "a rebuild was asked for" if rebuild else incomplete(out, ckpt)
            if why is None:  # another process finished it while this one waited
                return out
            _install(export, ckpt, out, why, quiet=quiet, validate=validate)
    except OSError as e:
        raise ArtifactError(
            f"cannot write the embedded model's export into {out} ({e.strerror or e}). "
            "Set SWAPMOE_CACHE_DIR to a writable folder, or pass --artifact DIR."
        ) from e
    return out


def incomplete(out: Path, ckpt: Path) -> str | None:
    """Why the cached export ``out`` of ``ckpt`` cannot be used, or None when it can.

    Every file is checked against the manifest's sha256, experts included (the cache is ours
    to rebuild, so a damaged expert is replaced rather than routed around); a file is hashed
    once per identity (verify.py), so a later launch only stats them."""
    if not out.exists():
        return "missing"
    try:
        manifest = load_manifest(out)
        verify_files(manifest, manifest.files, HashCache(baseline_cache.hash_cache_path()))
        cached = check_inside(out, PROFILE_NAME, "the importance profile")
    except FileCheckError as e:
        return f"{e.path} {e.why}"
    except ArtifactError as e:
        return str(e)
    shipped = ckpt / PROFILE_NAME
    if shipped.is_file():
        try:
            same = cached.is_file() and cached.read_bytes() == shipped.read_bytes()
        except OSError:
            same = False
        if not same:
            return f"its {PROFILE_NAME} is missing or differs from the shipped one"
    return None


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock on ``path`` for the life of the block (released if the process dies).

    The holder removes the lock file on the way out, so a finished cache leaves nothing
    hidden behind. A process that waited on a removed file sees that the path no longer
    names the file it locked and locks again.
    """
    while True:
        f = open(path, "a+b")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                same = os.stat(path).st_ino == os.fstat(f.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
        except BaseException:
            f.close()
            raise
        f.close()
    try:
        yield
    finally:
        try:
            os.unlink(path)
        finally:
            f.close()  # closing releases the lock


def _install(export: Exporter, ckpt: Path, out: Path, why: str, quiet: bool, validate: bool) -> None:
    """Export into a hidden staging folder, add the profile, then rename it into place."""
    for stale in out.parent.glob(f".{out.name}.staging-*"):  # left by a killed first use
        shutil.rmtree(stale, ignore_errors=True)
    if why != "missing":
        print(f"[swapmoe] the cache of the shipped model {ckpt.name}, {out}, is rebuilt: {why}", file=sys.stderr, flush=True)
    elif not quiet:
        print(f"[swapmoe] first use: exporting the shipped model {ckpt.name} into {out} (once)", file=sys.stderr, flush=True)
    stage = out.parent / f".{out.name}.staging-{os.getpid()}"
    stage.mkdir()
    try:
        art = Path(export(ckpt, stage / "artifact", quiet=quiet, validate=validate))
        shipped = ckpt / PROFILE_NAME  # the importance profile measured on the validation split
        if shipped.is_file():
            shutil.copyfile(shipped, art / PROFILE_NAME)
        if out.exists():
            os.replace(out, stage / "old")
        os.replace(art, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
