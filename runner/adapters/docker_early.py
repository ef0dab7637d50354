"""The Docker engine reached from a second process while this one reads the spec.

The start of ``evalrun run`` on the local engine is Python on one core: pydantic and the
spec's models, the spec, the lock and the inputs checked; and the Docker SDK imported
(requests and urllib3 with it, ~70 ms), the engine connected to and asked for its
runtimes and the image (~20 ms). The second part needs nothing of the first. So
:meth:`EarlyEngine.fork` starts a helper, by ``fork``, before the first part: it imports
the SDK and connects on the other core, then does what it is asked, in order, through
the calls this module's callers would make themselves (:mod:`runner.adapters.docker_engine`,
the same translation and retries): the runtimes, the image, create the run's container,
start it. Then it exits. This process imports the SDK once the container exists, while
the sandbox starts, and takes the container over (output, wait, inspect, removal).

With an :class:`~runner.adapters.docker_ahead.AheadKey` (``--rerun``), the helper first
starts the sandbox the last run of the same spec and lock asked for, its agent waiting for
a plan, and hands it over on ``create`` only when this run's request is the same
(:mod:`runner.adapters.docker_ahead`); otherwise it removes it and creates this run's. It
starts that sandbox through the engine's socket before it loads the SDK
(:mod:`runner.adapters.docker_socket`, the SDK's very request), and the SDK's way only
where that is refused.

An error comes back as the evalrun error the same call raises here (its class, message,
fields), an unexpected one as an internal error. A container the helper created but was
never asked to start (this process stopped in between) is removed by the helper. The
helper ignores Ctrl-C and SIGTERM (this process handles them and removes the container);
it ends when this process closes its end of the pipe, or exits, and is killed by it when
it made nothing yet. Standard library only until the
helper imports the SDK.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pickle
import shutil
import signal
import struct
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner.adapters.docker_ahead import (
    ADOPT_WITHIN_S,
    PLAN_WAIT_S,
    Ahead,
    AheadKey,
    Request,
)
from runner.errors import DockerAPIError as EngineRefused
from runner.errors import EvalrunError, InfrastructureError
from runner.shared.protocol import PLAN_MOUNT, RESULTS_MOUNT, SANDBOX_UID

if TYPE_CHECKING:
    from runner.adapters.docker_socket import EngineSocket

_LENGTH = struct.Struct(">I")
# what a request or reply may hold: a container's options and mounts, an error's fields
_MAX_MESSAGE = 16 << 20


class EarlyEngine:
    """This process's end of the helper (:meth:`fork`)."""

    def __init__(self, pid: int, requests: int, replies: int, key: AheadKey | None = None) -> None:
        self.pid = pid
        self._requests = requests
        self._replies = replies
        self._closed = False
        self._lock = threading.Lock()
        self.key = key
        # asked to create a container, or may have started one ahead: never killed from then
        # on (it removes what it made and this process did not take over)
        self.created = key is not None and key.speculate

    @classmethod
    def fork(cls, key: AheadKey | None = None) -> EarlyEngine | None:
        """The helper, started; None where it cannot be (no ``fork``, or threads already
        running: a fork copies none of them, and a lock one of them holds stays held).
        ``key``: where this run's request is stored, and whether the helper may start the
        last one's sandbox ahead."""
        if not hasattr(os, "fork") or threading.active_count() > 1:
            return None
        requests_r, requests_w = os.pipe()
        replies_r, replies_w = os.pipe()
        for stream in (sys.stdout, sys.stderr):  # buffered output is not written twice
            with contextlib.suppress(Exception):
                stream.flush()
        pid = os.fork()
        if pid == 0:  # the helper
            code = 70
            try:
                os.close(requests_w)
                os.close(replies_r)
                code = _serve(requests_r, replies_w, key)
            finally:
                os._exit(code)  # none of this process's exit handlers, buffers or files
        os.close(requests_r)
        os.close(replies_w)
        engine = cls(pid, requests_w, replies_r, key)
        atexit.register(engine.close)
        return engine

    def send(self, *request: Any) -> None:
        """Ask the helper for ``request`` (its answer: :meth:`receive`)."""
        if request[0] == "create":
            self.created = True
        try:
            _write(self._requests, request)
        except OSError as exc:
            raise InfrastructureError(
                f"the Docker helper process is gone ({exc.strerror})"
            ) from None

    def receive(self) -> Any:
        """The helper's answer to the last request; its error raised here."""
        try:
            reply = _read(self._replies)
        except (OSError, pickle.UnpicklingError, EOFError) as exc:
            raise InfrastructureError(f"the Docker helper process failed: {exc}") from None
        if reply is None:
            raise InfrastructureError("the Docker helper process ended without an answer")
        status, payload = reply
        if status == "ok":
            return payload
        if status == "error":
            raise _rebuilt(*payload)
        raise RuntimeError(f"the Docker helper process failed: {payload}")

    def ask(self, *request: Any) -> Any:
        """:meth:`send`, then :meth:`receive`, one thread at a time."""
        with self._lock:
            self.send(*request)
            return self.receive()

    def remember(self, request: Request, *, lock_digest: str, attempt: int, made: Made) -> None:
        """Store this run's ``request`` for the next run of the same bytes (nothing without
        a key)."""
        if self.key is not None:
            self.key.remember(
                request,
                lock_digest=lock_digest,
                attempt=attempt,
                waits=made.ahead != "not_waiting",
            )

    def close(self) -> None:
        """Let the helper go and reap it. One that made no container is stopped at once (it
        may still be waiting for an engine that does not answer); one that did is given a
        few seconds to remove it, if it was never asked to start it."""
        if self._closed:
            return
        self._closed = True
        for fd in (self._requests, self._replies):
            with contextlib.suppress(OSError):
                os.close(fd)
        if not self.created:
            with contextlib.suppress(OSError):
                os.kill(self.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(self.pid, os.WNOHANG) == (0, 0):
                if time.monotonic() > deadline:
                    os.kill(self.pid, signal.SIGKILL)
                    os.waitpid(self.pid, 0)
                    return
                time.sleep(0.01)


class Made:
    """The helper's answer to ``create``: the container, and for one started ahead and
    handed over, its plan folder (write plan.json there) and results folder."""

    def __init__(
        self,
        container_id: str,
        *,
        ahead: str | None = None,
        plan_dir: str | None = None,
        results_dir: str | None = None,
    ) -> None:
        self.container_id = container_id
        # None (none was started ahead), "adopted", "different" (this run asked for another
        # container) or "not_waiting" (its agent had stopped waiting for a plan)
        self.ahead = ahead
        self.plan_dir = Path(plan_dir) if plan_dir else None
        self.results_dir = Path(results_dir) if results_dir else None


def _write(fd: int, message: object) -> None:
    data = pickle.dumps(message)
    view = memoryview(_LENGTH.pack(len(data)) + data)
    while view:
        view = view[os.write(fd, view) :]


def _read(fd: int) -> Any:
    """The next message on ``fd``; None at its end."""
    head = _read_exactly(fd, _LENGTH.size)
    if head is None:
        return None
    (length,) = _LENGTH.unpack(head)
    if length > _MAX_MESSAGE:
        raise EOFError(f"a message of {length} bytes")
    data = _read_exactly(fd, length)
    if data is None:
        raise EOFError("a message cut short")
    return pickle.loads(data)  # noqa: S301 - from this process's own fork, over its own pipe


def _read_exactly(fd: int, size: int) -> bytes | None:
    chunks: list[bytes] = []
    left = size
    while left:
        chunk = os.read(fd, left)
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _rebuilt(kind: type[EvalrunError], args: tuple[Any, ...], state: dict[str, Any]) -> Exception:
    """The error the helper met, as this process would have raised it."""
    exc = kind.__new__(kind)
    exc.args = args
    exc.__dict__.update(state)
    return exc


# --- the helper ---------------------------------------------------------------------------


_SDK = object()
"""What :meth:`_Helper._on_socket` answers where the request needs the SDK's way."""


class _Helper:
    """What the helper knows: its client, the engine's runtimes, the container it made."""

    def __init__(self) -> None:
        self.client: Any = None
        self.runtimes: list[str] = []
        self.failure: BaseException | None = None
        self.container: Any = None
        self.started = False
        self.ahead: _Started | None = None
        self.socket: EngineSocket | None = None  # where the sandbox ahead was started
        self.adopted = False  # handed over as started on the socket, the SDK never loaded
        self.removals: list[threading.Thread] = []

    def connect(self) -> None:
        try:
            from runner.adapters.docker_engine import connect, runtimes

            self.client = connect()
            self.runtimes = sorted(runtimes(self.client))
        except BaseException as exc:  # said when the first request comes
            self.failure = exc

    def handle(self, request: tuple[Any, ...]) -> tuple[str, Any]:
        try:
            return "ok", self._do(*request)
        except EvalrunError as exc:
            state = dict(exc.__dict__)
            try:
                pickle.dumps((type(exc), exc.args, state))
            except Exception:
                return "crash", f"{type(exc).__name__}: {exc}"
            return "error", (type(exc), exc.args, state)
        except BaseException:
            return "crash", traceback.format_exc(limit=8)

    def _do(self, what: str, *args: Any) -> Any:
        if self.socket is not None and self.client is None and self.failure is None:
            answer = self._on_socket(what, *args)
            if answer is not _SDK:
                return answer
            self.connect()  # the SDK's way from here on
            self.connected_ahead()
        from runner.adapters.docker_engine import (
            create_container,
            docker_call,
            image_id,
            remove_named,
        )

        if self.failure is not None:
            raise self.failure
        if what == "runtimes":
            return self.runtimes
        if what == "has_runtime":
            return args[0] in self.runtimes
        if what == "image":
            return image_id(self.client, args[0])
        if what == "create":
            image, command, mounts, options = args
            request = Request(image, tuple(command), tuple(tuple(m) for m in mounts), options)
            outcome = self._take_ahead(request) if self.ahead is not None else None
            if outcome == "adopted":
                assert self.ahead is not None
                self.container = self.ahead.container
                return Made(
                    self.container.id,
                    ahead=outcome,
                    plan_dir=str(self.ahead.plan_dir),
                    results_dir=str(self.ahead.results_dir),
                )
            remove_named(self.client, options["name"])
            self.container = docker_call(
                "create container",
                lambda: create_container(self.client, image, command, mounts, options),
            )
            return Made(self.container.id, ahead=outcome)
        if what == "start":
            self.started = True  # this process owns it now, started or not
            if self.ahead is None or self.container is not self.ahead.container:
                docker_call("start container", self.container.start, retries=False)
            return None
        raise ValueError(f"unknown request {what!r}")

    def _on_socket(self, what: str, *args: Any) -> Any:
        """The answer to ``what``, through the engine's socket the sandbox ahead was
        started on, while the SDK is not loaded; :data:`_SDK` where the SDK's way is
        needed: this run's request is not the one the sandbox was started for, or it no
        longer waits, the image is not there (the SDK's way pulls it), any refusal."""
        assert self.socket is not None
        try:
            ahead = self.ahead
            if (
                what == "has_runtime"
                and ahead is not None
                and ahead.container_id is not None
                and args[0] == ahead.request.options["runtime"]
            ):
                return True  # the sandbox ahead was started on it: no need to ask (~20 ms)
            if what in ("runtimes", "has_runtime"):
                registered = self.socket.runtimes()
                return sorted(registered) if what == "runtimes" else args[0] in registered
            if what == "image":
                found = self.socket.image_id(args[0])
                return _SDK if found is None else found
            if what == "create" and ahead is not None and ahead.container_id is not None:
                image, command, mounts, options = args
                request = Request(image, tuple(command), tuple(tuple(m) for m in mounts), options)
                if self._handover(ahead, request) == "adopted":
                    self.adopted = True
                    return Made(
                        ahead.container_id,
                        ahead="adopted",
                        plan_dir=str(ahead.plan_dir),
                        results_dir=str(ahead.results_dir),
                    )
            if what == "start" and self.adopted:
                self.started = True  # this process owns it now
                return None
        except EngineRefused:
            pass
        return _SDK

    def start_ahead_on_socket(self, ahead: Ahead) -> None:
        """Create and start ``ahead``'s sandbox through the engine's socket, before the SDK
        is loaded (:mod:`runner.adapters.docker_socket`); nothing where that cannot be (the
        SDK's way, :meth:`start_ahead`, follows once it is loaded)."""
        from runner.adapters.docker_socket import EngineSocket, create_body  # http.client

        engine = EngineSocket.from_env()
        prepared = self._prepared(ahead) if engine is not None else None
        if engine is None or prepared is None:
            return
        started, command, mounts = prepared
        body = create_body(ahead.request.image, command, mounts, ahead.request.options)
        if body is None:  # a request the socket's way does not translate
            self._remove(started)
            return
        try:
            # a name already taken (a stale container of that run) is refused: the SDK's
            # way removes it first
            started.container_id = engine.create(ahead.request.options["name"], body)
            engine.start(started.container_id)
            started.at = time.monotonic()
        except Exception:  # refused, or an answer this does not read: nothing is left
            if started.container_id is not None:
                with contextlib.suppress(EngineRefused):
                    engine.remove(started.container_id)
            self._remove(started)
            return
        self.ahead = started
        self.socket = engine

    def start_ahead(self, ahead: Ahead) -> None:
        """Create and start ``ahead``'s sandbox, its agent waiting for a plan; nothing (and
        nothing left behind) where that fails: the run then goes as it would without."""
        if self.failure is not None or ahead.request.options["runtime"] not in self.runtimes:
            return
        from runner.adapters.docker_engine import create_container, remove_named

        prepared = self._prepared(ahead)
        if prepared is None:
            return
        started, command, mounts = prepared
        try:
            remove_named(self.client, ahead.request.options["name"])
            started.container = create_container(
                self.client, ahead.request.image, command, mounts, ahead.request.options
            )
            started.container.start()
            started.at = time.monotonic()
        except Exception:
            self._remove(started)
            return
        self.ahead = started

    def connected_ahead(self) -> None:
        """The sandbox started on the socket, as an SDK object once the SDK is connected;
        removed through the socket where it could not connect."""
        started = self.ahead
        if started is None or started.container is not None:
            return
        if self.failure is None:
            with contextlib.suppress(Exception):
                started.container = self.client.containers.prepare_model(
                    {"Id": started.container_id}
                )
        if started.container is None:
            self.ahead = None
            self._remove(started)

    def _prepared(
        self, ahead: Ahead
    ) -> tuple[_Started, list[str], list[tuple[str, str, bool]]] | None:
        """``ahead``'s fresh plan and results folders (the agent can read the one and write
        the other), its command (waiting for a plan) and its mounts; None where the
        folders cannot be made."""
        folders: list[Path] = []
        try:
            for prefix in ("evalrun-plan-", "evalrun-results-"):
                folders.append(Path(tempfile.mkdtemp(prefix=prefix)))
            plan_dir, results_dir = folders
            plan_dir.chmod(0o755)
            os.chown(results_dir, SANDBOX_UID, SANDBOX_UID)
        except OSError:
            for folder in folders:
                shutil.rmtree(folder, ignore_errors=True)
            return None
        started = _Started(None, plan_dir, results_dir, ahead.request, time.monotonic())
        sources = {PLAN_MOUNT: str(plan_dir), RESULTS_MOUNT: str(results_dir)}
        mounts = [
            (target, sources.get(target) or str(source), read_only)
            for target, source, read_only in ahead.request.mounts
        ]
        command = [*ahead.request.command, "--plan-wait", str(PLAN_WAIT_S)]
        return started, command, mounts

    def _take_ahead(self, request: Request) -> str:
        """Hand over the sandbox started ahead if ``request`` is the one it was started
        from and its agent still waits for a plan ("adopted"); otherwise remove it, on a
        thread while this run's own container is made unless it has that container's name
        ("different", "not_waiting")."""
        ahead = self.ahead
        assert ahead is not None
        outcome = self._handover(ahead, request)
        if outcome == "adopted":
            return outcome
        self.ahead = None
        if ahead.request.options["name"] == request.options["name"]:
            self._remove(ahead)  # the name is this run's container's: free it first
        else:
            removal = threading.Thread(target=self._remove, args=(ahead,))
            removal.start()
            self.removals.append(removal)
        return outcome

    def _handover(self, ahead: _Started, request: Request) -> str:
        """ "adopted" when ``ahead`` was started from ``request`` and its agent still waits
        for a plan; else "different" (another request) or "not_waiting". Its state is read
        as it was started: through the SDK's object, or on the engine's socket."""
        if request.normalized() != ahead.request.normalized():
            return "different"
        if time.monotonic() - ahead.at < ADOPT_WITHIN_S:
            with contextlib.suppress(Exception):  # a state that cannot be read: not waiting
                if ahead.container is not None:
                    ahead.container.reload()
                    status = ahead.container.status
                else:
                    assert self.socket is not None and ahead.container_id is not None
                    status = self.socket.status(ahead.container_id)
                if status == "running":
                    return "adopted"
        return "not_waiting"

    def _remove(self, started: _Started) -> None:
        if started.container is not None:
            from runner.adapters.docker_engine import log, remove_container

            remove_container(started.container, log)
        elif started.container_id is not None and self.socket is not None:
            with contextlib.suppress(EngineRefused):
                self.socket.remove(started.container_id)
        for folder in (started.plan_dir, started.results_dir):
            shutil.rmtree(folder, ignore_errors=True)

    def abandon(self) -> None:
        """Remove a container this process asked for but never asked to start, and one
        started ahead that it did not take over."""
        if self.ahead is not None and (
            self.container is not self.ahead.container or not self.started
        ):
            self._remove(self.ahead)
        elif self.container is not None and not self.started:
            from runner.adapters.docker_engine import log, remove_container

            remove_container(self.container, log)
        for removal in self.removals:
            removal.join()


class _Started:
    """A sandbox started ahead: its container, plan and results folders, request, start."""

    def __init__(
        self, container: Any, plan_dir: Path, results_dir: Path, request: Request, at: float
    ) -> None:
        self.container = container
        self.container_id: str | None = None  # started on the socket, before the SDK
        self.plan_dir = plan_dir
        self.results_dir = results_dir
        self.request = request
        self.at = at


def _serve(requests: int, replies: int, key: AheadKey | None) -> int:
    # Ctrl-C, or a stop sent to the whole process group, is this process's parent's to
    # handle: it then lets the helper remove a container it never started (or kills it)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    helper = _Helper()
    ahead = key.ahead() if key is not None else None
    try:
        if ahead is not None:
            helper.start_ahead_on_socket(ahead)
        if helper.socket is None:  # the SDK's way, loaded while this process reads the spec
            helper.connect()
            if ahead is not None:
                helper.start_ahead(ahead)
        # else the SDK loads only when a request needs it (Helper._on_socket): not at all
        # when the sandbox is handed over, so the answers come as soon as it runs
        while (request := _read(requests)) is not None:
            _write(replies, helper.handle(request))
            if request[0] == "start":
                break
    except (OSError, EOFError, pickle.UnpicklingError):
        pass  # this process's parent is gone
    finally:
        helper.abandon()
    return 0
