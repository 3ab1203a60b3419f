"""LoRA on the client side of `yitrt chat` / `yitrt bench`: the deployed adapters, by name, and the request tensors
that select one.

`yitrt deploy` records the repository's adapters in ``<repo>/lora_adapters.json``:
``{"adapters": [{"name", "task_id", "dir" (the converted adapter's folder, relative to the repository), "rank",
"modules", "dtype"}]}``. A request for an adapter always carries ``lora_task_id``; the engine keeps adapters in a
cache by task id, so ``lora_weights`` and ``lora_config`` (the folder's ``model.lora_weights.npy`` /
``model.lora_config.npy``) go with a task's requests until the server has answered one of them, and again — once per
request — when the server says it no longer holds the task ("LoRA task N not found in cache", after an eviction;
trtllm-serving-features.md §2.3, §2.5). Weights re-sent for a cached id are ignored by the engine, so sending them on
the first requests in flight together is harmless.

``lora_weights`` must be the engine's dtype (§2.6): float16 arrays as float16, bf16 adapters (stored as the float32
of their bf16 values: numpy has no bf16) as TYPE_BF16 through ``ml_dtypes.bfloat16`` — tritonclient (2.73) refuses
float32 arrays for BF16 inputs.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from yitrt.errors import UsageError
from yitrt.lora import NPY_FILES
from yitrt.triton.contract import TRITON_DTYPES
from yitrt.triton.lora import ADAPTERS_FILE, MAX_TASK_ID

#: the adapter-mix name that means "no adapter"
BASE = "base"
_NOT_CACHED = "not found in cache"


@dataclass(frozen=True)
class RepoAdapter:
    """One deployed adapter: its name, task id and converted folder."""

    name: str
    task_id: int
    folder: Path
    dtype: str
    rank: int | None = None
    modules: tuple[str, ...] = ()

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(lora_weights [1, rows, L], lora_config [1, rows, 3] int32) as converted (never unpickled).

        Raises:
            UsageError: a missing or unreadable array file.
        """
        out = []
        for name in NPY_FILES:
            path = self.folder / name
            try:
                out.append(np.load(path, allow_pickle=False))
            except (OSError, ValueError) as exc:
                raise UsageError(f"adapter {self.name}: cannot read {path} ({exc})",
                                 "redeploy the repository (yitrt deploy) or convert the adapter again (yitrt lora convert)") from None
        weights, config = out
        if weights.dtype.kind != "f" or config.dtype.kind not in "iu":  # allow_pickle=False still loads string arrays
            raise UsageError(f"adapter {self.name}: {self.folder} holds {weights.dtype} weights and a {config.dtype} config, not float and int",
                             "redeploy the repository (yitrt deploy) or convert the adapter again (yitrt lora convert)")
        if weights.ndim == 2:
            weights, config = weights[None], config.reshape(1, -1, 3)
        return weights, config.astype(np.int32)


def read_adapters(repo: Path) -> dict[str, RepoAdapter]:
    """The adapters a deployed repository serves (``lora_adapters.json``), by name.

    Raises:
        UsageError: no such file (the repository serves no adapters), or one that is not what deploy writes.
    """
    from yitrt.userfiles import check_inside_name, read_json

    path = Path(repo) / ADAPTERS_FILE
    if not path.is_file():
        raise UsageError(f"{repo} lists no LoRA adapters (no {ADAPTERS_FILE})",
                         "deploy with the recipe's lora: adapters, and pass that repository with --repo")
    data = read_json(path, ADAPTERS_FILE, fix="redeploy the repository with yitrt deploy")
    entries = data.get("adapters")
    if not isinstance(entries, list):
        raise UsageError(f"{path}: 'adapters' is not a list", "redeploy the repository with yitrt deploy")
    out: dict[str, RepoAdapter] = {}
    for i, entry in enumerate(entries):
        ok = isinstance(entry, dict) and isinstance(entry.get("name"), str) and isinstance(entry.get("dir"), str) \
            and isinstance(entry.get("task_id"), int) and not isinstance(entry.get("task_id"), bool) \
            and 0 <= entry["task_id"] <= MAX_TASK_ID and isinstance(entry.get("dtype", "float16"), str) \
            and entry.get("dtype", "float16") in TRITON_DTYPES and isinstance(entry.get("modules") or [], list) \
            and all(isinstance(m, str) for m in entry.get("modules") or [])
        if not ok:
            raise UsageError(f"{path}: adapter {i} needs a name, a task_id of 0 to 2^64 - 1, a dir, a dtype of {', '.join(TRITON_DTYPES)} "
                             "and a list of module names", "redeploy the repository with yitrt deploy")
        if entry["name"] in out or entry["name"] == BASE:
            raise UsageError(f"{path}: adapter name {entry['name']!r} is {'repeated' if entry['name'] in out else 'reserved'}",
                             "give every adapter its own name (not 'base')")
        folder = check_inside_name(entry["dir"], Path(repo), ADAPTERS_FILE)
        rank = entry.get("rank")
        out[entry["name"]] = RepoAdapter(entry["name"], entry["task_id"], folder, entry.get("dtype", "float16"),
                                         rank if isinstance(rank, int) else None, tuple(entry.get("modules") or ()))
    return out


def pick(adapters: dict[str, RepoAdapter], name: str) -> RepoAdapter:
    """The adapter called ``name``.

    Raises:
        UsageError: no such adapter (the known names listed).
    """
    if name not in adapters:
        raise UsageError(f"no adapter {name!r} in the repository", "use one of: " + (", ".join(sorted(adapters)) or "(none)"))
    return adapters[name]


def parse_mix(text: str, known: set[str]) -> dict[str, float]:
    """``a:0.5,b:0.3,base:0.2`` → {name: weight}: every name known (or ``base``, no adapter), every weight > 0, the
    weights summing to 1 (± 1e-6).

    Raises:
        UsageError: a malformed item, an unknown or repeated name, a weight that is not positive, a sum other than 1.
    """
    mix: dict[str, float] = {}
    for item in (text or "").split(","):
        name, sep, weight = item.strip().rpartition(":")
        name = name.strip()
        try:
            value = float(weight) if sep and name else None
        except ValueError:
            value = None
        if value is None:
            raise UsageError(f"--lora-mix item {item.strip()!r} is not NAME:WEIGHT", "e.g. --lora-mix a:0.5,b:0.3,base:0.2")
        if name in mix:
            raise UsageError(f"--lora-mix names {name!r} twice", "give each adapter once")
        if name != BASE and name not in known:
            raise UsageError(f"--lora-mix names {name!r}, which the repository does not serve",
                             "use the adapters of lora_adapters.json (" + (", ".join(sorted(known)) or "none") + ") or base")
        if not value > 0 or value != value or value == float("inf"):
            raise UsageError(f"--lora-mix weight of {name!r} is {weight.strip()}: weights must be positive", "e.g. --lora-mix a:0.5,b:0.5")
        mix[name] = value
    total = sum(mix.values())
    if abs(total - 1.0) > 1e-6:
        raise UsageError(f"--lora-mix weights sum to {total:g}, not 1", "make the weights add up to 1, e.g. a:0.5,b:0.5")
    return mix


def assign(mix: dict[str, float], count: int, seed: int) -> list[str | None]:
    """An adapter name (None: base) for each of ``count`` requests, drawn with the mix's weights (reproducible: the
    draw is seeded; the counts follow the weights as closely as whole requests allow)."""
    names = list(mix)
    quotas = [mix[n] * count for n in names]
    counts = [int(q) for q in quotas]
    for i in sorted(range(len(names)), key=lambda i: quotas[i] - counts[i], reverse=True)[: count - sum(counts)]:
        counts[i] += 1  # largest remainders first: the whole-request counts closest to the weights
    order = [n for n, c in zip(names, counts, strict=True) for _ in range(c)]
    np.random.default_rng(seed).shuffle(order)
    return [None if n == BASE else n for n in order]


class LoraSender:
    """Which adapters this client must still send weights for, and their tensors (built once per adapter).

    Args:
        grpc: the tritonclient module (``tritonclient.grpc`` or its aio variant share ``InferInput``).
        declared: the entry model's input name → Triton dtype (``model_info``).
        adapters: the adapters this client may send.
    """

    def __init__(self, grpc, declared: dict[str, str], adapters: dict[str, RepoAdapter], model: str) -> None:
        missing = [n for n in ("lora_task_id", "lora_weights", "lora_config") if n not in declared]
        if missing:
            raise UsageError(f"model {model} has no input {', '.join(missing)}", "ask the BLS model or the ensemble of a LoRA deployment")
        self.grpc, self.declared, self.adapters = grpc, declared, adapters
        self._confirmed: set[str] = set()
        self._tensors: dict[str, list] = {}
        self._lock = threading.Lock()

    def id_tensor(self, name: str):
        """The ``lora_task_id`` input of adapter ``name`` (every request of it carries one)."""
        from tritonclient.utils import triton_to_np_dtype

        dtype = self.declared["lora_task_id"]
        array = np.array([[self.adapters[name].task_id]], dtype=triton_to_np_dtype(dtype))
        tensor = self.grpc.InferInput("lora_task_id", list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        return tensor

    def weight_tensors(self, name: str) -> list:
        """``lora_weights`` and ``lora_config`` of adapter ``name``, typed as the model declares them (built once).

        Raises:
            UsageError: the model declares ``lora_weights`` in another dtype than the adapter's (the engine would
                refuse it: "Expected lora weights to be the same data type as base model").
        """
        with self._lock:
            if name not in self._tensors:
                self._tensors[name] = self._build(self.adapters[name])
            return self._tensors[name]

    def needs_weights(self, name: str) -> bool:
        """Whether the next request of ``name`` must carry its weights (no answer of the server has confirmed it)."""
        return name not in self._confirmed

    def confirm(self, name: str) -> None:
        """The server answered a request of ``name``: it holds the adapter."""
        self._confirmed.add(name)

    def forget(self, name: str) -> None:
        """The server no longer holds ``name`` (evicted): send its weights again."""
        self._confirmed.discard(name)

    def _build(self, adapter: RepoAdapter) -> list:
        declared = self.declared["lora_weights"]
        wanted = TRITON_DTYPES[adapter.dtype].removeprefix("TYPE_")  # the client spells BF16, not TYPE_BF16
        if declared != wanted:
            raise UsageError(f"adapter {adapter.name} is {adapter.dtype}, but the server's lora_weights input is {declared}",
                             f"convert the adapter with --dtype as the engine's ({declared}) and redeploy, or redeploy so lora_weights is {wanted}")
        weights, config = adapter.arrays()
        if wanted == "BF16":
            import ml_dtypes

            weights = weights.astype(np.float32).astype(ml_dtypes.bfloat16)  # exact: the stored values are bf16 values
        else:
            weights = weights.astype(np.float16 if wanted == "FP16" else np.float32)
        out = []
        for name, array, dtype in (("lora_weights", weights, wanted), ("lora_config", config, "INT32")):
            tensor = self.grpc.InferInput(name, list(array.shape), dtype)
            tensor.set_data_from_numpy(np.ascontiguousarray(array))
            out.append(tensor)
        return out


def not_cached(error: str | None) -> bool:
    """Whether an error is the engine's "LoRA task N not found in cache" (the weights must be sent again)."""
    return bool(error) and _NOT_CACHED in error


def describe(adapter: RepoAdapter | None) -> dict[str, Any] | None:
    """What a report records of an adapter."""
    return None if adapter is None else {"name": adapter.name, "task_id": adapter.task_id, "dtype": adapter.dtype}
