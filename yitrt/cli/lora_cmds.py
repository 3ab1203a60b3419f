"""Commands `lora convert` (registered on the main app by ``register``)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from yitrt.cli import render
from yitrt.cli.options import AllowPickleOpt, ForceOpt, JsonOpt, OutOpt, RevisionOpt
from yitrt.lora.modules import STORE_DTYPES

LoraDtypeChoice = Enum("LoraDtypeChoice", {name: name for name in STORE_DTYPES}, type=str)


def register(app: typer.Typer) -> None:
    """Add the lora group to ``app``."""
    from yitrt.cli.app import create_app

    lora_app = create_app(help="LoRA adapters: convert a PEFT adapter into TensorRT-LLM's request format.")
    app.add_typer(lora_app, name="lora")

    @lora_app.command("convert")
    def convert(
        adapter: Annotated[str, typer.Argument(help="A PEFT adapter folder (adapter_config.json + adapter_model.safetensors) or Hub repo id.",
                                               show_default=False)],
        base: Annotated[str, typer.Option("--base", help="The base model: a Hugging Face model folder or repo id, or the TensorRT-LLM "
                                          "checkpoint folder the engine is built from.", show_default=False)],
        out: OutOpt,
        tp: Annotated[int | None, typer.Option("--tp", min=1, help="The engine's tensor-parallel size [default: the checkpoint's, or 1].",
                                               show_default=False)] = None,
        dtype: Annotated[LoraDtypeChoice | None, typer.Option("--dtype", help="The engine's dtype [default: the base's]; the weights "
                                                              "must have it.", show_default=False)] = None,
        max_lora_rank: Annotated[int | None, typer.Option("--max-lora-rank", min=1, help="The engine's max_lora_rank: refuse larger ranks.",
                                                          show_default=False)] = None,
        target_modules: Annotated[str | None, typer.Option("--target-modules", help="The engine's lora_target_modules, comma-separated "
                                                           "(attn_q,attn_k,...): refuse modules outside them.", show_default=False)] = None,
        revision: RevisionOpt = None,
        base_revision: Annotated[str | None, typer.Option("--base-revision", help="Branch, tag or commit of the base's Hub repo.",
                                                          show_default=False)] = None,
        allow_pickle: AllowPickleOpt = False,
        force: ForceOpt = False,
        json_: JsonOpt = False,
    ) -> None:
        """Convert a PEFT LoRA adapter into TensorRT-LLM's lora_weights / lora_config arrays (.npy) and a --lora_dir copy,
        checked against the base model and the engine's settings first."""
        from yitrt.lora.convert import convert_adapter, read_converted

        convert_adapter(adapter, base, Path(out), tp=tp, dtype=dtype.value if dtype is not None else None, max_lora_rank=max_lora_rank,
                        target_modules=target_modules, allow_pickle=allow_pickle, revision=revision, base_revision=base_revision,
                        force=force)
        converted = read_converted(out)
        info = converted.info
        data = {"path": str(out), **info, "files": [f["path"] for f in converted.manifest.get("files", [])]}
        if json_:
            render.emit_json(data)
            return
        ranks = ", ".join(f"{m} r{'/'.join(map(str, r))}" for m, r in info["ranks"].items())
        render.out.print(f"{out}: LoRA adapter {info['adapter_name']} for TensorRT-LLM, {info['rows']} rows × {info['max_row_len']} "
                         f"({info['dtype']}), tp {info['tp']}, layers {len(info['layers'])}, {ranks}"
                         + (", k/v rows repeated per KV head" if info.get("kv_heads_repeated") else ""))
