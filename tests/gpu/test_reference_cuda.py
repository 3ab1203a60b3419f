"""The reference runtime on CUDA computes what it computes on CPU (needs a CUDA GPU; TensorRT-LLM not needed)."""

from __future__ import annotations

import pytest

from yitrt.checkpoint.convert import ConvertRequest, convert

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")


@pytest.mark.parametrize(("tp", "scheme", "kv"), [(1, "none", None), (2, "none", None), (1, "fp8-rowwise", "fp8")])
def test_cuda_matches_cpu(make_model, tmp_path, tp, scheme, kv):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from yitrt.reference.runtime import ReferenceRuntime

    convert(ConvertRequest(make_model(seed=3), tmp_path / "ckpt", tp=tp, scheme=scheme, kv_cache=kv))
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, 512, (n,), generator=gen).tolist() for n in (23, 40)]
    results = {}
    for device in ("cpu", "cuda"):
        with ReferenceRuntime(tmp_path / "ckpt", device=device) as runtime:
            results[device] = (runtime.score(seqs, decode_tail=8), runtime.generate(seqs, 8), [r["device"] for r in runtime.ranks])
    (cpu, cpu_gen, _), (cuda, cuda_gen, devices) = results["cpu"], results["cuda"]
    assert all(d.startswith("cuda") for d in devices)
    assert cuda_gen == cpu_gen
    for a, b in zip(cpu, cuda, strict=True):
        assert torch.equal(a.argmax(-1), b.argmax(-1))
        # float32 on both; FP8 formats may flip a rounding where a per-token amax differs in the last bit
        assert (a - b).abs().max() <= (0.05 if scheme != "none" else 1e-4) * a.abs().max()
