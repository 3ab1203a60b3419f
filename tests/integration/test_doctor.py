"""`yitrt doctor`: what it reports with and without GPU tools, against TEST DOUBLES of nvidia-smi/trtllm-build."""

from __future__ import annotations

import json

from tests.conftest import run_cli
from yitrt.build.doctor import run_doctor
from yitrt.build.runner import BuildRequest, build_engine
from yitrt.checkpoint.convert import ConvertRequest, convert


def _stage(report, name):
    return next(s for s in report.stages if s.stage == name)


def test_doctor_on_a_gpu_machine_with_trtllm(tool_doubles, tmp_path, monkeypatch):
    tool_doubles()
    monkeypatch.setenv("YITRT_DOUBLE_GPUS", "0, NVIDIA H100 80GB HBM3, 9.0, 81559, 81079, 580.159.04;"
                                            "1, NVIDIA H100 80GB HBM3, 9.0, 81559, 1024, 580.159.04")
    report = run_doctor(tmp_path)
    data = report.to_json()
    assert [g["known_as"] for g in data["gpus"]] == ["H100-SXM", "H100-SXM"] and data["gpus"][1]["memory_free_mib"] == 1024
    assert data["cuda_driver"] == "13.0" and data["tensorrt_llm"]["trtllm_build"].endswith("trtllm-build")
    assert _stage(report, "build").ready and _stage(report, "plan").ready
    assert data["disk"]["free_bytes"] > 0 and data["memory"]["total_bytes"] > 0


def test_doctor_without_gpu_tools_says_what_build_needs(tool_doubles, tmp_path):
    tool_doubles(trtllm=False, gpu=False, only=True)
    report = run_doctor(tmp_path)
    build = _stage(report, "build")
    assert report.gpus == [] and not build.ready and "TensorRT-LLM 1.2.x" in build.detail and "GPU" in build.detail
    assert _stage(report, "convert").ready and _stage(report, "verify").ready  # CPU stages run here


def test_doctor_checks_an_engine_against_this_machine(tool_doubles, make_model, tmp_path, monkeypatch):
    tool_doubles()
    ckpt = tmp_path / "ckpt"
    convert(ConvertRequest(make_model(), ckpt))
    engine = tmp_path / "engine"
    build_engine(BuildRequest(ckpt, engine))
    same = run_doctor(tmp_path, engine).engine
    sm = next(c for c in same["checks"] if c["what"] == "gpu_sm")
    assert sm == {"what": "gpu_sm", "engine": 90, "here": [90], "match": True}
    monkeypatch.setenv("YITRT_DOUBLE_GPUS", "0, NVIDIA L40S, 8.9, 46068, 46000, 580.159.04")
    other = run_doctor(tmp_path, engine).engine
    assert not other["match"] and next(c for c in other["checks"] if c["what"] == "gpu_sm")["here"] == [89]
    proc = run_cli("doctor", "--json", "--engine", str(engine))
    assert proc.returncode == 0 and json.loads(proc.stdout)["engine"]["path"] == str(engine)
