"""The one error hierarchy of yitrt.

Library code raises these; the CLI maps each type to a one-line message, a hint naming the fix and an
exit code (see ``yitrt.cli.app``). A user error never shows a traceback unless ``YITRT_DEBUG=1``.
"""

from __future__ import annotations

import errno


class YitrtError(Exception):
    """Base of every error yitrt reports to a user.

    Attributes:
        message: one line saying what is wrong.
        hint: one line saying what to do about it (may be empty).
        exit_code: the process exit status the CLI uses for this error type.
    """

    exit_code = 1

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class UsageError(YitrtError):
    """A command-line option or argument is invalid."""

    exit_code = 2


class ValidationError(YitrtError):
    """A request was checked before any work and found impossible; ``problems`` lists every reason."""

    exit_code = 3

    def __init__(self, problems: list[str], hint: str = "") -> None:
        self.problems = list(problems)
        head = self.problems[0] if len(self.problems) == 1 else f"{len(self.problems)} problems: " + "; ".join(self.problems)
        super().__init__(head, hint)


class UnsupportedModelError(YitrtError):
    """The model's architecture or layout is not one yitrt can convert."""

    exit_code = 4


class CheckpointError(YitrtError):
    """Source weights are missing, truncated, inconsistent with their config, or unknown."""

    exit_code = 5


class HubError(YitrtError):
    """Fetching from the Hugging Face Hub failed (not found, gated, offline, network)."""

    exit_code = 6


class ArtifactError(YitrtError):
    """An output folder cannot be written safely (exists and is not a yitrt artifact, etc.)."""

    exit_code = 7


class QuantizationError(YitrtError):
    """A quantization scheme cannot be applied as asked."""

    exit_code = 8


class MissingDependencyError(YitrtError):
    """An optional dependency is needed; the hint names the extra to install."""

    exit_code = 9

    def __init__(self, module: str, extra: str) -> None:
        super().__init__(
            f"this command needs the Python package '{module}', which is not installed",
            f"install it with: pip install 'yitrt[{extra}]'",
        )
        self.module = module
        self.extra = extra


def require(module: str, extra: str):
    """Import an optional heavy dependency lazily, turning its absence into a clear error.

    Args:
        module: dotted module name to import.
        extra: the yitrt extra that provides it (named in the error hint).

    Returns:
        The imported module.

    Raises:
        MissingDependencyError: when the module cannot be imported.
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingDependencyError(module.split(".")[0], extra) from exc


class BuildError(YitrtError):
    """``trtllm-build`` ran and failed; the message names the likely cause, the hint the fix and the log."""

    exit_code = 11

    def __init__(self, message: str, hint: str = "", log: str | None = None, cause_id: str | None = None) -> None:
        super().__init__(message, hint)
        self.log = log
        self.cause_id = cause_id


class MissingToolError(YitrtError):
    """An external program (trtllm-build, nvidia-smi, tritonserver, mpirun) or a GPU that a stage needs is absent."""

    exit_code = 12


class ServerError(YitrtError):
    """Triton did not start or stopped answering."""

    exit_code = 14


class RequestFailedError(YitrtError):
    """The server answered a request with an error."""

    exit_code = 15


class VerifyFailedError(YitrtError):
    """`yitrt verify` ran (in `yitrt run`) and a threshold failed (the same exit status as `yitrt verify`)."""

    exit_code = 10


class SmokeFailedError(YitrtError):
    """The served deployment answered the smoke chat, but not with the text the recipe expects."""

    exit_code = 16


class LoraError(YitrtError):
    """A LoRA adapter (or its request tensors) cannot be used with this base model, engine or option set."""

    exit_code = 17


# -- OSErrors: the environment refusing an operation (never a bug in yitrt) ---------------------------------------

#: errno → (what the operating system said, in words; the fix). One table for every place that turns an OSError
#: into a user error: artifact writes (yitrt.manifest), user-named files (yitrt.userfiles), the CLI's last resort.
OS_ERRORS: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("no space left on the device", "free disk space, or choose another destination (e.g. --out) on a larger disk"),
    errno.EDQUOT: ("the disk quota is exceeded", "free space within your quota, or choose another destination (e.g. --out)"),
    errno.EFBIG: ("a file is larger than this file system allows", "choose a destination on a file system that takes large files"),
    errno.EROFS: ("the file system is read-only", "choose a writable folder"),
    errno.EACCES: ("permission denied", "choose a folder you may write (or a file you may read), or fix its permissions"),
    errno.EPERM: ("the operation is not permitted", "choose a folder you may write, or fix its permissions"),
    errno.ENOTDIR: ("a parent in the path is a file, not a folder", "choose a path whose parents are folders"),
    errno.EEXIST: ("a file is in the way (a parent in the path is a file, or the name is taken)", "choose a path whose parents are folders"),
    errno.EISDIR: ("a folder is where a file is expected", "give a file, not a folder"),
    errno.ENOTEMPTY: ("a folder in the way is not empty", "choose another destination, or remove that folder yourself"),
    errno.ENAMETOOLONG: ("a name in the path is too long for the file system", "choose a shorter name"),
    errno.ELOOP: ("too many levels of symbolic links", "give a path without a symbolic-link loop"),
    errno.EMLINK: ("the folder holds too many entries or links", "choose another folder"),
    errno.ENOENT: ("no such file or folder", "check the path (was it removed while yitrt ran?)"),
    errno.EMFILE: ("too many open files in this process", "raise the limit (ulimit -n)"),
    errno.ENFILE: ("too many open files on this machine", "close other programs' files, or raise the system limit"),
    errno.EIO: ("an input/output error of the device", "check the disk (dmesg), or choose another destination"),
    errno.ENXIO: ("no such device", "give a regular file or folder"),
    errno.ETXTBSY: ("the file is busy (a running program)", "stop that program, or choose another destination"),
    errno.EBUSY: ("the file or folder is busy (a mount point, or in use)", "choose another destination"),
    errno.EXDEV: ("the paths are on different file systems", "keep the output beside its parent folder's other files"),
    errno.ESTALE: ("a stale network file handle", "remount the network file system, or choose a local folder"),
    errno.ENOMEM: ("the kernel is out of memory", "free memory, or run on a larger machine"),
}


def os_error(exc: OSError, path: object = None, action: str = "write", cls: type[YitrtError] | None = None) -> YitrtError:
    """The one-line user error for an OSError (disk full, read-only, permissions, a parent that is a file ...).

    Args:
        exc: what the operating system raised.
        path: what the user named (the ``--out`` folder, the file given); the file the OS refused is added in
            parentheses when it is another one (a file inside the output, a parent folder).
        action: what yitrt was doing, as a verb ("write", "read", "replace").
        cls: the error type (default ArtifactError; readers of user-named files pass UsageError or CheckpointError).

    Returns:
        The error to raise (``from exc``); its message names the path and its hint the fix.
    """
    what, fix = OS_ERRORS.get(exc.errno or -1, (exc.strerror or type(exc).__name__, "check the path and the disk"))
    subject = path if path not in (None, "") else exc.filename
    message = f"cannot {action}" + (f" {subject}" if subject not in (None, "") else "") + f": {what}"
    if exc.filename not in (None, "") and subject is not None and str(exc.filename) != str(subject):
        message += f" ({exc.filename})"
    return (cls or ArtifactError)(message, fix)
