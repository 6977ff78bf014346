"""The Hugging Face Hub side of ``weights=``: one download, checked against the sha256 the Hub advertises.

``huggingface_hub`` is imported when a function runs (so ``HF_HOME``, ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE``
apply); a file that fails its checksum is removed from the Hub cache. No Keras import.
"""

import contextlib
import logging
import os
import socket
import threading
import urllib.parse
import urllib.request

from keras_convmixer import cache
from keras_convmixer.errors import first_line

logger = logging.getLogger(__name__)


def _hand_url(repo, revision, filename):
    from huggingface_hub import hf_hub_url

    return hf_hub_url(repo, filename, revision=revision)


def by_hand(repo, revision, filename):
    return (
        f"download {_hand_url(repo, revision, filename)} by hand and pass weights='/path/to/{filename}' "
        "(or train.py --weights /path/to/" + filename + ")"
    )


def download(repo, revision, filename, where):
    """``(local path, sha256)`` of a Hub file, checked against the sha256 the Hub advertises. A file that cannot be
    fetched (offline, no connection, an HTTP error) raises a one-line ``OSError``, as ``keras.utils.get_file``."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    # huggingface_hub retries a refused or unresolved connection for half a minute before it looks in its cache;
    # one bounded probe finds a missing network at once, and then only the cache is asked.
    offline = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else unreachable(constants.ENDPOINT)
    advertised = None
    if not offline:
        # The Hub's HEAD answer carries the LFS object's sha256 (X-Linked-Etag); hf_hub_download does not check it.
        with contextlib.suppress(Exception):  # a failure here is hf_hub_download's to report
            advertised = get_hf_file_metadata(_hand_url(repo, revision, filename)).etag
    try:
        local = hf_hub_download(repo, filename, revision=revision, local_files_only=bool(offline))
    except LocalEntryNotFoundError as err:  # offline (HF_HUB_OFFLINE or no connection) and not in the HF cache
        reason = offline or _reason(err)
        raise OSError(
            f"Cannot get {where} ({reason}, and it is not cached): {by_hand(repo, revision, filename)}."
        ) from None
    except (EntryNotFoundError, HfHubHTTPError, OSError) as err:
        raise OSError(f"Cannot download {where}: {_reason(err)}; {by_hand(repo, revision, filename)}.") from None

    sha = cache.sha256(local)
    blob = os.path.realpath(local)
    if not cache.is_sha256(advertised) and cache.is_sha256(os.path.basename(blob)):
        advertised = os.path.basename(blob)  # offline: the HF cache names an LFS blob after its sha256
    if not cache.is_sha256(advertised):
        logger.warning("%s: the Hub advertised no sha256 for it, so the download is not checked.", where)
    elif sha != advertised:
        # Remove the pointer and the blob so that neither this nor huggingface_hub's next call uses the file.
        for path in {local, blob}:
            with contextlib.suppress(OSError):
                os.remove(path)
        raise ValueError(
            f"{where} failed its checksum: the Hub advertises sha256 {advertised} but the download has {sha} "
            f"(file removed): retry, or {by_hand(repo, revision, filename)}."
        )
    return local, sha


# The longest a missing network may hold up ``weights=``: a connect (DNS included) that takes longer is no network.
PROBE_TIMEOUT_S = 1.5


def unreachable(endpoint, timeout=PROBE_TIMEOUT_S):
    """Why ``endpoint`` (a URL) cannot be reached, or None when a TCP connection to it (or to the proxy that
    would carry it) opens within ``timeout`` seconds, name resolution included."""
    url = urllib.parse.urlsplit(endpoint)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and host and not urllib.request.proxy_bypass(host):
        proxy_url = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = proxy_url.hostname, proxy_url.port or (443 if proxy_url.scheme == "https" else 80)
    if not host:
        return f"the endpoint {endpoint!r} names no host"
    outcome = []

    def connect():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except socket.gaierror:
            outcome.append(f"no network: cannot resolve {host}")
        except OSError as err:
            outcome.append(f"no connection to {host}:{port}: {err.strerror or type(err).__name__}")

    # getaddrinfo ignores socket timeouts, so the probe runs in a thread that is waited for at most ``timeout``.
    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout)
    return outcome[0] if outcome else f"no connection to {host}:{port} within {timeout:g} s"


def _reason(err):
    text = first_line(err)
    return text[:200] if text else type(err).__name__
