"""containerd.services.snapshots.v1.Snapshots served over gRPC on a unix socket, by a Snapshotter.

Errors reach containerd as the gRPC codes its errdefs turns back into its own (NotFound, AlreadyExists,
FailedPrecondition, InvalidArgument); anything else is Unknown, with the error's one line.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent import futures

import grpc
from google.protobuf import empty_pb2

from ..errors import LayerfsError, log_to_stderr
from .api import mount_pb2, snapshots_pb2, snapshots_pb2_grpc
from .filters import matcher
from .metadata import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Snapshot
from .mounts import Mount
from .snapshots import Snapshotter

_CODES = {
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
}
_KIND_NUMBERS = {
    "view": snapshots_pb2.VIEW,
    "active": snapshots_pb2.ACTIVE,
    "committed": snapshots_pb2.COMMITTED,
}
_LIST_BATCH = 100  # infos a List message carries (containerd's own server sends them in hundreds)

log = logging.getLogger(__name__)


def _answers(method: Callable) -> Callable:
    """The method, with the snapshotter's errors turned into their gRPC codes."""

    @functools.wraps(method)
    def answer(self: Service, request: object, context: grpc.ServicerContext) -> object:
        try:
            return method(self, request, context)
        except tuple(_CODES) as e:
            return context.abort(_CODES[type(e)], str(e))  # (abort raises)
        except OSError as e:
            log.exception("%s failed", method.__name__)
            where = f"{e.filename}: " if e.filename else ""
            return context.abort(grpc.StatusCode.UNKNOWN, f"{where}{e.strerror or e}")

    return answer


def _mounts(found: list[Mount]) -> list[mount_pb2.Mount]:
    return [mount_pb2.Mount(type=m.type, source=m.source, options=m.options) for m in found]


def _info(snapshot: Snapshot) -> snapshots_pb2.Info:
    info = snapshots_pb2.Info(
        name=snapshot.key, parent=snapshot.parent, kind=_KIND_NUMBERS[snapshot.kind], labels=snapshot.labels
    )
    info.created_at.FromNanoseconds(snapshot.created_ns)
    info.updated_at.FromNanoseconds(snapshot.updated_ns)
    return info


class Service(snapshots_pb2_grpc.SnapshotsServicer):
    def __init__(self, snapshotter: Snapshotter) -> None:
        self._snapshotter = snapshotter

    @_answers
    def Prepare(self, request, context):
        found = self._snapshotter.prepare(request.key, request.parent, dict(request.labels))
        return snapshots_pb2.PrepareSnapshotResponse(mounts=_mounts(found))

    @_answers
    def View(self, request, context):
        found = self._snapshotter.view(request.key, request.parent, dict(request.labels))
        return snapshots_pb2.ViewSnapshotResponse(mounts=_mounts(found))

    @_answers
    def Mounts(self, request, context):
        return snapshots_pb2.MountsResponse(mounts=_mounts(self._snapshotter.mounts(request.key)))

    @_answers
    def Commit(self, request, context):
        self._snapshotter.commit(request.name, request.key, dict(request.labels))
        return empty_pb2.Empty()

    @_answers
    def Remove(self, request, context):
        self._snapshotter.remove(request.key)
        return empty_pb2.Empty()

    @_answers
    def Stat(self, request, context):
        return snapshots_pb2.StatSnapshotResponse(info=_info(self._snapshotter.stat(request.key)))

    @_answers
    def Update(self, request, context):
        updated = self._snapshotter.update(request.info.name, dict(request.info.labels), request.update_mask.paths)
        return snapshots_pb2.UpdateSnapshotResponse(info=_info(updated))

    def List(self, request, context) -> Iterator[snapshots_pb2.ListSnapshotsResponse]:
        try:
            found = self._snapshotter.list(matcher(list(request.filters)))
        except InvalidArgument as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        for start in range(0, len(found), _LIST_BATCH):
            yield snapshots_pb2.ListSnapshotsResponse(info=[_info(s) for s in found[start : start + _LIST_BATCH]])

    @_answers
    def Usage(self, request, context):
        size, inodes = self._snapshotter.usage(request.key)
        return snapshots_pb2.UsageResponse(size=size, inodes=inodes)

    @_answers
    def Cleanup(self, request, context):
        self._snapshotter.cleanup()
        return empty_pb2.Empty()


def _answered(address: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(address)
        except OSError:
            return False
        return True


def serve(address: str, root: str, *, helper_mounts: bool = False) -> None:
    """Serve the snapshots of ``root`` on the unix socket ``address`` until SIGTERM or SIGINT; with
    ``helper_mounts``, containerd mounts the unions itself."""
    log_to_stderr()
    address = os.path.abspath(address)
    os.makedirs(os.path.dirname(address), exist_ok=True)
    if _answered(address):
        raise LayerfsError(f"{address}: a server answers there already")
    snapshotter = Snapshotter(root, helper_mounts=helper_mounts)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    snapshots_pb2_grpc.add_SnapshotsServicer_to_server(Service(snapshotter), server)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(address)  # (a socket a stopped snapshotter left)
    # (Before the socket answers: a client that stops it at once must find it stopping cleanly.)
    stopped = threading.Event()
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda *_: stopped.set())
    server.add_insecure_port(f"unix://{address}")
    server.start()
    # Not stopped.wait(): the signal may reach one of gRPC's threads, and the main thread, blocked without
    # a timeout, would never run the handler (a SIGTERM then went unanswered for good).
    while not stopped.wait(0.2):
        pass
    server.stop(grace=5).wait()
    snapshotter.close()
