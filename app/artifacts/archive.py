"""Model archives: write zip / tar.gz with the sha256 computed while writing, unpack safely.

``make_archive`` streams the directory into ``<name>.zip`` (or ``.tar.gz``) next to
it through a hashing writer, so the checksum costs no second read. Large binary
files (weights) are stored, not deflated: they do not compress and deflating a
GiB of weights would cost more than sending it.

``safe_extract`` refuses anything that could write outside the target: absolute
names, ``..`` components, links that point outside, device files and fifos, and
archives that would unpack to more than their budget (a zip bomb filling the
worker's disk: ``MESHQ_MAX_UNPACK_BYTES``, by default 100× the archive + 64 MiB). It
extracts into a fresh temporary directory beside the target and renames it into
place only when every member was checked and written, so a rejected archive
leaves nothing behind.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import posixpath
import shutil
import stat
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from app.core.errors import ArtifactError, ConfigError

# Real model archives unpack to about their own size (weights are stored, not
# deflated); tokenizer and config files compress maybe 10×. 100× is far beyond
# both and far below what a zip bomb makes.
MAX_UNPACK_RATIO = 100
MEMBER_OVERHEAD_BYTES = 4096  # what any member costs (inode, directory entry): caps their number
LINK_TARGET_MAX_BYTES = 4096  # PATH_MAX
UNPACK_ALLOWANCE_BYTES = 64 * 1024 * 1024


def unpack_budget(archive: Path) -> int:
    """Bytes an archive may unpack to: ``MESHQ_MAX_UNPACK_BYTES``, else 100× its size + 64 MiB."""
    raw = os.environ.get("MESHQ_MAX_UNPACK_BYTES", "").strip()
    if raw:
        if not raw.isdigit() or int(raw) < 1:
            raise ConfigError("MESHQ_MAX_UNPACK_BYTES", f"{raw!r} must be a positive number of bytes")
        return int(raw)
    return MAX_UNPACK_RATIO * archive.stat().st_size + UNPACK_ALLOWANCE_BYTES


class _Budget:
    """Counts the bytes a member adds; refuses the archive once they exceed the budget."""

    def __init__(self, archive: Path) -> None:
        self.archive = archive
        self.limit = unpack_budget(archive)
        self.used = 0

    def take(self, rel: str, size: int) -> None:
        self.used += size + MEMBER_OVERHEAD_BYTES
        if self.used > self.limit:
            raise ArtifactError(f"{self.archive}: unpacking {rel!r} would exceed {self.limit} bytes "
                                "(MESHQ_MAX_UNPACK_BYTES; 100x the archive size by default)",
                                path=str(self.archive))

ARCHIVE_FORMATS = ("zip", "tar.gz")
DEFAULT_ARCHIVE_FORMAT = "zip"
COPY_CHUNK_BYTES = 1024 * 1024
# Files at least this large, or with a weights suffix, are stored in zips without deflate.
STORE_MIN_BYTES = 8 * 1024 * 1024
STORED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".npy", ".npz", ".zip", ".gz", ".msgpack")
GZIP_LEVEL = 1  # weights hardly compress; level 1 keeps tar.gz close to disk speed


@dataclass(frozen=True)
class ArchiveInfo:
    path: Path
    sha256: str
    bytes: int
    format: str


def archive_suffix(fmt: str) -> str:
    if fmt not in ARCHIVE_FORMATS:
        raise ArtifactError(f"archive format {fmt!r} is not one of {', '.join(ARCHIVE_FORMATS)}")
    return "." + fmt


class HashingWriter:
    """A write-only, non-seekable file that hashes and counts what passes through it.

    Non-seekable on purpose: ``zipfile`` then writes data descriptors instead of
    seeking back to patch headers, so every byte is hashed exactly once, in order.
    """

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.digest = hashlib.sha256()
        self.count = 0

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.raw.write(data)
        self.digest.update(data)
        self.count += len(data)
        return len(data)

    def tell(self) -> int:
        return self.count

    def seekable(self) -> bool:
        return False

    def seek(self, *_: object) -> int:
        raise OSError("HashingWriter is not seekable")

    def flush(self) -> None:
        self.raw.flush()

    def close(self) -> None:  # the caller owns ``raw``
        self.flush()


def _walk_files(root: Path) -> list[Path]:
    """Regular files and symlinks under ``root`` in a stable order (directories implied)."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            found.append(Path(dirpath) / name)
    return found


def _zip_store(path: Path) -> bool:
    return path.suffix.lower() in STORED_SUFFIXES or path.stat().st_size >= STORE_MIN_BYTES


def _zip_add(zf: zipfile.ZipFile, path: Path, arcname: str) -> None:
    """Like ``ZipFile.write`` but copying in 1 MiB chunks (``write`` uses 8 KiB: slow for GiBs)."""
    info = zipfile.ZipInfo.from_file(path, arcname)
    info.compress_type = zipfile.ZIP_STORED if _zip_store(path) else zipfile.ZIP_DEFLATED
    with open(path, "rb") as src, zf.open(info, "w", force_zip64=info.file_size > zipfile.ZIP64_LIMIT) as dst:
        shutil.copyfileobj(src, dst, COPY_CHUNK_BYTES)


def make_archive(src_dir: str | os.PathLike[str], fmt: str = DEFAULT_ARCHIVE_FORMAT,
                 dest: str | os.PathLike[str] | None = None) -> ArchiveInfo:
    """Archive ``src_dir`` (as a top-level folder of the same name) into ``dest``.

    ``dest`` defaults to ``<src_dir>.zip`` / ``<src_dir>.tar.gz`` beside the directory.
    The archive is written to a temporary name and renamed when complete.
    """
    src = Path(src_dir)
    suffix = archive_suffix(fmt)
    if not src.is_dir():
        raise ArtifactError(f"{src}: not a directory, cannot archive it", path=str(src))
    target = Path(dest) if dest is not None else src.with_name(src.name + suffix)
    tmp = target.with_name(f".{target.name}.part")
    top = src.name
    try:
        with open(tmp, "wb") as raw:
            writer = HashingWriter(raw)
            if fmt == "zip":
                with zipfile.ZipFile(writer, "w", allowZip64=True) as zf:  # type: ignore[arg-type]
                    for path in _walk_files(src):
                        arcname = f"{top}/{path.relative_to(src).as_posix()}"
                        if path.is_symlink():
                            continue  # model directories hold no links; never follow one out
                        _zip_add(zf, path, arcname)
            else:
                with gzip.GzipFile(filename="", mode="wb", fileobj=writer,  # type: ignore[arg-type]
                                   compresslevel=GZIP_LEVEL, mtime=0) as gz:
                    with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tf:
                        tf.add(src, arcname=top, recursive=True,
                               filter=lambda info: None if info.issym() or info.islnk() else info)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ArtifactError(f"{target}: cannot write archive: {exc}", path=str(target)) from exc
    return ArchiveInfo(target, writer.digest.hexdigest(), writer.count, fmt)


# -- safe unpacking -----------------------------------------------------------
def detect_format(path: Path, declared: str | None = None) -> str:
    """``declared`` if given, else from the name (``.zip``, ``.tar.gz``/``.tgz``, ``.tar``), else magic bytes."""
    if declared:
        archive_suffix(declared)
        return declared
    name = path.name.lower()
    if name.endswith(".zip"):
        return "zip"
    if name.endswith((".tar.gz", ".tgz")):
        return "tar.gz"
    if name.endswith(".tar"):
        return "tar"
    with open(path, "rb") as fh:
        head = fh.read(512)
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "zip"
    if head.startswith(b"\x1f\x8b"):
        return "tar.gz"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    raise ArtifactError(f"{path}: not a zip or tar.gz archive (set checkpoint.load.archive_format)",
                        path=str(path))


def _member_path(archive: Path, name: str) -> str:
    """The normalised relative POSIX path of a member, or ``ArtifactError`` if unsafe."""
    if not name or "\x00" in name:
        raise ArtifactError(f"{archive}: member with an empty or NUL name", path=str(archive))
    unified = name.replace("\\", "/")
    if unified.startswith("/") or (len(unified) > 1 and unified[1] == ":"):
        raise ArtifactError(f"{archive}: member {name!r} has an absolute path", path=str(archive))
    parts = [p for p in unified.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ArtifactError(f"{archive}: member {name!r} contains '..'", path=str(archive))
    return "/".join(parts)


def _check_link(archive: Path, member: str, link_target: str, *, hard: bool) -> str:
    """A link must stay inside the extraction root; returns its normalised target."""
    unified = link_target.replace("\\", "/")
    if not unified or unified.startswith("/") or (len(unified) > 1 and unified[1] == ":"):
        raise ArtifactError(f"{archive}: link {member!r} points to absolute path {link_target!r}",
                            path=str(archive))
    base = "" if hard else posixpath.dirname(member)
    resolved = posixpath.normpath(posixpath.join(base, unified))
    if resolved == ".." or resolved.startswith("../") or resolved == ".":
        raise ArtifactError(f"{archive}: link {member!r} points outside the archive ({link_target!r})",
                            path=str(archive))
    return resolved


def _inside(root: Path, path: Path) -> bool:
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    return real == real_root or real.startswith(real_root + os.sep)


def _destination(root: Path, archive: Path, rel: str) -> Path:
    dest = root / rel
    if not _inside(root, dest.parent) or (dest.is_symlink() and not _inside(root, dest)):
        raise ArtifactError(f"{archive}: member {rel!r} would be written outside the target", path=str(archive))
    return dest


def _extract_zip(archive: Path, root: Path) -> None:
    budget = _Budget(archive)
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            rel = _member_path(archive, info.filename)
            if not rel:
                continue
            mode = info.external_attr >> 16 if info.create_system == 3 else 0  # unix modes only
            if stat.S_ISLNK(mode):
                if info.file_size > LINK_TARGET_MAX_BYTES:  # read whole: must be small
                    raise ArtifactError(f"{archive}: link {rel!r} has a {info.file_size}-byte target",
                                        path=str(archive))
                budget.take(rel, 0)
                target = zf.read(info).decode("utf-8", "replace")
                _check_link(archive, rel, target, hard=False)
                dest = _destination(root, archive, rel)
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(target, dest)
                # The textual check above cannot see earlier links in the member's own
                # path (a/b -> ../a, then a/b/t -> ../../x): check where it really points.
                if not _inside(root, dest):
                    dest.unlink()
                    raise ArtifactError(f"{archive}: link {rel!r} resolves outside the target", path=str(archive))
                continue
            if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise ArtifactError(f"{archive}: member {rel!r} is not a regular file or directory",
                                    path=str(archive))
            dest = _destination(root, archive, rel)
            if info.is_dir():
                budget.take(rel, 0)
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            if not _inside(root, dest.parent):
                raise ArtifactError(f"{archive}: member {rel!r} would be written outside the target",
                                    path=str(archive))
            # zipfile never returns more than the declared size (and checks the CRC),
            # so the declared size is what this member will cost.
            budget.take(rel, info.file_size)
            with zf.open(info) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, COPY_CHUNK_BYTES)


def _check_links_inside(archive: Path, root: Path) -> None:
    """After unpacking: every symlink under ``root`` must resolve inside it."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            if path.is_symlink() and not _inside(root, path):
                raise ArtifactError(f"{archive}: link {path.relative_to(root)} resolves outside the target",
                                    path=str(archive))


def _extract_tar(archive: Path, root: Path, gzipped: bool) -> None:
    budget = _Budget(archive)
    sizes: dict[str, int] = {}  # member → data size, for hard links to it
    with tarfile.open(archive, "r:gz" if gzipped else "r:") as tf:
        for member in tf:
            rel = _member_path(archive, member.name)
            if not rel:
                continue
            if member.issparse():  # written from a map the budget cannot trust
                raise ArtifactError(f"{archive}: member {rel!r} is a sparse file", path=str(archive))
            if member.issym() or member.islnk():
                target = _check_link(archive, rel, member.linkname, hard=member.islnk())
                if member.islnk():
                    member.linkname = target
            elif not (member.isfile() or member.isdir()):
                raise ArtifactError(f"{archive}: member {rel!r} is a device, fifo or other special file",
                                    path=str(archive))
            _destination(root, archive, rel)
            if member.islnk():
                # Where a hard link cannot be made, tarfile copies the target's data.
                budget.take(rel, sizes.get(member.linkname, 0))
            else:
                sizes[rel] = member.size if member.isfile() else 0  # stored at full size
                budget.take(rel, sizes[rel])
            member.name = rel
            # The data filter re-checks everything above and drops ownership and odd modes.
            try:
                tf.extract(member, root, filter="data")
            except tarfile.FilterError as exc:
                raise ArtifactError(f"{archive}: member {rel!r} rejected: {exc}", path=str(archive)) from None


def safe_extract(archive: str | os.PathLike[str], target: str | os.PathLike[str],
                 fmt: str | None = None) -> Path:
    """Unpack ``archive`` into the new directory ``target`` (which must not exist yet).

    Everything is written into a temporary sibling first; on any unsafe member the
    temporary directory is removed and ``ArtifactError`` names the member.
    """
    archive = Path(archive)
    target = Path(target)
    kind = detect_format(archive, fmt)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.unpack-", dir=target.parent))
    try:
        if kind == "zip":
            _extract_zip(archive, tmp)
        else:
            _extract_tar(archive, tmp, gzipped=kind == "tar.gz")
        _check_links_inside(archive, tmp)
        os.replace(tmp, target)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, gzip.BadGzipFile) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ArtifactError(f"{archive}: corrupt {kind} archive: {exc}", path=str(archive)) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def content_root(directory: Path) -> Path:
    """The folder holding the model: ``directory`` itself, or its single top-level folder."""
    entries = [p for p in directory.iterdir() if not p.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink():
        return entries[0]
    return directory
