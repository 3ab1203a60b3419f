"""`yitrt deploy` on an engine folder written by the TEST DOUBLE of trtllm-build (our side of the boundary: the
folder layout and config.json a 1.2 build writes — no engine is built or served here), and its refusals."""

from __future__ import annotations

import json
import os

import pytest

from yitrt.build.runner import BuildRequest, build_engine
from yitrt.checkpoint.convert import ConvertRequest, convert
from yitrt.errors import CheckpointError, UsageError, ValidationError
from yitrt.manifest import read_manifest
from yitrt.triton.pbtxt import parse_config
from yitrt.triton.repository import DeployRequest, deploy


@pytest.fixture
def model(make_model):
    return make_model(tokenizer=True)


@pytest.fixture
def engine(tool_doubles, model, tmp_path):
    """A tp 2 engine folder from the trtllm-build double, with yitrt's engine manifest (plan KV settings)."""
    tool_doubles()
    ckpt = tmp_path / "ckpt"
    convert(ConvertRequest(model, ckpt, tp=2))
    out = tmp_path / "engine"
    build_engine(BuildRequest(ckpt, out))
    return out


def test_deploy_an_engine_derives_world_size_limits_and_kv_settings(engine, tmp_path):
    repo = tmp_path / "repo"
    result = deploy(DeployRequest(engine, repo))  # the tokenizer comes from the checkpoint's recorded source
    config = json.loads((engine / "config.json").read_text())
    plan = read_manifest(engine).extra["engine"]["build_config"]["plan"]
    trt = parse_config((repo / "tensorrt_llm" / "config.pbtxt").read_text())
    params = {k: v.string_value for k, v in trt.parameters.items()}
    assert trt.backend == "tensorrtllm" and trt.max_batch_size == config["build_config"]["max_batch_size"]
    assert params["gpt_model_path"] == str(engine) and params["gpt_model_type"] == "inflight_fused_batching"
    assert float(params["kv_cache_free_gpu_mem_fraction"]) == plan["kv_cache_free_gpu_mem_fraction"]
    assert int(params["max_tokens_in_paged_kv_cache"]) == plan["max_tokens_in_paged_kv_cache"]
    assert not list((repo / "tensorrt_llm" / "1").iterdir())  # the C++ backend needs no model.py
    launch = (repo / "launch.sh").read_text()
    assert launch.count("-n 1 ") == 2 and "mpirun --allow-run-as-root" in launch  # exactly tp×pp = 2 ranks
    assert "prefix0_" in launch and "prefix1_" in launch and launch.count("--load-model=tensorrt_llm") == 1
    assert (repo / "preprocessing" / "tokenizer" / "tokenizer.json").is_file()
    pre = {k: v.string_value for k, v in parse_config((repo / "preprocessing" / "config.pbtxt").read_text()).parameters.items()}
    assert pre["max_input_len"] == str(config["build_config"]["max_input_len"]) and pre["tokenizer_dir"] == "preprocessing/tokenizer"
    assert result.engine.world_size == 2 and "tensorrt_llm_bls" in (repo / "README.md").read_text()
    again = deploy(DeployRequest(engine, repo))
    assert again.reused  # same inputs: nothing rewritten


def test_end_id_is_the_chat_turn_end_and_every_eos_stops(model, tmp_path):
    """The Yi-Chat trap (reference §8 #1): tokenizer eos </s> (2) while the template ends turns with <|im_end|>."""
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 1]}))
    tok = json.loads((model / "tokenizer.json").read_text())
    im_end = next(t["id"] for t in tok["added_tokens"] if t["content"] == "<|im_end|>")
    ckpt = tmp_path / "ckpt"
    convert(ConvertRequest(model, ckpt))
    result = deploy(DeployRequest(ckpt, tmp_path / "repo", engine="reference"))
    assert result.summary["end_id"] == im_end and set(result.summary["stop_ids"]) == {1, 2}
    pre = {k: v.string_value for k, v in parse_config((tmp_path / "repo" / "preprocessing" / "config.pbtxt").read_text()).parameters.items()}
    assert pre["end_id"] == str(im_end) and set(pre["stop_token_ids"].split(",")) == {"1", "2"}


def test_serving_options_the_engine_cannot_honour_are_all_reported(engine, tmp_path):
    config = json.loads((engine / "config.json").read_text())
    config["build_config"]["plugin_config"]["use_paged_context_fmha"] = False  # as config.json writes it
    (engine / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValidationError) as caught:
        deploy(DeployRequest(engine, tmp_path / "repo", kv_reuse=True, chunked_context=True, max_kv_tokens=100,
                             max_batch_size=10_000))
    text = str(caught.value)
    for expected in ("KV-cache reuse needs paged context FMHA", "chunked context needs paged context FMHA",
                     "--max-kv-tokens 100 cannot hold", "exceeds the engine's max_batch_size"):
        assert expected in text
    assert not (tmp_path / "repo").exists() and not list(tmp_path.glob("repo.partial-*"))


def test_wrong_folders_and_versions_are_refused(engine, model, tmp_path):
    ckpt = tmp_path / "ckpt"
    with pytest.raises(UsageError, match="holds a checkpoint"):
        deploy(DeployRequest(ckpt, tmp_path / "r1"))
    with pytest.raises(UsageError, match="not a TensorRT-LLM engine"):
        deploy(DeployRequest(model, tmp_path / "r2"))  # an HF model folder
    with pytest.raises(ValidationError, match="built with TensorRT-LLM 1.2"):
        deploy(DeployRequest(engine, tmp_path / "r3", trtllm_version="1.0"))
    (engine / "rank1.engine").unlink()
    with pytest.raises(CheckpointError, match="rank1.engine"):
        deploy(DeployRequest(engine, tmp_path / "r4"))
    with pytest.raises(UsageError, match="reference slot only"):
        deploy(DeployRequest(ckpt, tmp_path / "r5", max_input_len=10))


def test_cli_deploy_errors_are_one_line_and_keep_the_previous_repository(engine, tmp_path, cli):
    repo = tmp_path / "repo"
    assert cli("deploy", str(engine), "--out", str(repo)).returncode == 0
    before = (repo / "yitrt-manifest.json").read_text()
    done = cli("deploy", str(engine), "--out", str(repo), "--kv-reuse", "--max-kv-tokens", "1", "--force")
    assert done.returncode == 3 and "Traceback" not in done.stderr and "--max-kv-tokens 1 cannot hold" in done.stderr
    assert (repo / "yitrt-manifest.json").read_text() == before  # the good repository is untouched
    data = json.loads(cli("deploy", str(engine), "--out", str(tmp_path / "r2"), "--no-streaming", "--json").stdout)
    assert data["streaming"] is False and data["world_size"] == 2 and data["entry_model"] == "tensorrt_llm_bls"


def _serve_with_mpirun_double(engine, tmp_path, monkeypatch, script: str):
    """A deployed tp 2 repository, and a TEST DOUBLE of mpirun (the given shell body) first on PATH."""
    import os

    repo = tmp_path / "repo"
    deploy(DeployRequest(engine, repo))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    double = bin_dir / "mpirun"
    double.write_text(f"#!/bin/sh\n# TEST DOUBLE of mpirun\n{script}")
    double.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return repo


def test_serve_launches_exactly_world_size_ranks_through_mpirun(engine, tmp_path, monkeypatch):
    """Our side of the mpirun boundary: a TEST DOUBLE of mpirun records the command `yitrt serve` runs for a tp 2
    repository (no GPU here to run real ranks) and exits, which serve reports as a failed start."""
    from yitrt.errors import ServerError
    from yitrt.triton.server import Ports, ServeRequest, start_server

    record = tmp_path / "mpirun.argv"
    repo = _serve_with_mpirun_double(engine, tmp_path, monkeypatch,
                                     f"printf '%s\\n' \"$@\" > {record}\necho 'mpirun double: no ranks started'\nexit 3\n")
    fake_server = tmp_path / "bin" / "tritonserver"
    fake_server.write_text("#!/bin/sh\nexit 0\n")
    fake_server.chmod(0o755)
    with pytest.raises(ServerError, match="exited with code 3") as caught:
        start_server(ServeRequest(repo, Ports(18931, 18932, 18933), tritonserver=str(fake_server), ready_timeout=30))
    assert "mpirun double: no ranks started" in str(caught.value)
    argv = record.read_text().split("\n")
    assert argv[0] == "--allow-run-as-root" and argv.count(str(fake_server)) == 2 and argv.count(":") == 1
    assert argv.count("-n") == 2 and "--backend-config=python,shm-region-prefix-name=prefix1_" in argv
    assert argv.count("--load-model=tensorrt_llm") == 1 and argv.index("--load-model=tensorrt_llm") > argv.index(":")


def test_serve_gives_up_on_a_server_that_never_becomes_ready(engine, tmp_path, monkeypatch):
    """A TEST DOUBLE of mpirun that logs a line and hangs without ever serving: serve stops waiting after the ready
    timeout, reports the logged line and leaves no process of the group running."""
    import os

    from yitrt.errors import ServerError
    from yitrt.triton.server import Ports, ServeRequest, start_server

    pid_file = tmp_path / "double.pid"
    repo = _serve_with_mpirun_double(engine, tmp_path, monkeypatch,
                                     f"echo $$ > {pid_file}\necho 'mpirun double: loading forever'\nexec sleep 600\n")
    with pytest.raises(ServerError, match="not ready after 2 s") as caught:
        start_server(ServeRequest(repo, Ports(18934, 18935, 18936), tritonserver="/bin/true", ready_timeout=2, exit_timeout=1))
    assert "mpirun double: loading forever" in str(caught.value)
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # SIGTERM to the group ended the double's sleep (exec'd under the same pid)


# -- speculative decoding ----------------------------------------------------------------------------------------------


def _edit_build_config(engine, **keys):
    """Give an engine folder of the trtllm-build TEST DOUBLE the build_config keys a real speculative build writes
    (the double does not model speculation: config.json is our side of the boundary)."""
    config = json.loads((engine / "config.json").read_text())
    config["build_config"].update(keys)
    (engine / "config.json").write_text(json.dumps(config))


@pytest.fixture
def draft_engine(tool_doubles, model, tmp_path):
    """A tp 1 draft engine (the same tiny model, so the same tokenizer and vocab) with generation logits."""
    tool_doubles()
    ckpt = tmp_path / "draft-ckpt"
    convert(ConvertRequest(model, ckpt, tp=1))
    out = tmp_path / "draft-engine"
    build_engine(BuildRequest(ckpt, out))
    _edit_build_config(out, gather_generation_logits=True)
    return out


def test_deploy_draft_target_engines(engine, draft_engine, tmp_path, monkeypatch):
    _edit_build_config(engine, speculative_decoding_mode=2, max_draft_len=4)  # DRAFT_TOKENS_EXTERNAL
    repo = tmp_path / "repo"
    result = deploy(DeployRequest(engine, repo, speculative="draft-target", draft=draft_engine, num_draft_tokens=3, use_draft_logits=True))
    spec = result.summary["speculative"]
    assert (spec["mode"], spec["num_draft_tokens"], spec["max_draft_len"], spec["draft"]["model"]) == ("draft-target", 3, 4, "tensorrt_llm_draft")
    assert result.summary["models"] == ["ensemble", "preprocessing", "tensorrt_llm", "tensorrt_llm_draft", "postprocessing", "tensorrt_llm_bls"]
    assert result.summary["world_size"] == 1 and result.summary["orchestrator"] and result.summary["kv_reuse"] is True
    draft = parse_config((repo / "tensorrt_llm_draft" / "config.pbtxt").read_text())
    params = {k: v.string_value for k, v in draft.parameters.items()}
    assert draft.name == "tensorrt_llm_draft" and params["gpt_model_path"] == str(draft_engine) and params["gpu_device_ids"] == "0"
    assert not list((repo / "tensorrt_llm_draft" / "1").iterdir())  # the C++ backend needs no model.py
    bls = {k: v.string_value for k, v in parse_config((repo / "tensorrt_llm_bls" / "config.pbtxt").read_text()).parameters.items()}
    assert bls["tensorrt_llm_draft_model_name"] == "tensorrt_llm_draft" and bls["yitrt_num_draft_tokens"] == "3"
    launch = (repo / "launch.sh").read_text()
    assert "export TRTLLM_ORCHESTRATOR=1" in launch and "mpirun --allow-run-as-root -n 1" in launch and "prefix1_" not in launch
    assert "no streaming" in (repo / "README.md").read_text()
    assert read_manifest(repo).extra["deploy"]["orchestrator_gpus"] == [0, 1]
    assert deploy(DeployRequest(engine, repo, speculative="draft-target", draft=draft_engine, num_draft_tokens=3, use_draft_logits=True)).reused
    assert not deploy(DeployRequest(engine, repo, speculative="draft-target", draft=draft_engine, num_draft_tokens=2)).reused
    # serve: one tritonserver under mpirun -n 1 in orchestrator mode (a TEST DOUBLE of mpirun records argv and env)
    from yitrt.errors import ServerError
    from yitrt.triton.server import Ports, ServeRequest, start_server

    record = tmp_path / "mpirun.argv"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "mpirun").write_text(f"#!/bin/sh\n# TEST DOUBLE of mpirun\nprintf '%s\\n' \"$@\" \"ORCH=$TRTLLM_ORCHESTRATOR\" > {record}\nexit 3\n")
    (bin_dir / "mpirun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    with pytest.raises(ServerError, match="exited with code 3"):
        start_server(ServeRequest(repo, Ports(18941, 18942, 18943), tritonserver="/bin/true", ready_timeout=30))
    argv = record.read_text().split("\n")
    assert argv[:3] == ["--allow-run-as-root", "-n", "1"] and argv.count("/bin/true") == 1 and ":" not in argv
    assert "--cuda-memory-pool-byte-size=1:0" in argv and "ORCH=1" in argv


def test_deploy_draft_target_refusals_reach_the_cli_in_one_line(engine, draft_engine, tmp_path, cli):
    done = cli("deploy", str(engine), "--out", str(tmp_path / "r"), "--speculative", "draft-target", "--draft", str(draft_engine),
               "--no-kv-reuse")
    assert done.returncode == 3 and "Traceback" not in done.stderr
    assert "not built for draft-target speculation" in done.stderr and "KV cache block reuse must be enabled" in done.stderr
    assert not (tmp_path / "r").exists()
    done = cli("deploy", str(engine), "--out", str(tmp_path / "r"), "--speculative", "medusa")
    assert done.returncode == 2 and "Medusa needs trained Medusa heads" in done.stderr
    done = cli("deploy", str(engine), "--out", str(tmp_path / "r"), "--speculative", "lookahead", "--lookahead", "4,x,4")
    assert done.returncode == 2 and "not three integers" in done.stderr


def test_cli_deploy_lookahead_shows_the_speculation(engine, tmp_path, cli):
    _edit_build_config(engine, speculative_decoding_mode=8, max_draft_len=39)  # LOOKAHEAD_DECODING for (7, 5, 3)
    done = cli("deploy", str(engine), "--out", str(tmp_path / "r"), "--speculative", "lookahead", "--lookahead", "7,5,3")
    assert done.returncode == 0, done.stderr
    assert "speculation: lookahead decoding, window 7, ngram 5, verification set 3 (max_draft_len 39)" in done.stdout
    assert "note: per-request lookahead inputs" in done.stdout
    data = json.loads(cli("deploy", str(engine), "--out", str(tmp_path / "r"), "--speculative", "lookahead", "--lookahead", "7,5,3",
                          "--json").stdout)
    assert data["speculative"]["lookahead"] == {"window": 7, "ngram": 5, "verification_set": 3} and data["reused"]


def test_deploy_draft_target_on_the_reference_slot(model, make_model, tmp_path, cli):
    """The draft slot is the same reference slot over the draft checkpoint (a shallower model, same tokenizer)."""
    draft_model = make_model("draft", tokenizer=True, layers=1)
    ckpt, draft_ckpt = tmp_path / "ckpt", tmp_path / "draft-ckpt"
    convert(ConvertRequest(model, ckpt))
    convert(ConvertRequest(draft_model, draft_ckpt))
    repo = tmp_path / "repo"
    done = cli("deploy", str(ckpt), "--out", str(repo), "--engine", "reference", "--tokenizer", str(model), "--speculative", "draft-target",
               "--draft", str(draft_ckpt), "--num-draft-tokens", "3")
    assert done.returncode == 0, done.stderr
    assert "speculation: draft-target, 3 draft tokens per round" in done.stdout and "note: NVIDIA's stock tensorrt_llm_bls" in done.stdout
    for name in ("tensorrt_llm", "tensorrt_llm_draft"):
        assert (repo / name / "1" / "model.py").read_text() == (repo / "tensorrt_llm" / "1" / "model.py").read_text()
        assert (repo / name / "1" / "yitrt_text.py").is_file()
    target, draft = ({k: v.string_value for k, v in parse_config((repo / n / "config.pbtxt").read_text()).parameters.items()}
                     for n in ("tensorrt_llm", "tensorrt_llm_draft"))
    assert target["yitrt_max_draft_len"] == "3" and target["gpt_model_path"] == str(ckpt) and draft["gpt_model_path"] == str(draft_ckpt)
    assert target["enable_kv_cache_reuse"] == draft["enable_kv_cache_reuse"] == "true"
    assert "TRTLLM_ORCHESTRATOR" not in (repo / "launch.sh").read_text()
