"""The CLI as a user meets it: real processes, exit codes, one-line errors, --json on stdout, lazy imports."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO_ROOT, run_cli
from yitrt.quant.schemes import SCHEMES


def test_help_lists_commands_without_importing_heavy_modules():
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "yitrt", "--help"], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60
    )
    assert proc.returncode == 0
    for command in ("inspect", "fetch", "convert", "quantize", "demo-model"):
        assert command in proc.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    assert imported, "importtime printed nothing"
    assert not imported & {"torch", "transformers", "modelopt"}


def test_quantize_help_lists_every_scheme_from_the_registry():
    proc = run_cli("quantize", "--help")
    assert proc.returncode == 0
    for name in SCHEMES:
        if name != "none":
            assert name in proc.stdout


def test_inspect_json_on_a_local_yi_34b_config(tmp_path):
    folder = tmp_path / "yi34b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 7168, "num_hidden_layers": 60, "num_attention_heads": 56,
        "num_key_value_heads": 8, "intermediate_size": 20480, "vocab_size": 64000, "max_position_embeddings": 4096,
        "rope_theta": 5000000.0, "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16",
    }))
    proc = run_cli("inspect", str(folder), "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["params"] == 34_388_917_248
    assert data["kv_bytes_per_token"]["fp16"]["1"] == 245_760
    assert data["kv_bytes_per_token"]["fp8"]["2"] == 61_440
    assert data["valid_tp"] == [1, 2, 4, 8]
    assert any("KV heads" in r for r in data["invalid_tp"]["7"])
    for key in ("num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden_size", "intermediate_size", "vocab_size", "valid_pp"):
        assert key in data
    human = run_cli("inspect", str(folder))
    assert human.returncode == 0 and "245,760" in human.stdout


def test_convert_json_then_noop(make_model, tmp_path):
    src = make_model()
    out = tmp_path / "ckpt"
    first = run_cli("convert", str(src), "--out", str(out), "--tp", "2", "--json")
    assert first.returncode == 0, first.stderr
    data = json.loads(first.stdout)
    assert data["world_size"] == 2 and data["reused"] is False and "rank1.safetensors" in data["files"]
    second = json.loads(run_cli("convert", str(src), "--out", str(out), "--tp", "2", "--json").stdout)
    assert second["reused"] is True


def test_invalid_request_is_one_line_nonzero_and_writes_nothing(make_model, tmp_path):
    src = make_model()
    out = tmp_path / "ckpt"
    proc = run_cli("convert", str(src), "--out", str(out), "--tp", "3")
    assert proc.returncode == 3
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "attention heads" in lines[0] and "fix:" in lines[0]
    assert "Traceback" not in proc.stderr
    assert not out.exists() and not list(tmp_path.glob("ckpt.*"))


def test_json_error_object_and_debug_traceback(make_model, tmp_path):
    src = make_model()  # intermediate 688: not a multiple of the 128-wide AWQ groups
    proc = run_cli("quantize", str(src), "--scheme", "int4-awq", "--out", str(tmp_path / "q"), "--json")
    assert proc.returncode != 0
    err = json.loads(proc.stdout)
    assert err["ok"] is False and "intermediate 688" in err["error"]["message"] and "--awq-block-size 64" in err["error"]["hint"]
    debug = run_cli("quantize", str(src), "--scheme", "int4-awq", "--out", str(tmp_path / "q"), env={"YITRT_DEBUG": "1"})
    assert "Traceback" in debug.stderr and debug.returncode == proc.returncode


def test_quantize_fp8_rowwise_from_cli(make_model, tmp_path):
    src = make_model()
    proc = run_cli("quantize", str(src), "--scheme", "fp8-rowwise", "--kv-cache", "fp8", "--out", str(tmp_path / "q"), "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["quant_algo"] == "FP8_PER_CHANNEL_PER_TOKEN" and data["kv_cache_quant_algo"] == "FP8"


def test_unknown_model_reference_is_a_usage_error(tmp_path):
    proc = run_cli("inspect", str(tmp_path / "does-not-exist"))
    assert proc.returncode != 0
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_schemes_json_matches_registry():
    data = json.loads(run_cli("schemes", "--json").stdout)
    assert [s["name"] for s in data["schemes"]] == list(SCHEMES)
    assert {k["name"] for k in data["kv_cache"]} == {"fp8", "int8"}


def test_bad_option_is_one_line_with_the_help_to_read():
    proc = run_cli("convert", "some/model", "--out", "x", "--tp", "0")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--tp" in lines[0] and "yitrt convert --help" in lines[0]


def test_json_stdout_holds_only_the_json_object():
    """--json: prints of yitrt, of libraries and of child processes (ModelOpt's CUDA-extension build printed on
    stdout on a GPU machine) go to stderr; stdout is exactly the JSON object."""
    import json
    import subprocess
    import sys

    code = ("import os, sys\nfrom yitrt.cli import render\nwith render.json_stdout():\n    print('python noise')\n"
            "    os.system('echo child noise')\n    os.write(1, b'fd noise\\n')\n    render.emit_json({'a': 1})\nprint('after')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    body, after = proc.stdout.rsplit("}\n", 1)[0] + "}", proc.stdout.rsplit("}\n", 1)[1]
    assert json.loads(body) == {"a": 1} and after == "after\n"
    assert all(noise in proc.stderr for noise in ("python noise", "child noise", "fd noise"))


def _blocked_chat():
    """`yitrt chat` to a server that accepts the connection and never answers: (process, listening socket), once
    the command is inside its gRPC call (so the signal comes while a command runs, not during start-up)."""
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(60)
    import signal

    # SIGINT back to its default first: a shell without job control starts background jobs (a CI runner's, say) with
    # SIGINT ignored, and Python then installs no Ctrl-C handler
    proc = subprocess.Popen([sys.executable, "-m", "yitrt", "chat", f"127.0.0.1:{server.getsockname()[1]}", "hi", "--model", "m",
                             "--timeout", "120"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    connection, _ = server.accept()
    return proc, server, connection


def test_sigterm_ends_a_running_command_with_143_and_ctrl_c_with_130():
    import signal

    for sig, code, word in ((signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "aborted")):
        proc, server, connection = _blocked_chat()
        try:
            proc.send_signal(sig)
            _, err = proc.communicate(timeout=30)
            assert proc.returncode == code and err.strip().splitlines()[-1] == word and "Traceback" not in err, err
        finally:
            proc.kill()
            connection.close()
            server.close()
