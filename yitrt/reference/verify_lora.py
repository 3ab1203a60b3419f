"""``yitrt verify CHECKPOINT --lora DIR``: does a converted LoRA adapter compute what PEFT computes?

``DIR`` is the output of ``yitrt lora convert``. The reference runtime applies the converted request arrays
(``model.lora_weights.npy`` / ``model.lora_config.npy``, read through ``yitrt.lora.convert.read_converted`` and
validated by ``yitrt.lora.format.unpack`` against the checkpoint as the engine validates them) — never the PEFT
tensors. The yardstick is transformers + ``peft``: ``PeftModel.from_pretrained`` over the HF original with the
adapter folder the artifact carries, ``DIR/hf`` (the copy ``trtllm-build --lora_dir`` reads, safetensors only,
whose bytes the artifact's manifest proves unchanged since conversion; the source recorded in the manifest may be
a Hub id or a folder that has moved since, and a second download would prove nothing more), its A and B·scaling
rounded to the engine dtype as the engine receives them (``with_peft``). So a mistake of the conversion — A and B swapped, B left unscaled or transposed, a module written under another id — shows as a
difference between the two, judged with the checkpoint's usual thresholds.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from yitrt.errors import LoraError, require
from yitrt.lora import HF_DIR
from yitrt.lora.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS

#: the task id the adapter is loaded under in verify's runtime (any id: the runtime holds one adapter)
VERIFY_TASK_ID = 1


@dataclass(frozen=True)
class AdapterUnderTest:
    """A converted adapter, read and validated against the checkpoint before any model runs.

    Attributes:
        folder: the converted folder (``yitrt lora convert`` output).
        weights, config: the request arrays (``lora_weights`` [1, rows, L], ``lora_config`` [1, rows, 3]).
        info: the facts the conversion recorded (the manifest's ``extra``).
        hf_dir: the PEFT adapter folder the comparison loads (``folder/hf``).
        warnings: what does not stop the comparison but should be known (e.g. converted for another base).
    """

    folder: Path
    weights: Any
    config: Any
    info: dict[str, Any]
    hf_dir: Path
    warnings: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """What the verify report says about the adapter."""
        i = self.info
        return {
            "dir": str(self.folder), "name": i.get("adapter_name"), "source": i.get("adapter_source"), "r": i.get("r"),
            "alpha": i.get("alpha"), "rslora": i.get("rslora"), "max_rank": i.get("max_rank"), "dtype": i.get("dtype"),
            "tp": i.get("tp"), "modules": i.get("trtllm_modules"), "hf_modules": i.get("hf_modules"), "rows": i.get("rows"),
            "task_id": VERIFY_TASK_ID,
            "compared_with": f"transformers + peft over {self.hf_dir} (A and B·scaling rounded to {i.get('dtype')}, as the engine holds them)",
        }


def read_adapter(folder: Path, spec, checkpoint: Path, model: Path) -> AdapterUnderTest:
    """Read a converted adapter and check it against the checkpoint, all before loading a model: the arrays as the
    engine checks a request (dims, modules, layers, the checkpoint's dtype), the PEFT copy present, ``peft``
    installed. A fingerprint of another base is a warning (the comparison runs both sides on this base anyway).

    Raises:
        LoraError: not a converted adapter, files changed since conversion, arrays the engine would refuse, no
            safetensors PEFT copy. MissingDependencyError: ``peft`` is not installed.
    """
    from yitrt.lora.convert import read_converted
    from yitrt.reference.lora import unpack_for

    require("peft", "lora")
    converted = read_converted(folder)
    info = dict(converted.info)
    _check_kv_layout(info, spec, folder)
    unpack_for(spec, converted.weights, converted.config, engine_dtype=spec.dtype)
    hf_dir = Path(folder) / HF_DIR
    missing = [n for n in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if not (hf_dir / n).is_file()]
    if missing:
        raise LoraError(f"{folder}: the PEFT copy lacks hf/{', hf/'.join(missing)}", "convert the adapter again with `yitrt lora convert`")
    warnings = []
    recorded = info.get("base_fingerprint")
    if recorded and recorded not in _fingerprints(checkpoint, model):
        warnings.append(f"the adapter was converted for base {info.get('base')!r}, not for this checkpoint or its original "
                        "(same dims; the comparison runs both sides on this base)")
    return AdapterUnderTest(Path(folder), converted.weights, converted.config, info, hf_dir, tuple(warnings))


def _check_kv_layout(info: dict[str, Any], spec, folder: Path) -> None:
    """Refuse k/v adapters converted for a tp whose KV-head repetition differs from the checkpoint's: the row
    lengths may still pass the engine's check (rows are padded to the longest module), so the engine would read the
    wrong rows without a word (trtllm-serving-features.md §2.6)."""
    from yitrt.lora.modules import by_trtllm

    tp = info.get("tp")
    kv = [m for m in info.get("trtllm_modules") or [] if (module := by_trtllm(m)) is not None and module.role in ("k", "v")]
    if not kv or not isinstance(tp, int) or tp == spec.tp:
        return
    module = by_trtllm(kv[0])
    if module.out_dim(spec, tp) != module.out_dim(spec, spec.tp):
        raise LoraError(f"{folder} was converted for tp {tp}, the checkpoint is tp {spec.tp}: its {', '.join(kv)} rows are laid out "
                        f"for {module.out_dim(spec, tp)} outputs, the engine expects {module.out_dim(spec, spec.tp)} (KV heads repeated per rank)",
                        f"convert the adapter with `yitrt lora convert ... --tp {spec.tp}`")


def _fingerprints(*folders: Path) -> set[str]:
    """The identities ``yitrt lora convert`` records for a base: its artifact digest, else its config's sha256."""
    from yitrt.manifest import artifact_digest

    found = set()
    for folder in folders:
        digest = artifact_digest(Path(folder))
        if digest:
            found.add(digest)
        config = Path(folder) / "config.json"
        if config.is_file():
            found.add(hashlib.sha256(config.read_bytes()).hexdigest())
    return found


def with_peft(original, adapter: AdapterUnderTest):
    """The HF original with the PEFT adapter applied (``PeftModel.from_pretrained``, adapter weights from
    ``adapter_model.safetensors``), in eval mode, its weights held as the engine holds them.

    An engine receives A and B·scale in its own dtype (trtllm-serving-features.md §2.6), and PEFT adapters are often
    saved in float32: left as they are, that rounding (a few 10⁻³ logits on a bf16 model) flips near-tied top-1 tokens,
    which the unquantized thresholds count as errors. So each LoRA layer's A and ``B · scaling`` — PEFT's own
    scaling of that module (alpha/r, rsLoRA, rank and alpha patterns), never the converter's — are rounded to the
    adapter's dtype, and the scaling set to 1: PEFT then computes what the engine computes from a correct conversion.

    Raises:
        LoraError: PEFT cannot load the adapter onto this model.
    """
    import torch

    peft = require("peft", "lora")
    try:
        model = peft.PeftModel.from_pretrained(original, str(adapter.hf_dir), is_trainable=False)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LoraError(f"peft could not load {adapter.hf_dir} onto the original ({first})", "convert the adapter for this base model") from None
    from yitrt.reference.runtime import TORCH_DTYPES

    store = TORCH_DTYPES[adapter.info["dtype"]]  # one of the store dtypes: read_converted checked it
    with torch.no_grad():
        for layer in model.modules():
            if not isinstance(layer, peft.tuners.lora.LoraLayer):
                continue
            for name in list(layer.lora_A):
                a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
                a.copy_(a.to(store).to(a.dtype))
                b.copy_((b * layer.scaling[name]).to(store).to(b.dtype))
                layer.scaling[name] = 1.0
    return model.eval()
