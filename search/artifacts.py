"""Where checkpoints and Optuna artifacts live: a folder that every worker mounts, or an S3 bucket
(`--artifacts s3://bucket/prefix`) so that hosts share no filesystem.

One `Artifacts` value serves both. Training always reads and writes a local folder (`root`): the
store itself for a folder, this machine's cache of the bucket for S3. With S3,

- `synced(folder)` wraps a trial's training: it downloads the trial's `last.pt`/`best.pt` from the
  bucket first (a retry on another host resumes from them), uploads each one again whenever the
  trainer replaces it (a SIGKILLed worker loses at most the checkpoint not uploaded yet), and on
  the way out uploads the final state, or drops `last.pt` when nothing will resume from it;
- `ref(path)` is how a checkpoint is recorded on a trial (`s3://bucket/prefix/<study>/...`), and
  `local(ref)` turns a recorded reference back into a file here, downloading it once into the
  cache (a distillation teacher, `hpo export`);
- `optuna_store()` is Optuna's `Boto3ArtifactStore` under `<prefix>/store/`, so the dashboard
  lists and serves the checkpoints straight from the bucket.

Endpoint, region and credentials come from boto3's usual sources (`AWS_ENDPOINT_URL`,
`AWS_DEFAULT_REGION`, `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY` or a credentials file named by
`AWS_SHARED_CREDENTIALS_FILE`); nothing here holds a secret.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from optuna.artifacts import FileSystemArtifactStore

from trainer.contract import BEST, LAST

S3 = "s3://"
# What a trial's folder holds. best.pt goes up first, so a last.pt in the bucket never names a
# best epoch that is not there.
FILES = (BEST, LAST)
POLL_SECONDS = 0.5  # how often a trial's folder is checked for a checkpoint to upload
DEFAULT_CACHE = "hpo-cache"
log = logging.getLogger("hpo.artifacts")


class ArtifactsError(RuntimeError):
    """A user-facing problem with --artifacts: a malformed URL, an unreachable bucket."""


@dataclass(frozen=True)
class Artifacts:
    root: Path  # a folder: the store itself; S3: this machine's cache of the bucket
    url: str = ""  # "s3://bucket/prefix" (no trailing slash), "" for a folder
    _client: list[Any] = field(default_factory=list, compare=False, repr=False)

    @property
    def bucket(self) -> str:
        return self.url[len(S3):].partition("/")[0]

    @property
    def prefix(self) -> str:
        return self.url[len(S3):].partition("/")[2]

    def key(self, relative: str) -> str:
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def client(self) -> Any:
        """One boto3 client per store (boto3's clients are thread-safe; making one takes ~50 ms)."""
        if not self._client:
            import boto3

            # botocore logs where it found credentials at INFO, on every start: noise in a
            # worker's log, and the `hpo` line a user error must be alone on stderr.
            logging.getLogger("botocore").setLevel(logging.WARNING)
            self._client.append(boto3.client("s3"))
        return self._client[0]

    def check(self) -> None:
        """Fail early, in one line, when the bucket cannot be reached."""
        if not self.url:
            return
        try:
            self.client().head_bucket(Bucket=self.bucket)
        except Exception as e:
            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get(
                "AWS_ENDPOINT_URL") or "AWS's default endpoint"
            raise ArtifactsError(
                f"--artifacts {self.url}: bucket {self.bucket!r} is not reachable at {endpoint}"
                f" ({type(e).__name__}: {e}); check the bucket name, AWS_ENDPOINT_URL and the"
                " credentials") from None

    def optuna_store(self) -> Any:
        """The store Optuna's `upload_artifact` and optuna-dashboard use."""
        if not self.url:
            (self.root / "store").mkdir(parents=True, exist_ok=True)
            return FileSystemArtifactStore(str(self.root / "store"))
        from optuna.artifacts import Boto3ArtifactStore

        return PrefixedStore(Boto3ArtifactStore(self.bucket, client=self.client()),
                             self.key("store/"))

    def ref(self, path: str | Path) -> str:
        """How the checkpoint `path` (under `root`) is recorded on a trial."""
        if not self.url:
            return str(path)
        return f"{self.url}/{Path(path).relative_to(self.root).as_posix()}"

    def local(self, ref: str) -> Path:
        """The file a recorded reference names, on this machine: from the cache, downloaded
        into it first when missing. A best.pt is written once, when its trial ends, so a cached
        copy never goes stale."""
        if not ref.startswith(S3):
            return Path(ref)
        if not self.url or not ref.startswith(self.url + "/"):
            raise ArtifactsError(
                f"checkpoint {ref} is in an object store; pass the workers' store as --artifacts"
                f" (or HPO_ARTIFACTS), not {self.url or str(self.root)!r}")
        relative = ref[len(self.url) + 1:]
        path = self.root / relative
        if not path.is_file() and not self._download(relative, path):
            raise ArtifactsError(f"checkpoint {ref} is not in the bucket")
        return path

    @contextlib.contextmanager
    def synced(self, folder: Path, *, keep_last: type[BaseException]) -> Iterator[None]:
        """Mirror a trial's checkpoint `folder` to the bucket around the code it wraps. `last.pt`
        is kept there only when the wrapped code raises `keep_last` (a hand-back): every other
        ending leaves nothing to resume, and its optimizer state would be dead weight."""
        if not self.url:
            yield
            return
        relative = folder.relative_to(self.root).as_posix()
        folder.mkdir(parents=True, exist_ok=True)
        for name in FILES:  # the bucket is the truth: a copy here may be from an older attempt
            path = folder / name
            if not self._download(f"{relative}/{name}", path):
                path.unlink(missing_ok=True)
        pusher = _Pusher(self, folder, relative)
        pusher.start()
        try:
            yield
        except keep_last:
            pusher.finish()
            raise
        except BaseException:
            pusher.finish()
            self._remove(f"{relative}/{LAST}")
            raise
        pusher.finish()
        self._remove(f"{relative}/{LAST}")

    def _download(self, relative: str, path: Path) -> bool:
        """Copy one object into `path` (atomically); False when the bucket has no such object."""
        from botocore.exceptions import ClientError

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
        try:
            self.client().download_file(self.bucket, self.key(relative), str(tmp))
        except ClientError as e:
            tmp.unlink(missing_ok=True)
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
                return False
            raise
        os.replace(tmp, path)
        return True

    def upload(self, path: Path, relative: str) -> None:
        self.client().upload_file(str(path), self.bucket, self.key(relative))

    def study_objects(self, study: str, artifact_ids: Sequence[str]) -> list[str]:
        """The bucket's keys that belong to `study`: its checkpoints under `<prefix>/<study>/`
        and the Optuna artifacts its trials recorded (under `<prefix>/store/`, named by id
        only, so they are found through the trials). Empty for a folder store."""
        if not self.url:
            return []
        keys: list[str] = []
        pages = self.client().get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.key(f"{study}/"))
        for page in pages:
            keys.extend(o["Key"] for o in page.get("Contents", []))
        return keys + [self.key(f"store/{a}") for a in artifact_ids]

    def delete_objects(self, keys: Sequence[str]) -> None:
        """Delete `keys` from the bucket (a missing key is no error in S3); raises when the
        bucket refuses any, so that `hpo delete` stops before it drops the rows naming them."""
        for start in range(0, len(keys), 1000):  # the most one DeleteObjects call takes
            batch = [{"Key": k} for k in keys[start:start + 1000]]
            answer = self.client().delete_objects(
                Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            if answer.get("Errors"):
                first = answer["Errors"][0]
                raise ArtifactsError(
                    f"{self.url}: the bucket refused to delete {len(answer['Errors'])} object(s),"
                    f" {first.get('Key')}: {first.get('Code')} {first.get('Message')}")

    def _remove(self, relative: str) -> None:
        with contextlib.suppress(Exception):  # a leftover last.pt costs space, not correctness
            self.client().delete_object(Bucket=self.bucket, Key=self.key(relative))


class _Pusher(threading.Thread):
    """Uploads a trial's checkpoint files whenever the trainer has replaced them. The trainer
    writes each by rename, so a file read here is always whole."""

    def __init__(self, store: Artifacts, folder: Path, relative: str) -> None:
        super().__init__(name="hpo-artifacts", daemon=True)
        self.store, self.folder, self.relative = store, folder, relative
        self.done = threading.Event()
        self.seen = {name: self._stamp(name) for name in FILES}  # what the bucket holds already

    def _stamp(self, name: str) -> tuple[int, int] | None:
        try:
            st = (self.folder / name).stat()
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_ino

    def push(self) -> None:
        for name in FILES:
            stamp = self._stamp(name)
            if stamp is None or stamp == self.seen[name]:
                continue
            try:
                self.store.upload(self.folder / name, f"{self.relative}/{name}")
            except FileNotFoundError:
                continue  # replaced between the stat and the read: the next round has it
            self.seen[name] = stamp

    def run(self) -> None:
        while not self.done.wait(POLL_SECONDS):
            try:
                self.push()
            except Exception as e:  # an outage of the store must not end the trial
                log.warning("uploading checkpoints of %s failed, retrying: %s", self.relative, e)

    def finish(self) -> None:
        """Stop polling and upload what is new; the trial is not over until that has landed."""
        self.done.set()
        self.join()
        self.push()


class PrefixedStore:
    """An Optuna artifact store whose ids live under a key prefix in the bucket: Optuna's
    `Boto3ArtifactStore` uses the id itself as the key, at the top of the bucket."""

    def __init__(self, inner: Any, prefix: str) -> None:
        self.inner, self.prefix = inner, prefix

    def open_reader(self, artifact_id: str) -> IO[bytes]:
        return self.inner.open_reader(self.prefix + artifact_id)

    def write(self, artifact_id: str, content_body: IO[bytes]) -> None:
        self.inner.write(self.prefix + artifact_id, content_body)

    def remove(self, artifact_id: str) -> None:
        self.inner.remove(self.prefix + artifact_id)


def open_artifacts(spec: str | Path, cache: str | None = None) -> Artifacts:
    """`--artifacts` as given: a folder, or s3://bucket[/prefix] with its cache under `cache`
    (default: $HPO_ARTIFACTS_CACHE, else ./hpo-cache), one folder per bucket and prefix. Keep
    the cache path the same on every host (the default is): see the note below."""
    text = str(spec)
    if not text.startswith(S3):
        if "://" in text:
            raise ArtifactsError(f"--artifacts {text}: only folders and s3:// URLs are supported")
        return Artifacts(root=Path(text).resolve())
    bucket, _, prefix = text[len(S3):].partition("/")
    prefix = prefix.strip("/")
    if not bucket or "//" in prefix:
        raise ArtifactsError(f"--artifacts {text}: expected s3://bucket or s3://bucket/prefix")
    try:
        import boto3  # noqa: F401
    except ImportError:
        raise ArtifactsError(f"--artifacts {text} needs boto3: pip install boto3") from None
    base = Path(cache or os.environ.get("HPO_ARTIFACTS_CACHE") or DEFAULT_CACHE)
    url = f"{S3}{bucket}/{prefix}" if prefix else f"{S3}{bucket}"
    # Not resolved: a relative cache stays relative to the worker's working folder, so the
    # teacher path a trial trains with is the same string on every host (the trainer refuses to
    # resume a run whose recorded teacher path differs from the one it is given).
    return Artifacts(root=base / bucket / prefix, url=url)
