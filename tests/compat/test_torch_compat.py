"""The torch shim: grouped_mm against per-group matmuls, and its support probe."""

import pytest
import torch

from compat.torch_compat import grouped_mm, grouped_mm_dims_ok, grouped_mm_fn, has_grouped_mm

needs_gmm = pytest.mark.skipif(grouped_mm_fn() is None or not has_grouped_mm("cpu"),
                               reason="this torch has no CPU grouped_mm")


def _reference(x, w, counts):
    out, s = [], 0
    for e, n in enumerate(counts):
        out.append(x[s:s + n] @ w[e])
        s += n
    return torch.cat(out)


@needs_gmm
@pytest.mark.parametrize("counts", [[3, 0, 4, 3], [0, 10, 0, 0], [1, 1, 1, 1], [0, 0, 0, 2]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_matches_per_group_matmul(counts, dtype):
    g = torch.Generator().manual_seed(len(counts) + sum(counts))
    x = torch.randn(sum(counts), 16, generator=g).to(dtype).requires_grad_()
    w = torch.randn(4, 16, 24, generator=g).to(dtype).requires_grad_()
    offs = torch.cumsum(torch.tensor(counts), 0)  # int64: the shim converts to int32
    y = grouped_mm(x, w, offs)
    gy = torch.randn(y.shape, generator=g).to(dtype)
    (y * gy).sum().backward()
    dx, dw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    y_ref = _reference(x, w, counts)
    (y_ref * gy).sum().backward()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(dx, x.grad, **tol)
    torch.testing.assert_close(dw, w.grad, **tol)


@needs_gmm
def test_sum_backward_zero_stride_grad():
    x = torch.randn(6, 16, requires_grad=True)
    w = torch.randn(2, 16, 8, requires_grad=True)
    offs = torch.tensor([2, 6], dtype=torch.int32)
    grouped_mm(x, w, offs).sum().backward()  # raw kernel: "Invalid strides/sizes ... [0, 0]"
    torch.testing.assert_close(x.grad, w.sum(-1)[torch.tensor([0, 0, 1, 1, 1, 1])])
    # Also through a transposed weight view (experts' w2 layout is fine either way).
    w2 = torch.randn(2, 8, 16, requires_grad=True)
    grouped_mm(x, w2.transpose(1, 2), offs).sum().backward()
    assert w2.grad.shape == (2, 8, 16)


def test_has_grouped_mm_rules():
    if grouped_mm_fn() is not None:
        assert has_grouped_mm("cpu") and has_grouped_mm("cpu", torch.bfloat16, (16, 8))
    assert not has_grouped_mm("cpu", torch.float64)
    assert not has_grouped_mm("cpu", torch.float32, (16, 6))  # 24-byte rows
    assert not has_grouped_mm("meta")
    if not torch.cuda.is_available():
        assert not has_grouped_mm("cuda")


def test_dims_alignment_rule():
    assert grouped_mm_dims_ok((4, 8), torch.float32)
    assert not grouped_mm_dims_ok((4, 6), torch.float32)
    assert grouped_mm_dims_ok((8, 16), torch.bfloat16)
    assert not grouped_mm_dims_ok((12,), torch.bfloat16)


def test_private_symbol_wrappers_on_this_build():
    """Every private torch entry point the rest of the code reaches through the shim resolves here."""
    import torch

    from compat.torch_compat import dtensor_local, foreach_mul_, fsspec_reader_writer

    reader, writer = fsspec_reader_writer()
    assert reader.__name__ == "FsspecReader" and writer.__name__ == "FsspecWriter"
    ts = [torch.ones(3), torch.full((2,), 2.0)]
    foreach_mul_(ts, torch.tensor(0.5))
    assert ts[0].tolist() == [0.5] * 3 and ts[1].tolist() == [1.0, 1.0]
    assert dtensor_local(torch.zeros(2)) is None


def test_flight_recorder_and_all_to_all_on_one_gloo_rank(tmp_path):
    import torch
    import torch.distributed as dist

    from compat.torch_compat import all_to_all_single_autograd, dump_flight_recorder_trace

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        x = torch.arange(4.0, requires_grad=True)
        y = all_to_all_single_autograd(x, [4], [4], dist.group.WORLD)
        (y * torch.arange(4.0)).sum().backward()
        assert y.tolist() == [0.0, 1.0, 2.0, 3.0] and x.grad.tolist() == [0.0, 1.0, 2.0, 3.0]
        trace = dump_flight_recorder_trace()
        assert trace is None or isinstance(trace, bytes)
    finally:
        dist.destroy_process_group()
