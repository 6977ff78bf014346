"""The Hugging Face Hub side of ``weights=``: one download, checked against the sha256 the Hub advertises.

``huggingface_hub`` is imported when a function runs (so ``HF_HOME``, ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE``
apply); a file that fails its checksum is removed from the Hub cache. No Keras import.
"""

import contextlib
import logging
import os

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
    """``(local path, sha256)`` of a Hub file, checked against the sha256 the Hub advertises."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    advertised = None
    if not constants.HF_HUB_OFFLINE:
        # The Hub's HEAD answer carries the LFS object's sha256 (X-Linked-Etag); hf_hub_download does not check it.
        with contextlib.suppress(Exception):  # no network etc.: hf_hub_download then says what is wrong
            advertised = get_hf_file_metadata(_hand_url(repo, revision, filename)).etag
    try:
        local = hf_hub_download(repo, filename, revision=revision)
    except LocalEntryNotFoundError as err:  # offline (HF_HUB_OFFLINE or no connection) and not in the HF cache
        reason = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else _reason(err)
        raise ValueError(
            f"Cannot get {where} ({reason}, and it is not cached): {by_hand(repo, revision, filename)}."
        ) from None
    except (EntryNotFoundError, HfHubHTTPError, OSError) as err:
        raise ValueError(f"Cannot download {where}: {_reason(err)}; {by_hand(repo, revision, filename)}.") from None

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


def _reason(err):
    text = first_line(err)
    return text[:200] if text else type(err).__name__
