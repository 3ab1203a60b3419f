"""The one error hierarchy of yitrt.

Library code raises these; the CLI maps each type to a one-line message, a hint naming the fix and an
exit code (see ``yitrt.cli.app``). A user error never shows a traceback unless ``YITRT_DEBUG=1``.
"""

from __future__ import annotations


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
