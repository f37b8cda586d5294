"""Patient pseudonyms keyed with a site secret, so that they mean nothing outside the site.

A plain hash of a PatientID is reversed by hashing candidate ids (hospital ids are short and
structured). An HMAC-SHA256 keyed with a random 256-bit site key cannot be, without the key. The
key lives in one file, created on first use with mode 600 in a folder of mode 700, outside any
site folder: a site folder is read by training and may be copied around, the key must not travel
with it. Keeping the file keeps each patient's pseudonym stable across imports at the site (so a
patient stays in one split); losing it only means later imports give new pseudonyms.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path

__all__ = ["KEY_BYTES", "default_key_file", "pseudonym", "site_key"]

KEY_BYTES = 32
_KEY_FILE_MAX_BYTES = 1024


def default_key_file() -> Path:
    """``$XDG_CONFIG_HOME/medfed/pseudonym.key`` (``~/.config/medfed/pseudonym.key`` by default):
    the operator's own configuration, never a site folder."""
    config_home = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config_home) / "medfed" / "pseudonym.key"


def site_key(key_file: str | Path, out: str | Path) -> bytes:
    """The site's pseudonym key from ``key_file``, created there (256 random bits as hex, mode 600)
    when the file does not exist yet.

    Raises ValueError naming ``--key-file`` and what to do when the file lies inside the output
    site folder ``out``, cannot be read or created, is readable or writable by group or others, or
    does not hold exactly one 64-digit hex key.
    """
    path = Path(key_file).expanduser()
    if Path(os.path.realpath(path)).is_relative_to(os.path.realpath(out)):
        raise ValueError(f"--key-file {path} is inside the output site folder {out}: keep the site key outside it")
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if path.parent.is_dir():
            return _read(path)  # the usual case: the key made at an earlier import
        raise ValueError(f"--key-file {path} cannot be created: {path.parent} is not a folder") from None
    except OSError as err:
        raise ValueError(f"--key-file {path} cannot be created ({err.strerror or err}): give a writable path") from None
    with os.fdopen(descriptor, "w") as handle:
        handle.write(secrets.token_hex(KEY_BYTES) + "\n")
    return _read(path)


def pseudonym(key: bytes, identifier: str) -> str:
    """``p-`` and 16 hex digits of HMAC-SHA256(key, identifier): stable at the site, meaningless elsewhere."""
    digest = hmac.new(key, identifier.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()
    return "p-" + digest[:16]


def _read(path: Path) -> bytes:
    try:
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as err:
        raise ValueError(f"--key-file {path} cannot be read: {err.strerror or err}") from None
    status = os.fstat(descriptor)
    problem = ""
    if not stat.S_ISREG(status.st_mode):
        problem = "is not a regular file: give the site key file"
    elif status.st_mode & 0o077:
        problem = f"is open to group or others (mode {stat.S_IMODE(status.st_mode):o}): run chmod 600 {path}"
    if problem:
        os.close(descriptor)
        raise ValueError(f"--key-file {path} {problem}")
    with os.fdopen(descriptor, "rb") as handle:
        data = handle.read(_KEY_FILE_MAX_BYTES + 1)
    try:
        key = bytes.fromhex(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        key = b""
    if len(key) != KEY_BYTES or len(data) > _KEY_FILE_MAX_BYTES:
        raise ValueError(
            f"--key-file {path} is not a medfed site key (one line of {2 * KEY_BYTES} hex digits): "
            "restore the site's key file, or give a new path to create a new key (patients then get new pseudonyms)"
        )
    return key
