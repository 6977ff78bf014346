"""A local stand-in for the Hugging Face Hub's file-download routes, for the real ``huggingface_hub`` client.

It answers ``HEAD`` and ``GET /<owner>/<repo>/resolve/<revision>/<filename>`` as the Hub does for an LFS file:
``X-Repo-Commit`` (the commit the revision points to), ``X-Linked-Etag`` (the file's sha256, quoted),
``X-Linked-Size`` and ``Content-Length``. ``huggingface_hub`` reads its endpoint, cache and offline switch into
``huggingface_hub.constants`` when it is imported, so ``point_hub_at`` patches them there.
"""

import hashlib
import http.server
import threading

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class HubServer:
    """``with HubServer() as hub: hub.add("owner/repo", "model.safetensors", data); hub.url ...``"""

    def __init__(self):
        self.files = {}  # (repo, filename) -> (served bytes, advertised sha256)
        self.requests = []  # (method, path) of every request, for tests that count them
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_HEAD(self):  # noqa: N802 (http.server's naming)
                self._answer(body=False)

            def do_GET(self):  # noqa: N802
                self._answer(body=True)

            def _answer(self, body):
                server.requests.append((self.command, self.path))
                parts = self.path.split("?")[0].strip("/").split("/")
                found = None
                if len(parts) >= 5 and parts[2] == "resolve":
                    found = server.files.get(("/".join(parts[:2]), "/".join(parts[4:])))
                if found is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("X-Repo-Commit", COMMIT)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data, sha = found
                self.send_response(200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("X-Linked-Etag", f'"{sha}"')
                self.send_header("ETag", f'"{sha}"')
                self.send_header("X-Linked-Size", str(len(data)))
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def log_message(self, *args):  # keep pytest's output clean
                pass

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = None

    def add(self, repo, filename, data, *, advertised_sha256=None):
        """Serve ``data`` as ``repo``'s ``filename``; ``advertised_sha256`` (default: the true one) is the sha256
        the HEAD answer claims."""
        self.files[(repo, filename)] = (bytes(data), advertised_sha256 or hashlib.sha256(data).hexdigest())

    def start(self):
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self):
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def point_hub_at(monkeypatch, endpoint, hf_home, keras_home, offline=False):
    """Point ``huggingface_hub`` (already imported) and our cache at a server and two folders, as setting
    HF_ENDPOINT, HF_HOME, KERAS_HOME and HF_HUB_OFFLINE before the import would."""
    import os

    from huggingface_hub import constants

    endpoint = endpoint.rstrip("/")
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HOME", str(hf_home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", os.path.join(str(hf_home), "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", bool(offline))
    monkeypatch.setenv("KERAS_HOME", str(keras_home))
    return {
        "HF_ENDPOINT": endpoint,
        "HF_HOME": str(hf_home),
        "KERAS_HOME": str(keras_home),
        "HF_HUB_OFFLINE": "1" if offline else "0",
    }
