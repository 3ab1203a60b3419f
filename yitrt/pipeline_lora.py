"""The LoRA stages of ``yitrt run`` (``convert-lora``, ``verify-lora``) and what plan, build and deploy take of them.

A mixin of the pipeline's run (``yitrt.pipeline._Run``): the stage table, keys and artifacts stay there; the adapter
conversion, its verification and the LoRA parts of the build and deploy requests live here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from yitrt.errors import VerifyFailedError
from yitrt.manifest import ArtifactWriter, fingerprint_files
from yitrt.recipe import Recipe

#: where convert-lora writes each adapter's conversion (``<name>/``), under the work folder
LORA_ADAPTERS = "lora-adapters"


def local_adapter_fingerprints(spec: Recipe) -> dict[str, str]:
    """Adapter name → the identity (names, sizes, times) of its local folder's adapter files (Hub adapters: none; their
    revision is in the key, and the conversion itself checks the files' hashes)."""
    out = {}
    for adapter in spec.lora.adapters if spec.lora is not None else ():
        folder = Path(adapter.source).expanduser()
        if adapter.is_local and folder.is_dir():
            out[adapter.name] = fingerprint_files(folder, sorted(p.name for p in folder.iterdir() if p.is_file() and p.name.startswith("adapter_")))
    return out


class LoraStages:
    """The LoRA stage functions of a run (``self`` is the pipeline's ``_Run``: spec, work, artifacts, digests, opts)."""

    def _stage_convert_lora(self) -> dict[str, Any]:
        """Every adapter converted for the checkpoint (its dtype and tp), then checked together as the build will take
        them; the index artifact records each one's folder, task id and digest."""
        from yitrt.lora.convert import convert_adapter
        from yitrt.pipeline import _write_json, folder_digest, stage_parameters

        lora = self.spec.lora
        ids = lora.task_ids
        entries = []
        with self.progress("convert-lora", "steps") as cb:
            for i, adapter in enumerate(lora.adapters):
                out = self.work / LORA_ADAPTERS / adapter.name
                source = str(Path(adapter.source).expanduser().absolute()) if adapter.is_local else adapter.source
                convert_adapter(source, self.artifacts["convert"], out, max_lora_rank=lora.max_rank, target_modules=lora.target_modules,
                                allow_pickle=adapter.allow_pickle, revision=adapter.revision, force=self.opts.force)
                entries.append({"name": adapter.name, "task_id": ids[adapter.name], "path": str(out), "digest": folder_digest(out)})
                if cb is not None:
                    cb(f"adapter {adapter.name}", i + 1, len(lora.adapters))
        build = self._lora_build(entries)  # the rank and modules against max_rank and target_modules, all adapters at once
        out = self.out("convert-lora")
        with ArtifactWriter(out, "convert-lora", {"lora": stage_parameters(self.spec, "convert-lora")},
                            {"checkpoint": self.digests["convert"], **{f"adapter:{e['name']}": e["digest"] for e in entries}}) as art:
            _write_json(art.path / "adapters.json", {"adapters": entries, "build": build.to_json()})
        names = [e["name"] for e in entries]
        return {"artifact": out, "data": {"adapters": [{k: e[k] for k in ("name", "task_id")} for e in entries],
                                          "max_lora_rank": build.max_rank, "target_modules": list(build.target_modules)},
                "detail": f"{len(entries)} adapter(s) ({', '.join(names)}); "
                          f"max_lora_rank {build.max_rank}, modules {' '.join(build.target_modules)}"}

    def _stage_verify_lora(self) -> dict[str, Any]:
        """Every converted adapter verified on the checkpoint against transformers + peft (the checkpoint's thresholds)."""
        v = self.spec.verify
        if not v.enabled:
            return {"status": "skipped", "detail": "verify.enabled is false"}
        from yitrt.pipeline import _write_json, stage_parameters
        from yitrt.reference.verify import verify

        reports, summaries, warnings = {}, {}, []
        for entry in self._lora_entries():
            request = self._verify_request(Path(entry["path"]))
            with self.progress("verify-lora", "phase") as cb:
                report = verify(request, cb)
            data = report.to_json()
            if not report.passed:
                failed = self.work / f"verify-lora-{entry['name']}.failed.json"
                _write_json(failed, data)
                raise VerifyFailedError(f"verify of LoRA adapter {entry['name']} failed: {'; '.join(report.failures)} (report: {failed})",
                                        "see the report; convert the adapter again (`yitrt lora convert`) or check it against its base")
            reports[entry["name"]] = data
            summaries[entry["name"]] = {k: data[k] for k in ("top1_agreement", "ppl_delta_pct", "greedy_match_frac", "passed")}
            warnings += [f"adapter {entry['name']}: {w}" for w in report.warnings]
        out = self.out("verify-lora")
        with ArtifactWriter(out, "verify-lora", {"verify": stage_parameters(self.spec, "verify-lora")},
                            {"checkpoint": self.digests["convert"], "model": self.digests["fetch"], "lora": self.digests["convert-lora"]}) as art:
            _write_json(art.path / "reports.json", reports)
        return {"artifact": out, "warnings": list(dict.fromkeys(warnings)), "data": summaries,
                "detail": "; ".join(f"{name}: top-1 {s['top1_agreement']:.3f}, greedy {s['greedy_match_frac']:.2f}" for name, s in summaries.items())}

    def _lora_entries(self) -> list[dict[str, Any]]:
        """The converted adapters of this run (convert-lora's index)."""
        index = json.loads((Path(self.artifacts["convert-lora"]) / "adapters.json").read_text())
        return list(index["adapters"])

    def _lora_build(self, entries: list[dict[str, Any]] | None = None):
        """The engine's LoRA settings (``yitrt.build.lora.LoraBuild``; None without a lora section)."""
        lora = self.spec.lora
        if lora is None:
            return None
        from yitrt.build.lora import lora_build

        c = lora.cache
        cache = {"optimal_adapter_size": c.optimal_adapter_size, "max_adapter_size": c.max_adapter_size,
                 "gpu_memory_fraction": c.gpu_memory_fraction, "host_memory_bytes": c.host_memory_bytes}
        entries = entries if entries is not None else self._lora_entries()
        return lora_build([Path(e["path"]) for e in entries], lora.max_rank, lora.target_modules, cache)

    def _lora_deploy(self) -> dict[str, Any]:
        """The DeployRequest field of LoRA (none without a lora section)."""
        lora = self.spec.lora
        if lora is None:
            return {}
        from yitrt.triton.lora import AdapterRequest, LoraRequest

        built = self._lora_build()
        c = lora.cache
        adapters = tuple(AdapterRequest(e["name"], Path(e["path"]), e["task_id"]) for e in self._lora_entries())
        return {"lora": LoraRequest(adapters, c.optimal_adapter_size, c.max_adapter_size, c.gpu_memory_fraction, c.host_memory_bytes,
                                    c.prefetch, built.max_rank, built.target_modules)}
