"""A folder of saved files that hostile names, concurrent savers and killed saves cannot damage.

Rules (shared by every kind of file the pack saves: embeddings, directions, calibration maps):
- names: relative, '/'-separated, no '..', no NUL/control/Windows-reserved characters or names, no hidden
  ('.'-led) components, bounded lengths; the resolved file lies strictly inside the folder (symlinks too).
- save: reserve `<stem>_<NNNNN>_<ext>` with O_CREAT|O_EXCL (two savers never get one name), write to a temp
  file `.<reserved name>.<host>.<pid>.<random>.vltmp` in the same folder, then os.replace it over the
  reservation — only if that path is still the very file this call created.
- kills: a temp whose owner process (same host) is dead, or that nobody wrote to for STALE_AFTER_S, is
  removed at the next save or listing, with the empty reservation it names; listings skip temps and empty
  files, and loading an empty file says it is an interrupted save.
Pure Python (no torch, no comfy).
"""
from __future__ import annotations

import json
import os
import re
import secrets
import socket
import stat
import struct
import time
from collections.abc import Callable, Iterable

TEMP_SUFFIX = ".vltmp"
STALE_AFTER_S = 3600.0          # a temp or empty reservation nobody touched for this long is abandoned
MAX_COMPONENT_BYTES = 120       # leaves room for the counter, extension and temp decoration within NAME_MAX
MAX_NAME_BYTES = 1024
MAX_DEPTH = 16
MAX_COUNTER = 10 ** 7
_RESERVED_STEMS = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}
_BAD_CHARS = re.compile(r'[\x00-\x1f\x7f<>:"|?*\\]')
_TEMP_RE = re.compile(r"^\.(?P<target>.+)\.(?P<host>[A-Za-z0-9_-]{1,64})\.(?P<pid>\d{1,10})\.[0-9a-f]{16}"
                      + re.escape(TEMP_SUFFIX) + "$")
_NUMBERED_RE = re.compile(r"_\d{5,}_\.[A-Za-z0-9]+$")  # what numbered_name makes: only those are reservations


def _refuse(input_name: str, value: str, rule: str) -> ValueError:
    shown = value if len(value) <= 80 else value[:77] + "..."
    return ValueError(f"{input_name} {shown!r}: {rule}")


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:64] or "host"


def name_components(name, input_name: str = "name", *, allow_folder_only: bool = False) -> list[str]:
    """The '/'-separated components of a relative file name, every rule checked; '.' and empty parts dropped.

    With allow_folder_only, a name with no file part ('', '.', 'sub/') is allowed (its last component is
    then missing, and the caller supplies a default stem); otherwise it is refused.
    """
    if not isinstance(name, str):
        raise ValueError(f"{input_name} must be a string, got {type(name).__name__}")
    if "\x00" in name:
        raise _refuse(input_name, name.replace("\x00", "\\0"), "contains a NUL byte; use a plain name")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise _refuse(input_name, name, f"is longer than {MAX_NAME_BYTES} bytes; use a shorter name")
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise _refuse(input_name, name, "is an absolute path; names are relative, inside the folder (e.g. 'sub/name')")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    for part in parts:
        _check_component(input_name, name, part)
    if len(parts) > MAX_DEPTH:
        raise _refuse(input_name, name, f"has more than {MAX_DEPTH} folder levels")
    if not allow_folder_only and names_folder(name):
        raise _refuse(input_name, name, "names a folder, not a file")
    return parts


def names_folder(name: str) -> bool:
    """True when `name` has no file part: '', '.', 'sub/', 'sub/.'."""
    return name.split("/")[-1] in ("", ".")


def _check_component(input_name: str, name: str, part: str) -> None:
    if part == "..":
        raise _refuse(input_name, name, "contains '..'; names must stay inside the folder (use 'sub/name')")
    if _BAD_CHARS.search(part):
        raise _refuse(input_name, name, "contains a control character or one of <>:\"|?*\\ ; use letters, "
                                         "digits, '-', '_', ' ' and '/' between folders")
    if part.startswith("."):
        raise _refuse(input_name, name, f"component {part[:40]!r} starts with '.'; hidden names are kept for "
                                         "temporary files")
    if part != part.strip() or part.endswith("."):
        raise _refuse(input_name, name, f"component {part[:40]!r} starts/ends with a space or ends with '.'")
    if part.split(".")[0].lower() in _RESERVED_STEMS:
        raise _refuse(input_name, name, f"component {part[:40]!r} is a reserved device name on Windows")
    if len(part.encode("utf-8", "surrogatepass")) > MAX_COMPONENT_BYTES:
        raise _refuse(input_name, name, f"a component is longer than {MAX_COMPONENT_BYTES} bytes")


def _inside(root: str, path: str) -> bool:
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    return real != real_root and os.path.commonpath([real_root, real]) == real_root


def _check_folder_chain(root: str, parts: list[str], input_name: str, name: str) -> str:
    """root/parts…: every existing step a real folder inside root (no file in the way, no symlink out)."""
    folder = root
    for part in parts:
        folder = os.path.join(folder, part)
        if os.path.lexists(folder):
            if not os.path.isdir(folder):
                raise _refuse(input_name, name, f"passes through {part!r}, which is an existing file, not a "
                                                 "folder; choose another name")
            if not _inside(root, folder):
                raise _refuse(input_name, name, f"folder {part!r} leads outside {root} (symlink)")
    return folder


def resolve_file(roots: Iterable[str], name, extension: str, input_name: str = "name") -> str:
    """Absolute path of an existing, non-empty regular file `name` (ending in `extension`) inside one of
    `roots` (first match wins), every naming rule checked; ValueError naming `input_name` otherwise."""
    parts = name_components(name, input_name)
    if not parts[-1].endswith(extension):
        raise _refuse(input_name, name, f"is not a {extension} file; only {extension} files are loaded")
    roots = [os.path.abspath(r) for r in roots]
    for root in roots:
        path = os.path.join(root, *parts)
        if not os.path.lexists(path):
            continue
        if not _inside(root, path):
            raise _refuse(input_name, name, f"points outside the folder {root} (symlink); use a file inside it")
        try:
            st = os.stat(path)
        except OSError as e:
            raise _refuse(input_name, name, f"cannot be opened ({e.strerror}; a broken link?)") from None
        if not stat.S_ISREG(st.st_mode):
            raise _refuse(input_name, name, "is not a regular file")
        if st.st_size == 0:
            raise _refuse(input_name, name, "is empty: its save is still running or was interrupted; wait, or "
                                            "save it again")
        return os.path.realpath(path)
    raise _refuse(input_name, name, f"not found inside {' or '.join(roots) or 'the folder'}")


def list_files(roots: Iterable[str], extension: str, *, clean: bool = True,
               accept: Callable[[str], bool] | None = None) -> list[str]:
    """Sorted relative names ('/'-separated) of the loadable files under `roots`: regular, non-empty, ending
    in `extension`, and accept(path) when given (e.g. "its header has my metadata key"); temps, hidden entries
    and symlinks leaving a root are skipped. With `clean`, stale temps are removed first (clean_stale)."""
    found = set()
    for root in (os.path.abspath(r) for r in roots):
        if not os.path.isdir(root):
            continue
        if clean:
            clean_stale(root)
        seen = {os.path.realpath(root)}  # a symlinked folder is walked once (no loops)
        for folder, dirs, files in os.walk(root, followlinks=True):
            dirs[:] = [d for d in sorted(dirs) if not d.startswith(".") and _inside(root, os.path.join(folder, d))
                       and _first_visit(seen, os.path.join(folder, d))]
            for f in files:
                path = os.path.join(folder, f)
                if f.startswith(".") or not f.endswith(extension) or not _inside(root, path):
                    continue
                try:
                    st = os.stat(path)
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode) and st.st_size > 0 and (accept is None or accept(path)):
                    found.add(os.path.relpath(path, root).replace(os.sep, "/"))
    return sorted(found)


def _first_visit(seen: set, path: str) -> bool:
    real = os.path.realpath(path)
    if real in seen:
        return False
    seen.add(real)
    return True


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would send CTRL_C_EVENT there: rely on the age bound instead
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # exists under another user, or cannot tell: keep it
    return True


def _is_stale(path: str, host: str, pid: int, now: float, stale_after_s: float) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode):
        return False
    owner_dead = host == _host_tag() and pid != os.getpid() and not _pid_alive(pid)
    return owner_dead or now - st.st_mtime > stale_after_s


def _identity(st: os.stat_result) -> tuple[int, int, int]:
    """Which file this is: inode numbers are reused at once, so the change time is part of it."""
    return st.st_dev, st.st_ino, st.st_ctime_ns


def _remove_if_empty_regular(path: str, identity: tuple | None = None) -> None:
    """Unlink path if it is an empty regular file (and, given identity, still that very file)."""
    try:
        st = os.lstat(path)
        if stat.S_ISREG(st.st_mode) and st.st_size == 0 and identity in (None, _identity(st)):
            os.unlink(path)
    except OSError:
        pass


def clean_stale(root: str, *, now: float | None = None, stale_after_s: float = STALE_AFTER_S) -> list[str]:
    """Remove abandoned temps under root — owner pid dead on this host, or untouched for stale_after_s —
    with the empty reservation each names, and empty files nobody wrote to for stale_after_s that no live
    temp names. Never follows symlinks, never touches a non-empty final file. Returns removed paths."""
    now = time.time() if now is None else now
    removed = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        live_targets = set()
        for f in files:
            m = _TEMP_RE.match(f)
            if m is None:
                continue
            path = os.path.join(folder, f)
            if _is_stale(path, m["host"], int(m["pid"]), now, stale_after_s):
                try:
                    os.unlink(path)
                    removed.append(path)
                except OSError:
                    continue
                target = os.path.join(folder, m["target"])
                if os.path.lexists(target):
                    _remove_if_empty_regular(target)
                    if not os.path.lexists(target):
                        removed.append(target)
            else:
                live_targets.add(m["target"])
        for f in files:
            path = os.path.join(folder, f)
            if f.startswith(".") or f in live_targets or not _NUMBERED_RE.search(f):
                continue
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and st.st_size == 0 and now - st.st_mtime > stale_after_s:
                _remove_if_empty_regular(path)
                if not os.path.lexists(path):
                    removed.append(path)
    return removed


def numbered_name(stem: str, counter: int, extension: str) -> str:
    return f"{stem}_{counter:05}_{extension}"


def _next_counter(folder: str, stem: str, extension: str) -> int:
    pattern = re.compile(re.escape(stem) + r"_(\d{5,})_" + re.escape(extension) + "$")
    counters = [int(m[1]) for f in os.listdir(folder) if (m := pattern.match(f))]
    return max(counters, default=0) + 1


def _reserve(folder: str, stem: str, extension: str) -> tuple[str, tuple]:
    """Create `stem_NNNNN_ext` exclusively (O_CREAT|O_EXCL): (path, identity) of the empty reservation."""
    counter = _next_counter(folder, stem, extension)
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    while counter < MAX_COUNTER:
        path = os.path.join(folder, numbered_name(stem, counter, extension))
        try:
            fd = os.open(path, flags, 0o644)
        except FileExistsError:
            counter += 1
            continue
        try:
            return path, _identity(os.fstat(fd))
        finally:
            os.close(fd)
    raise ValueError(f"no free number left for {stem!r} in {folder}; use another filename_prefix")


def save_numbered(root: str, prefix, extension: str, write: Callable[[str], None], *,
                  input_name: str = "filename_prefix", default_stem: str = "file") -> str:
    """Save through write(temp_path) as root/<prefix>_<NNNNN>_<extension>; returns that name relative to root.

    Every rule on `prefix` is checked before anything is created; the number is reserved exclusively; the
    content lands with one os.replace over this call's own reservation. On any failure the temp and the
    reservation are removed, so nothing partial remains.
    """
    prefix = prefix.strip() if isinstance(prefix, str) else prefix
    parts = name_components(prefix, input_name, allow_folder_only=True)
    if names_folder(prefix):
        parts = parts + [default_stem]
    root = os.path.abspath(root)
    folder = _check_folder_chain(root, parts[:-1], input_name, prefix)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise _refuse(input_name, prefix, f"its folder cannot be created ({e.strerror}); check the name and the "
                                          f"permissions of {root}") from None
    if not _inside(root, os.path.join(folder, "x")):
        raise _refuse(input_name, prefix, f"resolves outside {root}")
    clean_stale(folder)
    reserved, identity = _reserve(folder, parts[-1], extension)
    temp = os.path.join(folder, f".{os.path.basename(reserved)}.{_host_tag()}.{os.getpid()}."
                                f"{secrets.token_hex(8)}{TEMP_SUFFIX}")
    try:
        os.close(os.open(temp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0), 0o644))
        write(temp)
        _fsync(temp)
        if _identity(os.lstat(reserved)) != identity:
            raise OSError(f"the reservation {reserved} was replaced by someone else")
        os.replace(temp, reserved)
    except BaseException:
        _remove_if_empty_regular(reserved, identity)
        if os.path.lexists(temp):
            os.unlink(temp)
        raise
    return os.path.relpath(reserved, root).replace(os.sep, "/")


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def safetensors_metadata(path: str, max_header_bytes: int = 1 << 24) -> dict | None:
    """The `__metadata__` dict of a safetensors file's JSON header (8-byte little-endian length, then JSON),
    read without loading any tensor; None when the file is not a readable safetensors header."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                return None
            (size,) = struct.unpack("<Q", head)
            if size > max_header_bytes:
                return None
            header = json.loads(f.read(size))
    except (OSError, ValueError, RecursionError):
        return None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else None
