"""Rich rendering of plans, builds, plugin profiles and the doctor report."""

from __future__ import annotations

from typing import Any

from yitrt.cli.render import human_bytes, out, table, warn


def _gb(n: float) -> str:
    return human_bytes(n)


def plan_report(data: dict[str, Any]) -> None:
    """Print one plan (no --compare)."""
    src, gpu = data["source"], data["gpu"]
    cand = data["candidates"][0]
    plan = cand["plan"]
    out.print(f"{src['name']} ({src['origin']}; {src['params'] / 1e9:.2f}B params, {src['num_layers']} layers, "
              f"{src['num_heads']} heads / {src['num_kv_heads']} KV heads × {src['head_dim']}) on {cand['tp'] * cand['pp']} × "
              f"{gpu['name']} ({gpu['memory_gb']:.1f} GB, SM {gpu['sm']}), scheme {cand['scheme']}, KV {plan['kv_cache']}, "
              f"tp {cand['tp']} × pp {cand['pp']}, profile {cand['profile']}, TensorRT-LLM {data['trtllm_version']}")
    rows = []
    for r in plan["ranks"]:
        if r["tp_rank"] > 0:
            continue  # the TP ranks of a stage hold the same amounts
        rows.append([f"{r['rank']} (pp {r['pp_rank']}, {r['layers']} layers)", _gb(r["weight_bytes"]), _gb(r["activation_bytes"]),
                     _gb(r["overhead_bytes"]), _gb(r["kv_pool_bytes"]), f"{r['kv_bytes_per_token']:,}", f"{r['kv_tokens']:,}", f"{r['kv_blocks']:,}"])
    out.print(table("Memory per GPU (TP ranks of a stage hold the same)",
                    ["rank", "weights", "activations", "runtime", "KV pool", "KV B/token", "KV tokens", "blocks"], rows))
    seq = plan["isl"] + plan["osl"]
    if plan["fits"]:
        out.print(f"fits: {plan['max_concurrent_sequences']} concurrent sequences of {seq} tokens (ISL {plan['isl']} + OSL {plan['osl']}); "
                  f"KV pool {plan['kv_tokens']:,} tokens = {plan['kv_blocks']:,} blocks of {plan['tokens_per_block']}, "
                  f"{plan['blocks_per_sequence']} blocks per sequence")
    else:
        out.print("[bold red]does not fit[/bold red]: " + "; ".join(plan["problems"]), markup=True)
    cache = plan.get("prefix_cache")
    if plan["fits"] and cache:
        copies = "-" if cache["resident_prefixes"] is None else cache["resident_prefixes"]
        capped = "-" if cache["resident_prefixes_within_max_tokens"] is None else cache["resident_prefixes_within_max_tokens"]
        out.print(f"prefix cache (KV reuse, needs use_paged_context_fmha): beside a full batch ({cache['running_batch_blocks']:,} blocks) the pool "
                  f"keeps {cache['spare_blocks']:,} blocks = {copies} copies of a {cache['prefix_tokens']}-token system prompt "
                  f"({cache['blocks_per_prefix']} full blocks each); within max_tokens_in_paged_kv_cache: {capped}")
    lim = plan["build_limits"]
    out.print(f"build limits: --max-batch-size {lim['max_batch_size']} --max-num-tokens {lim['max_num_tokens']} "
              f"--max-seq-len {lim['max_seq_len']} (max_input_len {lim['max_input_len']})")
    tri = plan["triton"]
    out.print(f"Triton: kv_cache_free_gpu_mem_fraction {tri['kv_cache_free_gpu_mem_fraction']}, "
              f"max_tokens_in_paged_kv_cache {tri['max_tokens_in_paged_kv_cache']:,}")
    if plan.get("lora"):
        lora_cache_line(plan["lora"])
    for note in plan["notes"]:
        out.print(f"note: {note}")
    for s in data["suggestions"]:
        out.print(f"would fit: {s}")
    if data.get("speculative"):
        speculative_report(data["speculative"], plan)
    for w in data["warnings"]:
        warn(w)
    if data.get("slo"):
        slo_report(data["slo"])


def lora_cache_line(lora: dict[str, Any]) -> None:
    """Print the LoRA adapter cache of a plan: per stage, the device and host caches and how many max-sized adapters fit."""
    for stage in lora["stages"]:
        out.print(f"adapter cache (LoRA, rank {stage['rank']}, pp {stage['pp_rank']}): device {_gb(stage['device_cache_bytes'])} "
                  f"(lora_cache_gpu_memory_fraction {lora['gpu_memory_fraction']:g} of what the KV pool leaves), host "
                  f"{_gb(stage['host_cache_bytes'])}; a max-sized adapter (rank {lora['max_adapter_size']} over "
                  f"{', '.join(lora['modules'])}) takes {_gb(stage['max_adapter_bytes'])}: {stage['max_adapters_on_device']:,} fit on the "
                  f"GPU, {stage['max_adapters_on_host']:,} on the host")


def speculative_report(spec: dict[str, Any], target_plan: dict[str, Any]) -> None:
    """Print what speculative decoding adds: a lookahead engine's sizes, or a draft-target pair's memory split."""
    engine = (target_plan.get("speculative") or {}).get("engine_limits") or {}
    if spec["mode"] == "lookahead":
        la = spec["triton"]["tensorrt_llm"]
        out.print(f"lookahead (W, N, G) = ({spec['window']}, {spec['ngram']}, {spec['verification_set']}): --max_draft_len "
                  f"{spec['max_draft_len']}, {spec['decoding_tokens']} tokens per sequence per step; the engine holds "
                  f"max_seq_len {engine.get('max_seq_len')}, max_num_tokens {engine.get('max_num_tokens')}")
        out.print("Triton tensorrt_llm: " + ", ".join(f"{k} {v}" for k, v in la.items()))
        return
    d = spec["draft_model"]
    out.print(f"draft-target: draft {d['name']} ({d['params'] / 1e9:.2f}B params, {d['num_layers']} layers), scheme {d['scheme']}, "
              f"KV {d['kv_cache'] or d['dtype']}, tp {d['tp']} on {spec['shared_gpus']} of the {spec['gpus']} GPUs, "
              f"K = {spec['max_draft_len']} draft tokens per round")
    w, a, r = spec["weight_bytes_per_gpu"], spec["activation_bytes_per_gpu"], spec["runtime_bytes_per_gpu"]
    pools, share, tokens, bpt = spec["kv_pool_bytes"], spec["kv_share_of_free"], spec["kv_tokens"], spec["kv_bytes_per_token"]
    rows = [[who, _gb(w[who]), _gb(a[who]), _gb(r[who]), _gb(pools[who]), f"{share[who]:.1%}", f"{bpt[who]:,}", f"{tokens[who]:,}"]
            for who in ("target", "draft")]
    rows.append(["both", _gb(w["total"]), _gb(a["total"]), _gb(r["total"]), _gb(pools["target"] + pools["draft"]),
                 f"{share['target'] + share['draft']:.1%}", "", ""])
    out.print(table(f"Two engines per GPU ({_gb(spec['free_bytes_per_gpu'])} free after both engines load)",
                    ["engine", "weights", "activations", "runtime", "KV pool", "share of free", "KV B/token", "KV tokens"], rows))
    state = "fits" if spec["fits"] else "[bold red]does not fit[/bold red]"
    out.print(f"pair {state}: {spec['max_concurrent_sequences']} concurrent sequences in both pools; both engines built with "
              f"max_batch_size {spec['max_batch_size']}; the target holds max_seq_len {engine.get('max_seq_len')} and "
              f"max_num_tokens {engine.get('max_num_tokens')} (+{spec['max_draft_len']} draft tokens)", markup=True)
    for problem in spec["problems"]:
        out.print(f"problem: {problem}")
    for model, params in spec["triton"].items():
        out.print(f"Triton {model}: kv_cache_free_gpu_mem_fraction {params['kv_cache_free_gpu_mem_fraction']}, "
                  f"max_tokens_in_paged_kv_cache {params['max_tokens_in_paged_kv_cache']:,}")
    for note in spec["notes"] + spec["draft"].get("notes", []):
        out.print(f"note: {note}")


def compare_report(data: dict[str, Any]) -> None:
    """Print the tp × scheme comparison."""
    gpu = data["gpu"]
    rows = []
    for c in data["candidates"]:
        p = c["plan"]
        if c["invalid"] or not p:
            rows.append([c["scheme"], c["kv_cache"] or "-", c["tp"], "-", "-", "-", "-", "invalid: " + c["invalid"][0] if c["invalid"] else "invalid"])
            continue
        r0 = max(p["ranks"], key=lambda r: r["weight_bytes"])
        status = "fits" if c["fits"] else "no: " + (p["problems"][0] if p["problems"] else "")
        rows.append([c["scheme"], p["kv_cache"], c["tp"], _gb(r0["weight_bytes"]), f"{r0['kv_bytes_per_token']:,}",
                     f"{p['kv_tokens']:,}", p["max_concurrent_sequences"] if c["fits"] else 0, status])
    isl_osl = data["candidates"][0]["plan"] if data["candidates"] and data["candidates"][0]["plan"] else None
    seq = f"{isl_osl['isl'] + isl_osl['osl']}-token sequences" if isl_osl else "sequences"
    out.print(table(f"{data['source']['name']} on {gpu['name']} ({gpu['memory_gb']:.1f} GB per GPU)",
                    ["scheme", "KV", "tp", "weights/GPU", "KV B/token/GPU", "KV tokens", f"max {seq}", "status"], rows))


def slo_report(slo: dict[str, Any]) -> None:
    """Print the SLO-aware choice."""
    if slo.get("error"):
        warn(slo["error"])
        return
    best = slo.get("best")
    rows = [[c["scheme"], c["tp"], c["batch"], f"{c['ttft_ms']:.1f}", f"{c['tpot_ms']:.2f}", f"{c['tokens_per_s_per_gpu']:.0f}",
             "yes" if c["meets_slo"] else "no", c["data"]] for c in slo["candidates"]]
    out.print(table(f"AIConfigurator estimates ({slo['system']}, TensorRT-LLM {slo['backend_version']}); "
                    f"SLO TTFT <= {slo['slo_ttft_ms']} ms, TPOT <= {slo['slo_tpot_ms']} ms",
                    ["scheme", "tp", "batch", "TTFT ms", "TPOT ms", "tok/s/GPU", "meets SLO", "data"], rows))
    if best:
        out.print(f"best under the SLO: --scheme {best['scheme']} --tp {best['tp']} at batch {best['batch']}: "
                  f"{best['tokens_per_s_per_gpu']:.0f} tokens/s/GPU (TTFT {best['ttft_ms']:.1f} ms, TPOT {best['tpot_ms']:.2f} ms)")
    else:
        out.print("no candidate meets both bounds")
    for note in slo.get("notes", []):
        out.print(f"note: {note}")


def build_report(data: dict[str, Any]) -> None:
    """Print a build (or dry-run) summary."""
    for w in data["warnings"]:
        warn(w)
    cfg = data["build_config"]
    if data["dry_run"]:
        import shlex

        out.print(shlex.join(data["argv"]))
        lim = cfg["limits"]
        out.print(f"# TensorRT-LLM {cfg['trtllm_version']} ({cfg['release_line']}) on {cfg['gpu']['name']} (SM {cfg['gpu']['sm']}), "
                  f"profile {' + '.join(cfg['profiles'])}, {cfg['world_size']} rank(s); limits {lim}; "
                  f"plan: {cfg['plan']['max_concurrent_sequences']} sequences of {cfg['plan']['isl'] + cfg['plan']['osl']} tokens")
        lora = cfg.get("lora")
        if lora:
            out.print(f"# lora: {len(lora['adapters'])} adapter(s) ({', '.join(a['name'] for a in lora['adapters'])}), modules "
                      f"{' '.join(lora['target_modules'])}, max_lora_rank {lora['max_lora_rank']}, --lora_dir {lora['lora_dir']}")
            if cfg["plan"].get("lora_cache"):
                lora_cache_line(cfg["plan"]["lora_cache"])
        spec = cfg.get("speculative")
        if spec:
            eng = cfg["engine_limits"]
            out.print(f"# speculative: {spec['role']} (speculative_decoding_mode {spec['speculative_decoding_mode'] or 'none'}, "
                      f"max_draft_len {spec['max_draft_len']}); the engine will hold max_seq_len {eng['max_seq_len']}, "
                      f"max_num_tokens {eng['max_num_tokens']}")
            pair = cfg["plan"].get("pair")
            if pair:
                out.print(f"# pair: {pair['max_concurrent_sequences']} sequences in both pools; Triton " + "; ".join(
                    f"{m}: fraction {t['kv_cache_free_gpu_mem_fraction']}, max_tokens {t['max_tokens_in_paged_kv_cache']}"
                    for m, t in pair["triton"].items()))
        return
    if data["reused"]:
        out.print(f"{data['out']}: up to date (same checkpoint, argv, GPU and TensorRT-LLM; --force rebuilds)")
        return
    eng = data["engine"]
    out.print(f"{data['out']}: engine for {eng['gpu']} (SM {eng['gpu_sm']}), TensorRT-LLM {eng['trtllm_version']}, "
              f"TensorRT {eng['tensorrt_version'] or 'unknown'}, {eng['world_size']} rank(s), built in {data['seconds']:.1f}s; log {data['log']}")


def plugins_table(rows: list[dict[str, Any]]) -> None:
    """Print `yitrt plugins list`."""
    out.print(table("Plugin profiles", ["name", "picked for", "summary"], [
        [r["name"], (", ".join(r["select"]["schemes"]) + " on SM " + "-".join(dict.fromkeys(map(str, r["select"]["sm"])))) if r["select"]
         else f"opt-in (extends {r['extends']})" if r["extends"] else "opt-in", r["summary"]] for r in rows]))


def plugin_profile(data: dict[str, Any]) -> None:
    """Print `yitrt plugins show`."""
    out.print(f"{data['name']}: {data['summary']} ({data['path']})")
    if data["requires"]:
        out.print(f"requires: {data['requires']}")
    rows = [[k, v, data["why"].get(k, "")] for k, v in data["flags"].items()]
    rows += [[f"{k} (tp > 1)", v, data["why"].get(f"{k} (tp > 1)", "")] for k, v in data["multi_gpu"].items()]
    rows += [[f"limit {k}", v, data["why"].get(k, "")] for k, v in data["limits"].items()]
    out.print(table("flags", ["flag", "value", "why"], rows))


def doctor_report(data: dict[str, Any]) -> None:
    """Print `yitrt doctor`."""
    gpus = data["gpus"]
    if gpus:
        out.print(table("GPUs", ["#", "name", "SM", "memory", "free", "driver", "yitrt name"], [
            [g["index"], g["name"], g["sm"], f"{g['memory_total_mib']} MiB", f"{g['memory_free_mib']} MiB", g["driver"], g["known_as"] or "?"]
            for g in gpus]))
        out.print(f"CUDA (driver): {data['cuda_driver'] or 'unknown'}")
    else:
        out.print("GPUs: none visible (no nvidia-smi, or no driver)")
    t = data["tensorrt_llm"]
    out.print(f"trtllm-build: {t['trtllm_build'] or 'not found'}; TensorRT-LLM {t['trtllm_version'] or '-'}; TensorRT {t['tensorrt_version'] or '-'}")
    out.print(f"mpirun: {data['mpirun']['path'] or 'not found'} {data['mpirun']['version'] or ''}".rstrip())
    out.print(f"tritonserver: {data['tritonserver'] or 'not found'}")
    out.print("packages: " + ", ".join(f"{k} {v or '-'}" for k, v in data["packages"].items()))
    mem = data["memory"]
    out.print(f"disk free at {data['disk']['path']}: {human_bytes(data['disk']['free_bytes'])}; memory "
              f"{human_bytes(mem['available_bytes'] or 0)} available of {human_bytes(mem['total_bytes'] or 0)}")
    out.print(table("What this machine can run", ["stage", "ready", "detail"],
                    [[s["stage"], "yes" if s["ready"] else "no", s["detail"]] for s in data["stages"]]))
    eng = data.get("engine")
    if eng:
        if eng.get("error"):
            warn(f"engine {eng['path']}: {eng['error']}")
        else:
            for c in eng["checks"]:
                out.print(f"engine {c['what']}: built {c['engine']}, here {c['here']} → {'match' if c['match'] else 'MISMATCH'}")
