"""Files and names a user gave yitrt: the one reader of user-named text/JSON files, the one rule for names that
become folder names, and the one safe copy of user files into an artifact.

Reading: a user-named file must be a regular file (not a folder, FIFO or device: a FIFO would block and
``/dev/zero`` never ends), no larger than a cap, readable and UTF-8; JSON files must hold an object. Every failure
is one line naming the file and the fix, raised as the caller's error type (a model's config.json is a
``CheckpointError``, a prompts file a ``UsageError``).

Names: what becomes a folder name (the BLS model's name, a recipe's name and default work folder) matches
:data:`NAME_PATTERN`, so it can never be ``.``/``..``, absolute, or carry a separator.

Copying: a file copied into an artifact must be a regular file that resolves inside its source folder — or, for a
Hugging Face cache snapshot (``…/models--owner--name/snapshots/<sha>/``, whose files are symbolic links into
``…/models--owner--name/blobs/``), inside that repo's ``blobs`` folder. Anything else (a symlink to ``/etc/passwd``
or to another user's file) is refused by name, so nothing from outside the folder the user named lands in an
artifact.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
from pathlib import Path
from typing import Any

from yitrt.errors import UsageError, YitrtError, os_error

#: Names that become folder names (Triton model names, recipe names). Triton takes a model's name from its folder
#: in the repository (must equal config.pbtxt's `name`; docs/user_guide/model_repository.md, "Repository Layout")
#: and clients address it as a URL path segment (KServe v2: /v2/models/${MODEL_NAME}/infer). Triton documents no
#: character set, so the rule is conservative: letters, digits, '_', '.', '-' (RFC 3986 unreserved characters,
#: safe in a path segment and in a file name everywhere), not starting with '.' (no '.', '..' or hidden folders),
#: at most 128 characters (well inside NAME_MAX = 255 with yitrt's ``.partial-<pid>`` suffix).
NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$"
NAME_RULE = "letters, digits, '_', '.' and '-', not starting with '.', at most 128 characters"
_NAME = re.compile(NAME_PATTERN)

#: Size caps (bytes) of user-named files read whole: above them a file is not what it claims to be.
CONFIG_CAP = 64 << 20  # config.json, tokenizer_config.json, safetensors index, deploy's config.json
TEXT_CAP = 256 << 20  # prompts, evaluation text
DATA_CAP = 2 << 30  # calibration data, bench datasets

#: Where Hugging Face's cache keeps a repo's files: snapshot folders of symlinks into the repo's blobs folder
#: (huggingface_hub docs, "Manage huggingface_hub cache-system": models--{owner}--{name}/{blobs,refs,snapshots}).
_HF_CACHE_REPO = re.compile(r"^(models|datasets|spaces)--.+")


# -- names ---------------------------------------------------------------------------------------------------------


def check_name(value: Any, what: str, error: type[YitrtError] = UsageError) -> str:
    """``value`` if it is a safe folder name (:data:`NAME_PATTERN`), else a one-line error.

    Args:
        value: the name as given.
        what: how the user gave it (``--model-name``, ``serve.model_name``), named in the error.
        error: the error type to raise.

    Raises:
        ``error``: not a string, empty, '.', '..', a path, or characters outside the rule.
    """
    if isinstance(value, str) and _NAME.match(value):
        return value
    shown = repr(value) if not isinstance(value, str) or len(value) <= 60 else repr(value[:60] + "...")
    raise error(f"{what} {shown} is not a valid name: it becomes a folder name, so it takes {NAME_RULE}",
                "choose a plain name such as my_model-1")


def name_problem(value: Any) -> str | None:
    """Why ``value`` is not a safe folder name (None when it is): for schema validators that collect problems."""
    try:
        check_name(value, "name")
    except UsageError:
        return f"not a valid name: it becomes a folder name, so it takes {NAME_RULE}"
    return None


def check_inside_name(name: str, folder: Path, what: str, error: type[YitrtError] = UsageError) -> Path:
    """``folder / name`` for a relative file name taken from data (e.g. an index's weight_map), refusing names that
    leave the folder: absolute paths, ``..`` parts, empty or NUL-carrying names.

    Raises:
        ``error``: the name would point outside ``folder``.
    """
    if not isinstance(name, str) or not name or "\0" in name or os.path.isabs(name) or ".." in Path(name).parts \
            or "\\" in name:
        raise error(f"{what} names {name!r}, which is outside {folder}", "every file it names must be inside that folder")
    return Path(folder) / name


# -- strict JSON -----------------------------------------------------------------------------------------------------


def show_name(name: str, limit: int = 120) -> str:
    """A tensor name as it can appear in a one-line message: escaped (newlines, control characters, lone
    surrogates become ``\\n``, ``\\u0000``…) and cut to ``limit`` characters."""
    text = json.dumps(name)[1:-1]
    return text if len(text) <= limit else text[: limit - 1] + "…"


class StrictJsonError(ValueError):
    """JSON that ``loads_strict`` refuses; the message says why in a few words."""


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise StrictJsonError(f"key {show_name(key)!r} appears twice in one JSON object")
        out[key] = value
    return out


def _no_constant(literal: str):
    raise StrictJsonError(f"the JSON holds the literal {literal}, which is not JSON")


def loads_strict(text: str) -> Any:
    """Parse JSON text as the format defines it: no NaN/Infinity literals, no duplicate keys in an object.

    Raises:
        StrictJsonError: invalid or non-standard JSON (nesting too deep, integers beyond Python's digit limit).
    """
    try:
        return json.loads(text, object_pairs_hook=_unique_pairs, parse_constant=_no_constant)
    except StrictJsonError:
        raise
    except RecursionError:
        raise StrictJsonError("the JSON is nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise StrictJsonError(f"not valid JSON ({exc.msg} at character {exc.pos})") from None
    except ValueError as exc:  # e.g. an integer literal longer than Python's digit limit
        raise StrictJsonError(f"not usable JSON ({str(exc).splitlines()[0][:80]})") from None


# -- reading user-named files --------------------------------------------------------------------------------------


def _describe_kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _check_no_nul(path: Path, what: str, error: type[YitrtError]) -> None:
    if "\0" in str(path):  # no file system takes it (os.open would raise ValueError); a YAML "\0" escape can carry it
        raise error(f"{what} path {str(path)!r} contains a NUL character", "give a real path")


def read_bytes(path: Path, what: str = "file", cap: int = CONFIG_CAP, error: type[YitrtError] = UsageError,
               fix: str = "give a readable regular file") -> bytes:
    """The bytes of a user-named file, checked to be a regular file of at most ``cap`` bytes.

    The file is opened without following it into a FIFO (``O_NONBLOCK``) and checked on the open descriptor, so a
    file swapped between check and read cannot slip through.

    Args:
        path: the file.
        what: what the file is, for the message ("config.json", "prompts file").
        cap: the largest size accepted.
        error: the error type to raise.
        fix: the hint when the file is missing or unreadable.

    Raises:
        ``error``: missing, a folder/FIFO/device, unreadable, or larger than ``cap``.
    """
    path = Path(path)
    _check_no_nul(path, what, error)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist", fix) from None
    except IsADirectoryError:
        raise error(f"{what} {path} is a folder, not a file", fix) from None
    except OSError as exc:
        raise os_error(exc, path, "read", error) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise error(f"{what} {path} is {_describe_kind(info.st_mode)}, not a regular file", fix)
        if info.st_size > cap:
            raise error(f"{what} {path} is {info.st_size} bytes, more than the {cap >> 20} MiB such a file can be",
                        "check that it is the right file")
        os.set_blocking(fd, True)
        chunks, total = [], 0
        while chunk := os.read(fd, 1 << 20):
            total += len(chunk)
            if total > cap:  # grew while being read
                raise error(f"{what} {path} is larger than the {cap >> 20} MiB such a file can be", "check that it is the right file")
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise os_error(exc, path, "read", error) from None
    finally:
        os.close(fd)


def decode_text(raw: bytes, path: Path, what: str = "file", error: type[YitrtError] = UsageError) -> str:
    """``raw`` as UTF-8 (a leading byte-order mark dropped), or a one-line error naming the first bad byte.

    Raises:
        ``error``: not UTF-8.
    """
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise error(f"{what} {path} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at line {line})",
                    "save it as UTF-8") from None


def read_text(path: Path, what: str = "file", cap: int = TEXT_CAP, error: type[YitrtError] = UsageError,
              fix: str = "give a readable UTF-8 text file") -> str:
    """A user-named UTF-8 text file (see :func:`read_bytes` and :func:`decode_text`)."""
    return decode_text(read_bytes(path, what, cap, error, fix), Path(path), what, error)


def parse_json(text: str, path: Path, what: str = "file", error: type[YitrtError] = UsageError,
               fix: str = "fix the JSON, or fetch the file again", strict: bool = False) -> dict[str, Any]:
    """``text`` as a JSON object, or a one-line error (syntax error with its line, or the wrong shape). ``strict``:
    JSON as the format defines it (:func:`loads_strict`: a repeated key or a NaN literal is refused, never resolved
    silently) — for files that describe a model.

    Raises:
        ``error``: not JSON, nested too deeply, or not an object.
    """
    try:
        if strict:
            try:
                value = loads_strict(text)
            except StrictJsonError as exc:
                raise error(f"{what} {path}: {exc}", fix) from None
        else:
            value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{what} {path} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})", fix) from None
    except (RecursionError, ValueError) as exc:  # nesting deeper than the interpreter's stack, huge numbers
        raise error(f"{what} {path} cannot be parsed as JSON ({type(exc).__name__}: {str(exc)[:80]})", fix) from None
    if not isinstance(value, dict):
        raise error(f"{what} {path} holds a JSON {type(value).__name__}, not an object", fix)
    return value


def read_json(path: Path, what: str = "file", cap: int = CONFIG_CAP, error: type[YitrtError] = UsageError,
              fix: str = "fix the JSON, or fetch the file again", strict: bool = False) -> dict[str, Any]:
    """A user-named JSON file that must hold an object (UTF-8, regular, capped: see :func:`read_bytes`; ``strict``:
    see :func:`parse_json`).

    Raises:
        ``error``: missing, unreadable, not a regular file, too large, not UTF-8, not JSON, not an object.
    """
    return parse_json(read_text(path, what, cap, error, fix), Path(path), what, error, fix, strict)


def read_json_if_present(path: Path, what: str = "file", cap: int = CONFIG_CAP, error: type[YitrtError] = UsageError,
                         fix: str = "fix the JSON, or fetch the file again") -> dict[str, Any] | None:
    """:func:`read_json`, or None when nothing is at ``path`` (an optional file). Something that is there but
    broken is still an error."""
    if not os.path.lexists(path):
        return None
    return read_json(path, what, cap, error, fix)


def check_readable_file(path: Path, what: str, error: type[YitrtError] = UsageError, fix: str = "give a readable regular file") -> Path:
    """Refuse up front a path that is not an existing, readable regular file (before any heavy work).

    Raises:
        ``error``: missing, a folder/FIFO/device, or unreadable.
    """
    path = Path(path)
    _check_no_nul(path, what, error)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist", fix) from None
    except OSError as exc:
        raise os_error(exc, path, "read", error) from None
    if not stat.S_ISREG(info.st_mode):
        raise error(f"{what} {path} is {_describe_kind(info.st_mode)}, not a regular file", fix)
    if not os.access(path, os.R_OK):
        raise error(f"{what} {path} cannot be read: permission denied", fix)
    return path


# -- copying user files into an artifact ---------------------------------------------------------------------------


def allowed_roots(folder: Path) -> list[Path]:
    """Where files of ``folder`` may resolve to: the folder itself, and for a Hugging Face cache snapshot its
    repo's ``blobs`` folder."""
    real = Path(folder).resolve()
    roots = [real]
    if real.parent.name == "snapshots" and _HF_CACHE_REPO.match(real.parent.parent.name):
        roots.append(real.parent.parent / "blobs")
    return roots


def source_file(folder: Path, name: str, what: str = "file", error: type[YitrtError] = UsageError) -> Path | None:
    """The real path of ``folder/name`` if it may be copied into an artifact, None when it does not exist.

    Raises:
        ``error``: it is a symbolic link resolving outside ``folder`` (and outside an HF snapshot's blobs), a
            dangling link, or not a regular file.
    """
    folder = Path(folder)
    path = check_inside_name(name, folder, f"{folder}", error)
    if not os.path.lexists(path):
        return None
    try:
        real = path.resolve(strict=True)
    except FileNotFoundError:
        raise error(f"{what} {path} is a symbolic link to {os.readlink(path)!r}, which does not exist",
                    "replace the link with the file itself") from None
    except (OSError, RuntimeError) as exc:  # a link loop
        raise error(f"{what} {path} cannot be resolved ({exc})", "replace the link with the file itself") from None
    if not any(real.is_relative_to(root) for root in allowed_roots(folder)):
        raise error(f"{what} {path} is a symbolic link to {real}, outside {folder}: refused (it would be copied into the output)",
                    "copy the file into the folder itself if you mean to ship it")
    mode = real.stat().st_mode
    if not stat.S_ISREG(mode):
        raise error(f"{what} {path} is {_describe_kind(mode)}, not a regular file", "give a folder of regular files")
    return real


def copy_into(folder: Path, names: list[str] | tuple[str, ...], dest: Path, what: str = "file",
              error: type[YitrtError] = UsageError) -> list[str]:
    """Copy the files ``names`` that exist in ``folder`` into ``dest`` (created), each checked by
    :func:`source_file` before anything is copied; returns the names copied.

    Raises:
        ``error``: a file that may not be copied (named). ArtifactError: the copy failed (disk full ...).
    """
    sources = {name: real for name in names if (real := source_file(folder, name, what, error)) is not None}
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name, real in sources.items():
        target = dest / name
        # copy the bytes (never the link): the artifact must not point back into the user's folder
        with open(real, "rb") as src, open(target, "xb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
    return list(sources)
