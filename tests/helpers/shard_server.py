"""A local HTTP server for shard tests: serves a folder from a thread of the test process on an ephemeral port, and can
cut the connection of chosen files after a number of bytes, as a flaky object store or proxy does."""

import socket
import threading
from collections import Counter
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, List


class ShardServer:
    """`url(name)` of a served file; `drop(name, after, times)`: the next `times` requests of that file (-1: all) send
    its full Content-Length header, then only `after` bytes, then close the socket. `requests` counts GETs per file."""

    def __init__(self, root: Path) -> None:
        self.drops: Dict[str, List[int]] = {}
        self.requests: Counter = Counter()
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def copyfile(self, source, outputfile) -> None:
                name = self.path.rsplit("/", 1)[-1]
                server.requests[name] += 1
                after, times = server.drops.get(name, (0, 0))
                if times == 0:
                    return super().copyfile(source, outputfile)
                server.drops[name][1] = times - 1
                outputfile.write(source.read(after))
                outputfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)

            def finish(self) -> None:
                try:
                    super().finish()
                except OSError:
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def drop(self, name: str, after: int, times: int = 1) -> None:
        self.drops[name] = [after, times]

    def __enter__(self) -> "ShardServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
