"""A local GCS emulator for tests of `gs://` paths (epath, gcsfs, TensorStore, orbax).

Use: `from gcs_emulator import gcs_bucket, emulator_env` in a test module (pytest.ini puts
tests/ on sys.path) or in conftest.py, then take `gcs_bucket` ("gs://<bucket>") as a
fixture. Child processes inherit the emulator's env vars from os.environ; pass
`emulator_env()` where a test builds a child's env itself.

Needs `gcp-storage-emulator` (the launcher below patches its internals: tested with
2026.7.19), `gcsfs` (with google-cloud-storage) and `tensorstore`; the fixture skips its
test when they are missing. Nothing here reaches the network.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

BUCKET = "cla-test"

# Runs in the emulator's process and fixes two gaps of gcp-storage-emulator:
# - no `x-goog-generation` header on downloads: TensorStore then reads generation 0 and
#   orbax's OCDBT writes fail with "Malformed StorageGeneration";
# - no `moveTo` route: it answers 501, which gcsfs retries 6 times with backoff (~30 s per
#   rename) before it falls back to copy+delete. Serve it as copy+delete right away.
# The child exits when our end of its stdin closes, so a killed pytest leaves no server.
_LAUNCHER = r"""
import sys
from http import HTTPStatus
from gcp_storage_emulator import server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

def move(request, response, storage, *args, **kwargs):
    p = request.params
    try:
        obj = objects._copy(request.base_url, storage, p["bucket_name"],
                            p["object_id"], p["bucket_name"], p["dest_object_id"])
    except NotFound:
        response.status = HTTPStatus.NOT_FOUND
        return
    objects._delete(storage, p["bucket_name"], p["object_id"])
    response.json(obj)

_download = objects.download

def download(request, response, storage, *args, **kwargs):
    _download(request, response, storage, *args, **kwargs)
    if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
        p = request.params
        obj = storage.get_file_obj(p["bucket_name"], p["object_id"])
        response["x-goog-generation"] = obj["generation"]
        response["x-goog-metageneration"] = obj["metageneration"]

objects.download = download  # objects.get(alt=media) calls it by name
server.HANDLERS = tuple(
    (regex, {m: download if h is _download else h for m, h in handlers.items()})
    for regex, handlers in server.HANDLERS)
route = (r"^/storage/v1/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)"
         r"/moveTo/o/(?P<dest_object_id>.*[^/]+)$", {"POST": move})
server.HANDLERS = (route,) + server.HANDLERS
srv = server.create_server("127.0.0.1", int(sys.argv[1]), in_memory=True,
                           default_bucket=sys.argv[2])
srv.start()
sys.stdin.read()
srv.stop()
"""

_env: dict[str, str] = {}


def emulator_env() -> dict[str, str]:
    """The env vars that point a child process at the running emulator."""
    if not _env:
        raise RuntimeError("the gcs_bucket fixture is not active")
    return dict(_env)


def _env_for(url: str) -> dict[str, str]:
    return {
        # gcsfs and google-cloud-storage (which orbax uses to check for HNS buckets
        # and to list/delete on GCS); the latter then uses anonymous credentials.
        "STORAGE_EMULATOR_HOST": url,
        "GOOGLE_CLOUD_PROJECT": "test-project",
        # gcsfs >= 2025.x probes every bucket's storage layout over gRPC (60 s
        # timeout, then it gives up) unless this is off.
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        # fsspec default kwarg for GCSFileSystem: no credential lookup at all
        # (epath creates its filesystem without a token).
        "FSSPEC_GCS_TOKEN": "anon",
        # google-auth: don't probe the GCE metadata server (hangs without network).
        "NO_GCE_CHECK": "True",
        # epath would pick tf.io.gfile if TensorFlow is importable; gfile can't be
        # pointed at an emulator.
        "EPATH_USE_TF": "false",
        # TensorStore (orbax's array I/O): endpoint, and a fixed bearer token so it
        # never looks for real credentials.
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reset_caches() -> None:
    """Drop per-process clients that captured an endpoint or credentials."""
    import gcsfs

    gcsfs.core.GCSFileSystem.clear_instance_cache()  # fsspec caches instances per class
    ext = sys.modules.get("gcsfs.extended_gcsfs")
    if ext is not None:
        ext.ExtendedGcsFileSystem.clear_instance_cache()
    try:  # epath caches one fsspec filesystem per scheme.
        from etils.epath import backend

        backend._FileSystemSpecBackend._get_filesystem.cache_clear()
    except (ImportError, AttributeError):
        pass
    try:  # orbax caches google-cloud-storage buckets (and so their client).
        from orbax.checkpoint._src.path import gcs_utils

        gcs_utils.get_bucket.cache_clear()
    except (ImportError, AttributeError):
        pass


def _disarm_tensorboardx() -> None:
    """tensorboardX's GCS writer re-uploads its file from __del__, and an atexit hook
    keeps every SummaryWriter alive until exit: against a stopped emulator that is
    120 s of retries at interpreter exit. Make the leftover writers' uploads no-ops."""
    rw = sys.modules.get("tensorboardX.record_writer")
    if rw is None:
        return
    for obj in gc.get_objects():
        if isinstance(obj, rw.GCSRecordWriter):
            obj.flush = lambda: None


@pytest.fixture(scope="session")
def gcs_bucket():
    for mod in ("gcp_storage_emulator", "gcsfs", "tensorstore"):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"{mod} is not installed")

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(
        [sys.executable, "-c", _LAUNCHER, str(port), BUCKET],
        stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/storage/v1/b/{BUCKET}", timeout=1).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"GCS emulator did not start:\n{log.read().decode()}")
                time.sleep(0.1)

        with pytest.MonkeyPatch.context() as mp:
            _env.update(_env_for(url))
            for k, v in _env.items():
                mp.setenv(k, v)
            import fsspec
            import gcsfs.core

            # If gcsfs was imported before GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT was set,
            # it exports the layout-probing ExtendedGcsFileSystem: use the plain class.
            mp.setattr(gcsfs, "GCSFileSystem", gcsfs.core.GCSFileSystem)
            old = {p: fsspec.get_filesystem_class(p) for p in ("gs", "gcs")}
            for p in old:
                fsspec.register_implementation(p, gcsfs.core.GCSFileSystem, clobber=True)
            # fsspec reads FSSPEC_GCS_TOKEN only when it is first imported.
            mp.setitem(fsspec.config.conf.setdefault("gcs", {}), "token", "anon")
            _reset_caches()
            try:
                yield f"gs://{BUCKET}"
            finally:
                _disarm_tensorboardx()
                for p, cls in old.items():
                    fsspec.register_implementation(p, cls, clobber=True)
                _env.clear()
        _reset_caches()  # after the env is restored: no client keeps the emulator
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
