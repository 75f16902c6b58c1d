"""GPU-resident embeddings: CUDA pools, the cuda_ipc transport, Mooncake and
NIXL with GPU buffers. Run on a machine with an NVIDIA GPU; elsewhere every test here
skips with the reason shown."""

import multiprocessing as mp

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed")
if not torch.cuda.is_available():
    pytest.skip(
        "no CUDA GPU visible: the GPU tests run on the device check", allow_module_level=True
    )

from embedlink import BufferPool, BufferSchema, LanguageEndpoint, Status  # noqa: E402
from embedlink.tools.workers import encoder_worker, make_embedding, same_embedding  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(180)]
SCHEMA = BufferSchema(hidden_size=512)
DEV = "cuda:0"


def test_cuda_pool_views_scatter_gather_aux():
    pool = BufferPool(SCHEMA, 8, 4, device=DEV)
    assert not pool.on_host and pool.array("embedding").is_cuda
    data = torch.randn(10, 512, device=DEV).to(torch.bfloat16)
    pool.scatter([5, 6, 1], {"embedding": data})
    out = pool.empty("embedding", 10)
    pool.gather([(20, 8), (4, 2)], "embedding", out, 0)
    pool.synchronize()
    assert torch.equal(out, data)
    pool.write_aux(3, total_tokens=9, mrope_position_delta=1, checksum=0, flags=0)
    assert int(pool.read_aux(3)["total_tokens"]) == 9
    with pytest.raises(TypeError, match="no host view"):
        pool.field_bytes("embedding")


@pytest.fixture
def cuda_encoder(boot):
    ctx = mp.get_context("spawn")
    made = []

    def make(transport):
        cmds, replies = ctx.Queue(), ctx.Queue()
        cfg = dict(
            bootstrap=boot.address,
            hidden_size=512,
            num_blocks=128,
            transports=(transport,),
            device=DEV,
            room_timeout=30.0,
        )
        p = ctx.Process(target=encoder_worker, args=(cfg, cmds, replies), daemon=True)
        p.start()
        assert replies.get(timeout=90)[0] == "ready"
        made.append((p, cmds))

        def call(*cmd):
            cmds.put(cmd)
            r = replies.get(timeout=60)
            assert r[0] != "error", r
            return r

        return call

    yield make
    for p, cmds in made:
        cmds.put(("stop",))
        p.join(15)
        if p.is_alive():
            p.kill()


@pytest.mark.parametrize("transport", ["cuda_ipc", "mooncake", "nixl"])
def test_gpu_pools_across_processes(boot, cuda_encoder, transport):
    if transport == "mooncake":
        pytest.importorskip("mooncake.engine", reason="Mooncake's CUDA build is not installed")
    if transport == "nixl":
        # VRAM registration (docs/nixl.md): written, not yet run on a GPU
        pytest.importorskip(
            "nixl_cu12", reason="NIXL is not installed (pip install --no-deps nixl-cu12==1.5.1)"
        )
    call = cuda_encoder(transport)
    with LanguageEndpoint(
        SCHEMA, num_blocks=32, transports=(transport,), device=DEV, zero_copy=True
    ) as lang:
        for room, n in ((1, 500), (2, 2000), (3, 5000)):
            rx = lang.receiver(bootstrap=boot.address, room=room)
            call("send", room, n)
            got = rx.wait(timeout=60)
            assert got.embedding.is_cuda
            assert same_embedding(got, make_embedding(SCHEMA, n, 0, room))
            assert rx.history[-1] == (Status.Success, n)
            if n > 1024:
                assert any(s is Status.Transferring for s, _ in rx.history)
            rx.clear()
        assert lang.allocator.wait_all_free(10)
        assert list(call("stats")[3].values()) == [transport]
