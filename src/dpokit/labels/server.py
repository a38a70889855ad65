"""Running the labeling app: in the foreground (`dpokit label serve`) or in a thread while a round waits for
its labels (`iterate.judge=human`)."""

from __future__ import annotations

import logging
import threading

from dpokit.labels.app import bind, create_app
from dpokit.labels.store import Store

log = logging.getLogger(__name__)


class Server:
    """uvicorn serving the app on a socket bound up front (errors before anything is served)."""

    def __init__(self, store: Store, host: str = "127.0.0.1", port: int = 8765, token: str = ""):
        import uvicorn

        self.sock = bind(host, port, token)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.token = token
        config = uvicorn.Config(
            create_app(store, token, host), log_level="warning", lifespan="off", access_log=False
        )
        self.server = uvicorn.Server(config)
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/" + (f"?token={self.token}" if self.token else "")

    def run(self) -> None:
        """Serve until Ctrl-C / SIGTERM (uvicorn's handlers: the request in flight finishes)."""
        self.server.run(sockets=[self.sock])

    def start(self) -> Server:
        """Serve from a thread (uvicorn installs no signal handlers off the main thread: the caller owns them); `stop` ends it."""
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=10)
        self.sock.close()
