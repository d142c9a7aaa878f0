"""wire.HostStaging: device tensors reach the host through the pinned buffer byte-for-byte as ``.cpu()`` gives them
(dtypes, strided sources, empty tensors), the buffer grows when asked and refuses what is not for it."""

from __future__ import annotations

import pytest
import torch

from djinn_core.rpc.wire import HostStaging, decode, encode_header, encode_tensors

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cpu
def test_only_cuda_tensors_within_the_limit_are_staged():
    st = HostStaging(1 << 20)
    assert not st.fits([])
    assert not st.fits([torch.zeros(4)])  # CPU tensors go the ordinary way
    if torch.cuda.is_available():
        assert st.fits([torch.zeros(4, device="cuda")])
        assert not st.fits([torch.zeros(1 << 20, device="cuda")])  # 4 MiB > 1 MiB
        assert not st.fits([torch.zeros(4, dtype=torch.complex64, device="cuda")])  # not a wire dtype


def _message(encoded) -> list:
    descs, bufs = encoded
    return [encode_header({"id": 1}, descs), *[bytes(b) for b in bufs]]


@pytest.mark.gpu
@needs_cuda
def test_staged_frames_equal_what_cpu_copies_give():
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(1, 37, 1000, device="cuda", generator=g).half()
    tensors = [logits[:, -1], logits[:, 3:9:2].transpose(1, 2), torch.arange(7, device="cuda"),
               torch.empty(0, 5, device="cuda"), torch.randn(3, 3, device="cuda").to(torch.bfloat16)]
    st = HostStaging(1 << 22)
    assert st.fits(tensors)
    staged = decode(_message(st.encode(tensors)), max_bytes=1 << 30)
    plain = decode(_message(encode_tensors(tensors)), max_bytes=1 << 30)
    for a, b, t in zip(staged.tensors, plain.tensors, tensors):
        assert a.dtype == t.dtype and a.shape == t.shape and torch.equal(a, b) and torch.equal(a, t.cpu())


@pytest.mark.gpu
@needs_cuda
def test_a_staging_that_blocks_in_the_driver_gives_the_same_frames():
    g = torch.Generator(device="cuda").manual_seed(2)
    t = torch.randn(1, 32000, device="cuda", generator=g).half()
    st = HostStaging(1 << 20, block=True)
    descs, bufs = st.encode([t])
    assert bytes(bufs[0]) == t.cpu().numpy().tobytes()


@pytest.mark.gpu
@needs_cuda
def test_the_buffer_grows_and_frames_hold_the_latest_call():
    st = HostStaging(64 << 20)
    a = torch.full((10,), 3.0, device="cuda")
    descs, bufs = st.encode([a])
    assert bytes(bufs[0]) == a.cpu().numpy().tobytes()
    big = torch.full((4 << 20,), 5.0, device="cuda")  # 16 MiB: more than the first buffer
    descs, bufs = st.encode([big])
    assert descs[0]["nbytes"] == 16 << 20 and bytes(bufs[0][:8]) == big[:2].cpu().numpy().tobytes()
    assert st._buf.numel() >= 16 << 20 and st._buf.is_pinned()


@pytest.mark.cpu
def test_host_memory_is_not_registered_without_cuda_or_when_read_only():
    from djinn_core.rpc.wire import register_host

    assert register_host(memoryview(b"read only")) is None
    if not torch.cuda.is_available():
        assert register_host(memoryview(bytearray(4096))) is None


@pytest.mark.gpu
@needs_cuda
def test_copies_into_registered_host_memory_land_at_unaligned_places_as_cpu_copies_give():
    """The server's in-place replies: the device copies straight into a channel's mapping, page-locked in place, at
    places that follow a header of any length (so not aligned to the element size)."""
    import mmap

    from djinn_core.rpc.wire import register_host

    g = torch.Generator(device="cuda").manual_seed(1)
    logits = torch.randn(1, 37, 1000, device="cuda", generator=g).half()
    tensors = [logits[:, -1], logits[:, 3:9:2].transpose(1, 2), torch.arange(7, device="cuda")]
    m = mmap.mmap(-1, 1 << 20)
    view = memoryview(m)
    got = register_host(view)
    assert got is not None, "cudaHostRegister refused an anonymous mapping"
    region, unregister = got
    offs, off = [], 61  # odd: as after a header of 61 bytes
    for t in tensors:
        offs.append(off)
        off += t.numel() * t.element_size() + 3
    st = HostStaging(1 << 20)
    descs, bufs = st.start(tensors, (region, offs))
    st.wait()
    assert st._buf is None  # nothing went through the staging buffer
    for d, b, t, o in zip(descs, bufs, tensors, offs):
        host = t.cpu().contiguous()
        assert d["nbytes"] == host.numel() * host.element_size()
        assert bytes(b) == host.numpy().tobytes() == bytes(m[o:o + d["nbytes"]])
    del region, bufs
    unregister()
    view.release()
    m.close()
