"""Same-host KV pushes through shared memory: the same output, the same verification.

Workers on one host (every test cluster here) push K/V by naming a buffer of the
sender's shared memory once the receiver has said it shares the host. These tests show
that output does not change, that a shared push is checked as strictly as an inline one
(and a refused one leaves nothing reserved or used), that a sender offers shared memory
only to receivers whose answers accept it, and that one whose receiver cannot read its
memory after all goes back to inline pushes by itself.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import time

import grpc
import numpy as np
import pytest
from conftest import (
    decode_worker_stub,
    greedy_outputs,
    kv_push_stub,
    leader_stats,
    local_cluster,
    wait_until_cluster_idle,
)

from cluster.cluster_config import RoleConfig
from kv_transfer import codec, shared_memory
from kv_transfer.buffers import Buffer, BufferPool
from kv_transfer.codec import encode_push
from kv_transfer.grpc_transport import KVSender
from kv_transfer.shared_memory import SharedBuffer
from kv_transfer.transport import PushGrant
from olmo_model.cache_limits import CacheLimits
from olmo_model.demo import DEMO_MODEL_DIR
from olmo_model.kv_pages import KVSnapshot
from pipeline.options import WorkerOptions
from protos import worker_pb2
from protos.vocabulary import FinishReason
from router.options import RouterOptions

LIMITS = CacheLimits(max_sequences=8, max_total_tokens=4096, prefill_chunk_tokens=512)
PROMPTS = [list(range(3, 60)), list(range(100, 400, 3)), [7] * 90]


@pytest.fixture(scope="module")
def inline_outputs():
    cluster = local_cluster(DEMO_MODEL_DIR, cache=LIMITS,
                            router=RouterOptions(local_prefill_below_tokens=0),
                            worker=WorkerOptions(prefix_cache=False, kv_shared_memory=False))
    try:
        outputs = greedy_outputs(cluster, PROMPTS, 12)
        for stats in leader_stats(cluster.prefill + cluster.decode):
            assert stats.shared_memory_pushes == 0 and list(stats.transports) == ["grpc"]
        return outputs
    finally:
        cluster.stop()


@pytest.mark.parametrize("prefill_stages, decode_stages", [(1, 1), (2, 3)])
def test_shared_memory_pushes_give_the_inline_output(inline_outputs, prefill_stages,
                                                     decode_stages):
    cluster = local_cluster(DEMO_MODEL_DIR, cache=LIMITS,
                            router=RouterOptions(local_prefill_below_tokens=0),
                            worker=WorkerOptions(prefix_cache=False),
                            prefill=RoleConfig(stages=prefill_stages),
                            decode=RoleConfig(stages=decode_stages))
    try:
        assert greedy_outputs(cluster, PROMPTS, 12) == inline_outputs
        # A sender learns its receiver's host from the first answer: the first push to
        # each decode stage goes inline, the later ones name shared memory.
        sent = leader_stats(cluster.prefill)
        received = leader_stats(cluster.decode)
        pushes = sum(s.pushes for s in sent)
        assert sum(s.shared_memory_pushes for s in sent) >= pushes - decode_stages * prefill_stages
        assert sum(s.shared_memory_pushes for s in sent) >= 1
        assert (sum(s.shared_memory_pushes for s in sent)
                == sum(s.shared_memory_pushes for s in received))
        assert (sum(s.shared_memory_bytes for s in sent)
                == sum(s.shared_memory_bytes for s in received) > 0)
        wait_until_cluster_idle(cluster)
    finally:
        cluster.stop()


# --- a shared push is checked like an inline one ------------------------------------------

@pytest.fixture(scope="module")
def cluster():
    c = local_cluster(DEMO_MODEL_DIR, cache=LIMITS,
                      router=RouterOptions(local_prefill_below_tokens=0))
    yield c
    c.stop()


@pytest.fixture(scope="module")
def stub(cluster):
    return decode_worker_stub(cluster)


def shared_snapshot(layout, tokens: int = 5) -> tuple[KVSnapshot, SharedBuffer]:
    layers = layout.layer_end - layout.layer_begin
    shape = (layers, tokens, layout.num_kv_heads, layout.head_dim)
    buffer = SharedBuffer(Buffer.bytes_for(shape, "float32"))
    keys, values = buffer.arrays(shape, "float32")
    keys[...], values[...] = 0.5, -0.5
    return KVSnapshot(0, layers, keys, values), buffer


def push_shared(stub, cluster, request_id: str, tamper=lambda chunks, buffer: chunks):
    """Reserve, then push a shared-memory stream of hand-made K/V, tampered with first."""
    layout = cluster.decode[0].layout
    snapshot, buffer = shared_snapshot(layout)
    reserved = stub.Reserve(worker_pb2.ReserveRequest(
        request_id=request_id, prompt_tokens=5, lease_ms=60_000,
        sampling=worker_pb2.Sampling(max_tokens=4, ignore_eos=True)), timeout=5)
    chunks = list(encode_push(PushGrant(request_id, token=reserved.push_token), layout,
                              snapshot, np.zeros(layout.hidden_size, np.float32), shared=buffer))
    try:
        return kv_push_stub(cluster).PushKV(iter(tamper(chunks, buffer)), timeout=10)
    finally:
        buffer.close()


def corrupt_after_checksum(chunks, buffer):
    buffer.array[100] ^= 1  # the sender reused its buffer too early, say
    return chunks


_OPEN_FILES = []  # kept open until the receiver has looked


def point_at_a_plain_file(chunks, buffer):
    plain = tempfile.TemporaryFile()
    plain.write(bytes(buffer.nbytes))
    plain.flush()
    _OPEN_FILES.append(plain)
    chunks[1].shared.fd = plain.fileno()
    return chunks


def attacker_memfd(nbytes: int, sealed: bool) -> int:
    """A memfd of the buffers' name that a same-user process made to look like one."""
    fd = os.memfd_create(shared_memory.NAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, nbytes)
    if sealed:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, shared_memory.SEALS)
    _OPEN_FDS.append(fd)
    return fd


_OPEN_FDS = []


@pytest.fixture(scope="module", autouse=True)
def close_attacker_files():
    yield
    for fd in _OPEN_FDS:
        os.close(fd)
    for plain in _OPEN_FILES:
        plain.close()


def point_at_an_unsealed_memfd(chunks, buffer):
    # Unsealed, it could shrink while read: a mapping of it would fault (SIGBUS).
    chunks[1].shared.fd = attacker_memfd(buffer.nbytes, sealed=False)
    return chunks


SPARSE_BYTES = 2**30


def point_into_a_sparse_memfd(chunks, buffer):
    """A 1 GiB memfd with nothing in it, the K/V named near its end."""
    fd = attacker_memfd(SPARSE_BYTES, sealed=True)
    shared = chunks[1].shared
    shared.keys_offset, shared.values_offset = (SPARSE_BYTES - buffer.nbytes + shared.keys_offset,
                                                SPARSE_BYTES - buffer.nbytes + shared.values_offset)
    shared.fd = fd
    return chunks


def point_past_the_end(chunks, buffer):
    chunks[1].shared.values_offset = buffer.nbytes - 8
    return chunks


def follow_a_block(chunks, buffer):
    layout = chunks[0].header.layout
    block = worker_pb2.KVBlock(layer=layout.layer_begin, token_begin=0, num_tokens=1,
                               keys=bytes(4 * layout.num_kv_heads * layout.head_dim),
                               values=bytes(4 * layout.num_kv_heads * layout.head_dim))
    return [chunks[0], worker_pb2.KVChunk(block=block), *chunks[1:]]


def name_a_gone_process(chunks, buffer):
    chunks[1].shared.pid = 2**22 + 12345  # above any pid_max: no such process
    return chunks


@pytest.mark.parametrize("tamper, code, message", [
    (corrupt_after_checksum, grpc.StatusCode.INVALID_ARGUMENT, "checksum mismatch"),
    (point_at_a_plain_file, grpc.StatusCode.INVALID_ARGUMENT, "is not a KV buffer"),
    (point_at_an_unsealed_memfd, grpc.StatusCode.INVALID_ARGUMENT, "not sealed"),
    (point_into_a_sparse_memfd, grpc.StatusCode.INVALID_ARGUMENT, "checksum mismatch"),
    (point_past_the_end, grpc.StatusCode.INVALID_ARGUMENT, "outside"),
    (follow_a_block, grpc.StatusCode.INVALID_ARGUMENT, "after other K/V"),
    (name_a_gone_process, grpc.StatusCode.UNIMPLEMENTED, "unreadable"),
])
def test_a_bad_shared_push_is_refused_and_frees_everything(cluster, stub, tamper, code,
                                                           message):
    request_id = f"shared-{tamper.__name__}"
    refused = cluster.decode[0].stage.receiver.pushes_refused
    with pytest.raises(grpc.RpcError) as err:
        push_shared(stub, cluster, request_id, tamper)
    assert err.value.code() == code and message in err.value.details()
    assert cluster.decode[0].stage.receiver.pushes_refused == refused + 1
    stub.Abort(worker_pb2.AbortRequest(request_id=request_id), timeout=5)
    wait_until_cluster_idle(cluster)
    if tamper is point_into_a_sparse_memfd:  # read as zeros, not backed with memory
        assert os.fstat(_OPEN_FDS[-1]).st_blocks * 512 < 2**20


def test_a_descriptor_swapped_for_a_fifo_after_its_name_was_checked_is_refused_at_once(
        cluster, stub, monkeypatch, tmp_path):
    """Between the receiver's look at /proc/<pid>/fd/<fd> and its open, the sender puts a
    FIFO there: an open that blocked would wait for a writer for ever."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    real_open = shared_memory._open

    def swap_then_open(path):
        fd = int(path.rsplit("/", 1)[1])
        swapped = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        os.dup2(swapped, fd)
        os.close(swapped)
        return real_open(path)

    monkeypatch.setattr(shared_memory, "_open", swap_then_open)
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        push_shared(stub, cluster, "shared-fifo")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "is not a KV buffer" in err.value.details() and time.monotonic() - start < 5
    monkeypatch.undo()
    stub.Abort(worker_pb2.AbortRequest(request_id="shared-fifo"), timeout=5)
    wait_until_cluster_idle(cluster)
    test_a_good_shared_push_decodes(cluster, stub)  # still serving


def test_a_buffer_cannot_change_size_once_made():
    buffer = SharedBuffer(2**20)
    try:
        for size in (0, 2**21):
            with pytest.raises(PermissionError):
                os.ftruncate(buffer.fd, size)
        with pytest.raises(PermissionError):  # nor can its seals be lifted or added to
            fcntl.fcntl(buffer.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
    finally:
        buffer.close()


def test_a_good_shared_push_decodes(cluster, stub):
    assert push_shared(stub, cluster, "shared-good").bytes > 0
    events = list(stub.StreamTokens(worker_pb2.StreamTokensRequest(request_id="shared-good"),
                                    timeout=30))
    assert events[-1].finish_reason == FinishReason.LENGTH and sum(e.has_token for e in events) == 4
    wait_until_cluster_idle(cluster)


def push_three(cluster, stub, sender: KVSender, name: str) -> None:
    """Three pushes of hand-made K/V from ``sender``, each decoded."""
    servicer = cluster.decode[0]
    address = cluster.router.scheduler.workers("decode")[0].address
    for n in range(3):
        request_id = f"{name}-{n}"
        reserved = stub.Reserve(worker_pb2.ReserveRequest(
            request_id=request_id, prompt_tokens=5, lease_ms=60_000,
            sampling=worker_pb2.Sampling(max_tokens=1)), timeout=5)
        snapshot, buffer = shared_snapshot(servicer.layout)
        try:
            sender.push(address, PushGrant(request_id, token=reserved.push_token), snapshot,
                        np.zeros(servicer.layout.hidden_size, np.float32), buffer)
        finally:
            buffer.close()
        list(stub.StreamTokens(worker_pb2.StreamTokensRequest(request_id=request_id),
                               timeout=30))


def test_a_receiver_that_takes_no_shared_memory_is_never_offered_any(cluster, stub):
    servicer = cluster.decode[0]
    address = cluster.router.scheduler.workers("decode")[0].address
    sender = KVSender(servicer.layout)
    receiver = servicer.stage.receiver
    refused = receiver.pushes_refused
    receiver.accepts_shared = False  # its answers now name no host
    try:
        push_three(cluster, stub, sender, "inline-only")
        assert sender.pushes == 3 and sender.shared_pushes == 0
        assert receiver.pushes_refused == refused  # negotiated: nothing was tried and refused
        assert not sender.shares_memory_with(address)
    finally:
        receiver.accepts_shared = True
        sender.close()
    wait_until_cluster_idle(cluster)


def test_a_sender_goes_inline_when_its_receiver_cannot_read_what_it_advertised(
        cluster, stub, monkeypatch):
    servicer = cluster.decode[0]
    address = cluster.router.scheduler.workers("decode")[0].address
    sender = KVSender(servicer.layout)
    refused = servicer.stage.receiver.pushes_refused

    def closed_to_us(pid, fd, parts):  # as ptrace rules can close /proc/<pid>/fd
        raise PermissionError(f"/proc/{pid}/fd/{fd}: permission denied")

    # It still says it shares our host: as when its /proc is closed to it.
    monkeypatch.setattr(codec, "read_shared", closed_to_us)
    try:
        push_three(cluster, stub, sender, "fallback")
        # The first push went inline (the receiver not heard from yet); the second tried
        # shared memory, was refused UNIMPLEMENTED and went again inline; the third went
        # inline at once.
        assert sender.pushes == 3 and sender.shared_pushes == 0
        assert servicer.stage.receiver.pushes_refused == refused + 1
        assert not sender.shares_memory_with(address)
    finally:
        sender.close()
    wait_until_cluster_idle(cluster)


def test_idle_buffers_are_few_bounded_and_closed():
    pool = BufferPool(SharedBuffer, keep=2, keep_bytes=5 * 2**20)
    fds = kv_buffer_fds()
    lent = [pool.take(n) for n in (1, 3 * 2**20, 4 * 2**20, 9 * 2**20)]
    assert [b.nbytes for b in lent] == [2**20, 3 * 2**20, 4 * 2**20, 9 * 2**20]
    for buffer in lent:
        pool.give(buffer)
    assert pool.idle_bytes() == 4 * 2**20  # the largest that fit the bound
    again = pool.take(2**20)
    assert again.nbytes == 4 * 2**20  # the smallest idle one that fits
    pool.give(again)
    pool.close()
    assert kv_buffer_fds() == fds


def kv_buffer_fds() -> set[str]:
    """This process's open memfds named as KV buffers."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:olmo-kv"):
                found.add(fd)
        except OSError:  # closed meanwhile
            pass
    return found


def test_buffers_are_memfds_that_die_with_their_process():
    buffer = SharedBuffer(2**20)
    try:
        link = os.readlink(f"/proc/self/fd/{buffer.fd}")
        assert link.startswith("/memfd:olmo-kv")
        assert not os.path.exists("/dev/shm/olmo-kv")  # nothing named on a file system
    finally:
        buffer.close()
