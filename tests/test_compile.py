"""attnc as a torch op: opcheck of both ops, torch.compile without graph breaks (fullgraph) or recompiles as KV
grows, gradients through a compiled graph, torch.export with a dynamic KV, and exported programs in another
process. Inductor on a CPU is slow: shapes are tiny and only two tests compile with it."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch.utils._python_dispatch import TorchDispatchMode

import attnc
from attnc.runtime import op

try:
    from helpers import ROOT, example, qkv
except ImportError:
    from tests.helpers import ROOT, example, qkv


@pytest.fixture(scope="module")
def alibi():
    return attnc.compile(example("alibi"))


def slopes(H: int = 4) -> torch.Tensor:
    return 2.0 ** (-8.0 * torch.arange(1, H + 1) / H)


def leaves(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


# -- the op --

@pytest.mark.parametrize("return_lse,save", [(False, False), (True, True)])
def test_opcheck_the_forward_op(alibi, return_lse, save):
    q, k, v = leaves(*qkv(2, 4, 2, 5, 7, 8, Dv=6))
    args = (alibi.op_key, q, k, v, leaves(slopes()), 0.3, return_lse, save)
    torch.library.opcheck(torch.ops.attnc.attention.default, args)


def test_opcheck_with_an_integer_param():
    attn = attnc.compile(example("document"))
    q, k, v = leaves(*qkv(1, 2, 2, 6, 6, 8))
    doc = torch.tensor([0, 0, 1, 1, 1, 2], dtype=torch.int32)
    torch.library.opcheck(torch.ops.attnc.attention.default, (attn.op_key, q, k, v, [doc], 0.5, False, True))


def test_opcheck_the_backward_op(alibi):
    q, k, v = qkv(2, 4, 2, 5, 7, 8)
    out, lse, *stats = torch.ops.attnc.attention(alibi.op_key, q, k, v, [slopes()], 0.3, True, True)
    args = (alibi.op_key, q, k, v, out, torch.randn_like(out), torch.randn_like(lse), stats, [slopes()], 0.3, True)
    torch.library.opcheck(torch.ops.attnc.attention_backward.default, args)


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    from attnc.backends.triton_launch import interpreting
    return interpreting() or torch.cuda.is_available()


@pytest.mark.skipif(not triton_available(), reason="needs triton with TRITON_INTERPRET=1 or a GPU")
def test_opcheck_on_triton_in_float64():
    # Triton keeps row statistics in float32 for float64 inputs: the fake implementation says the same
    attn = attnc.compile(example("alibi"), backend="triton")
    q, k, v = leaves(*qkv(1, 2, 1, 5, 7, 8, dtype=torch.float64))
    args = (attn.op_key, q, k, v, leaves(slopes(2).double()), 0.3, True, True)
    torch.library.opcheck(torch.ops.attnc.attention.default, args)


class OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_a_dispatch_mode_sees_one_op_and_plain_eager_skips_the_dispatcher(alibi, monkeypatch):
    q, k, v = qkv(1, 4, 2, 6, 9, 8)
    s = slopes()
    plain = alibi(q, k, v, slopes=s)
    with OpLog() as log:
        seen = alibi(q, k, v, slopes=s)
    assert log.ops == ["attnc.attention.default"] and torch.equal(seen, plain)
    looked_up = []                     # only the op's implementation looks its Compiled up by key
    real = op.lookup
    monkeypatch.setattr(op, "lookup", lambda key: looked_up.append(key) or real(key))
    assert torch.equal(alibi(q, k, v, slopes=s), plain) and not looked_up
    alibi(*leaves(q), k, v, slopes=s)
    assert looked_up


def test_the_op_without_saved_statistics_still_differentiates(alibi):
    # save=False says no backward is expected; one that comes anyway computes the statistics again
    q, k, v = qkv(1, 4, 2, 6, 9, 8)
    a, b = leaves(q, k, v, slopes()), leaves(q, k, v, slopes())
    torch.ops.attnc.attention(alibi.op_key, *a[:3], a[3:], 0.3, False, False)[0].sum().backward()
    alibi(*b[:3], slopes=b[3], scale=0.3).sum().backward()
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad)


def test_one_key_per_variant_and_backend():
    a, b = attnc.compile(example("causal")), attnc.compile(example("causal"))
    assert a.op_key == b.op_key and a.op_key.startswith("causal-") and op.lookup(a.op_key) is b
    assert attnc.compile(example("causal"), backend="torch").op_key != a.op_key
    assert attnc.compile(example("sliding_window"), window=8).op_key != attnc.compile(example("sliding_window")).op_key


def test_the_registry_keeps_no_captured_tensor():
    table = torch.rand(4)
    attn = attnc.compile(score_mod=lambda score, b, h, q_idx, kv_idx: score + table[h])
    served = op.lookup(attn.op_key)
    assert attn.variant.captured and not served.variant.captured and served._kernels is attn._kernels
    q, k, v = qkv(1, 4, 4, 5, 5, 8)
    torch.testing.assert_close(attn(q, k, v), attn.reference(q, k, v))


def test_an_unknown_key_says_what_to_do():
    q, k, v = qkv(1, 2, 2, 4, 4, 8)
    with pytest.raises(attnc.CallError, match="attnc.compile"):
        torch.ops.attnc.attention("nothing-0000-auto", q, k, v, [], 1.0, False, False)


# -- torch.compile --

class Block(torch.nn.Module):
    """A projection, ALiBi attention with learned slopes, and a projection back."""

    def __init__(self, attn, D: int = 8):
        super().__init__()
        self.attn, self.proj = attn, torch.nn.Linear(D, D)
        self.slopes = torch.nn.Parameter(slopes())

    def forward(self, q, k, v):
        out, lse = self.attn(self.proj(q), k, v, slopes=self.slopes, return_lse=True)
        return self.proj(out).sum(-1) + lse


def test_fullgraph_compile_gives_eager_results_and_gradients(alibi):
    block = Block(alibi)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(block, fullgraph=True, backend=counter)
    q, k, v = qkv(2, 4, 2, 5, 9, 8, seed=3)
    a, b = leaves(q, k, v), leaves(q, k, v)
    got, want = compiled(*a), block(*b)
    torch.testing.assert_close(got, want)
    block.zero_grad()
    got.sum().backward()
    compiled_grads = [p.grad.clone() for p in block.parameters()] + [t.grad for t in a]
    block.zero_grad()
    want.sum().backward()
    for x, y in zip(compiled_grads, [p.grad for p in block.parameters()] + [t.grad for t in b]):
        torch.testing.assert_close(x, y)
    assert counter.frame_count == 1


def test_decoding_compiles_once_as_kv_grows():
    # inductor, dynamic shapes: one query against a cache that grows by one key per step
    attn = attnc.compile(example("sliding_window"), window=4)

    def step(q, k, v):
        return attn(q * 2, k, v).sum(-1)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend=counter)
    for KV in range(5, 9):
        q, k, v = qkv(1, 4, 2, 1, KV, 8, seed=KV)
        torch.testing.assert_close(compiled(q, k, v), step(q, k, v))
    assert counter.frame_count == 1


def test_inductor_trains_through_the_op(alibi):
    block = Block(alibi)
    compiled = torch.compile(block, fullgraph=True, dynamic=True, backend="inductor")
    for KV in (6, 7):
        q, k, v = qkv(1, 4, 2, 3, KV, 8, seed=KV)
        a, b = leaves(q, k, v), leaves(q, k, v)
        compiled(*a).sum().backward()
        block(*b).sum().backward()
        for x, y in zip(a, b):
            torch.testing.assert_close(x.grad, y.grad)


# -- torch.export --

class Attend(torch.nn.Module):
    def __init__(self, attn):
        super().__init__()
        self.attn = attn
        self.register_buffer("slopes", slopes())

    def forward(self, q, k, v):
        return self.attn(q, k, v, slopes=self.slopes) * 2


def export_alibi(alibi):
    q, k, v = qkv(1, 4, 2, 3, 6, 8)
    KV = torch.export.Dim("KV", min=2, max=4096)
    return torch.export.export(Attend(alibi), (q, k, v), dynamic_shapes=({}, {2: KV}, {2: KV}))


def test_export_with_a_dynamic_kv(alibi, tmp_path):
    ep = export_alibi(alibi)
    assert "torch.ops.attnc.attention.default" in ep.graph_module.code
    path = tmp_path / "alibi.pt2"
    torch.export.save(ep, path)
    loaded = torch.export.load(path)
    for KV in (6, 11):
        q, k, v = qkv(1, 4, 2, 3, KV, 8, seed=KV)
        want = Attend(alibi)(q, k, v)
        torch.testing.assert_close(ep.module()(q, k, v), want)
        torch.testing.assert_close(loaded.module()(q, k, v), want)


def test_an_exported_program_runs_in_a_process_that_compiles_the_variant(alibi, tmp_path):
    path = tmp_path / "alibi.pt2"
    torch.export.save(export_alibi(alibi), path)
    q, k, v = qkv(1, 4, 2, 3, 9, 8, seed=4)
    torch.save((q, k, v, Attend(alibi)(q, k, v)), tmp_path / "io.pt")
    code = (f"import attnc, torch, sys\n"
            f"ep = torch.export.load({str(path)!r})\n"
            f"q, k, v, want = torch.load({str(tmp_path / 'io.pt')!r})\n"
            f"try:\n"
            f"    ep.module()(q, k, v)\n"
            f"except attnc.CallError as e:\n"
            f"    print('refused:', e)\n"
            f"attnc.compile({example('alibi')!r})\n"
            f"print('error', float((ep.module()(q, k, v) - want).abs().max()))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    refused, error = run.stdout.strip().splitlines()
    assert refused.startswith("refused:") and alibi.op_key in refused and "attnc.compile" in refused
    assert float(error.split()[1]) < 1e-6
