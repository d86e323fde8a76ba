"""Downloads with checksums, and automatic preparation of the paper's data.

:func:`fetch` streams a URL to a file with the standard library: written
under ``<name>.part`` and renamed only once complete and verified (md5 or
sha256), so the final name never holds half a file; an interrupted or
refused download removes the part file, and the next run starts over.

:func:`prepare_missing` is what :func:`bcl_jax.data.load_benchmark` calls
when a split-benchmark file (``cifar-cl.npz``, ``cub-val.npz``, ...) is not
in ``data_path``: it downloads the official archive (or takes the copy
already in ``data_path``), splits it exactly as ``scripts/prepare_data.py``
does and writes both ``<name>-val.npz`` and ``<name>-cl.npz``.

:func:`resolve_pretrained` turns ``config.pretrained = "torchvision"`` into
torchvision's ImageNet ResNet-18 file, downloaded once into a cache folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import os
import re
import socket
import sys
import urllib.error
import urllib.request
from typing import Any, Callable

from bcl_jax.data.errors import DataError

PREPARE = "python scripts/prepare_data.py"


@dataclasses.dataclass(frozen=True)
class Resource:
  """A file with an official URL and its published checksum."""
  name: str
  url: str
  md5: str = ""
  sha256: str = ""
  sha256_prefix: str = ""  # torchvision names carry the sha256's first digits
  size: str = ""


CIFAR100 = Resource(
    "cifar-100-python.tar.gz",
    "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    md5="eb9058c3a382ffc7106e4002c42a8d85", size="161 MiB")
CUB = Resource(
    "CUB_200_2011.tgz",
    "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz",
    md5="97eceeb196236b17998738112f37df78", size="1.1 GiB")
RESNET18 = Resource(
    "resnet18-f37072fd.pth",
    "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    sha256_prefix="f37072fd", size="45 MiB")

MINI_FILES = tuple(f"mini-imagenet-cache-{s}.pkl"
                   for s in ("train", "val", "test"))
MINI_WHERE = ("miniImageNet has no official download: these pickle caches "
              "are the ones many few-shot repositories use, e.g. the files "
              "learn2learn's MiniImagenet(root, mode, download=True) fetches")

_NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException,
                   socket.timeout, ConnectionError, TimeoutError)


class DownloadError(DataError):
  """The transfer failed (network, refused, cut short); nothing was kept."""


def _warn(msg: str) -> None:
  print(f"warning: {msg}", file=sys.stderr, flush=True)


def _bar(total: int | None, desc: str, enabled: bool) -> Any:
  """A tqdm byte bar when enabled and stderr is a terminal, else None."""
  if not enabled or not sys.stderr.isatty():
    return None
  try:
    from tqdm.auto import tqdm
  except ImportError:
    return None
  return tqdm(total=total, desc=desc, unit="B", unit_scale=True, leave=False)


def file_digest(path: str, algorithm: str) -> str:
  """Hex digest (``md5`` or ``sha256``) of a file, read in 1 MiB blocks."""
  h = hashlib.new(algorithm)
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def _reason(err: BaseException) -> str:
  if isinstance(err, urllib.error.HTTPError):
    return f"HTTP {err.code} {err.reason}"
  if isinstance(err, urllib.error.URLError):
    return str(err.reason)
  if isinstance(err, http.client.IncompleteRead):
    return (f"connection closed after {len(err.partial)} more bytes, "
            f"{err.expected} missing")
  return str(err) or type(err).__name__


def fetch(url: str, dest: str, *, md5: str = "", sha256: str = "",
          sha256_prefix: str = "", progress: bool = True,
          timeout: float = 60.0) -> str:
  """Downloads ``url`` to ``dest`` and checks it; returns ``dest``.

  Args:
    url: http(s) or file URL.
    dest: final path; its folder is created.
    md5: expected md5 (hex), '' for none.
    sha256: expected sha256 (hex), '' for none.
    sha256_prefix: expected leading hex digits of the sha256.
    progress: a tqdm bar, only when stderr is a terminal.
    timeout: seconds without data before giving up.

  Raises:
    DownloadError: the transfer failed or was cut short (``dest.part`` is
      removed, ``dest`` untouched).
    DataError: the checksum does not match (the file is deleted).
  """
  folder = os.path.dirname(os.path.abspath(dest))
  os.makedirs(folder, exist_ok=True)
  part = dest + ".part"
  want = {"md5": md5.lower(), "sha256": (sha256 or sha256_prefix).lower()}
  hashes = {a: hashlib.new(a) for a, v in want.items() if v}
  bar = None
  try:
    request = urllib.request.Request(url, headers={"User-Agent": "bcl_jax"})
    with urllib.request.urlopen(request, timeout=timeout) as resp:
      length = resp.headers.get("Content-Length")
      total = int(length) if length and length.isdigit() else None
      bar = _bar(total, os.path.basename(dest), progress)
      got = 0
      # 'wb' truncates a part file an earlier, killed run left behind.
      with open(part, "wb") as out:
        for block in iter(lambda: resp.read(1 << 20), b""):
          out.write(block)
          for h in hashes.values():
            h.update(block)
          got += len(block)
          if bar is not None:
            bar.update(len(block))
      if total is not None and got != total:
        raise http.client.IncompleteRead(b"\0" * 0, total - got)
    for algorithm, h in hashes.items():
      digest = h.hexdigest()
      if not digest.startswith(want[algorithm]):
        os.remove(part)
        raise DataError(
            f"{url}: checksum mismatch ({algorithm} {digest}, expected "
            f"{want[algorithm]}); the download was deleted. Retry; with "
            "data_url, check that the mirror serves the same file and that "
            "data_md5 / data_sha256 are right")
    os.replace(part, dest)
  except _NETWORK_ERRORS as e:
    raise DownloadError(f"cannot download {url} ({_reason(e)})") from None
  finally:
    if bar is not None:
      bar.close()
    if os.path.exists(part):  # any failure, Ctrl-C included
      os.remove(part)
  return dest


def ensure(resource: Resource, folder: str, *, url: str = "", md5: str = "",
           sha256: str = "", download: bool = True, manual: str = "",
           progress: bool = True, log: Callable[[str], None] = print) -> str:
  """``folder/resource.name``, downloaded first if it is not there.

  Args:
    resource: the file and its official URL and checksum.
    folder: where the file lives.
    url: a mirror to use instead of the official URL; checked against
      ``md5`` / ``sha256`` when given, with a warning when neither is.
    md5: expected md5 of the mirror's file.
    sha256: expected sha256 of the mirror's file.
    download: False: never touch the network.
    manual: what else the user can do, for error messages.
    progress: show a download bar on a terminal.
    log: where progress lines go.

  Raises:
    DataError: missing with ``download=False``, a failed download, or a bad
      checksum; one line naming the URL, where to put the file and
      ``manual``.
  """
  dest = os.path.join(folder, resource.name)
  if os.path.isfile(dest):
    return dest
  source = url or resource.url
  by_hand = (f"download {source} by hand to {dest} and run again"
             + (f", or {manual}" if manual else ""))
  if not download:
    raise DataError(f"{dest}: missing and download=False; {by_hand}")
  if url:
    sums = {"md5": md5, "sha256": sha256, "sha256_prefix": ""}
    if not (md5 or sha256):
      _warn(f"data_url {url} has no checksum (set data_md5 or data_sha256); "
            f"{resource.name} is used unverified")
  else:
    sums = {"md5": resource.md5, "sha256": resource.sha256,
            "sha256_prefix": resource.sha256_prefix}
  size = f" ({resource.size})" if resource.size and not url else ""
  log(f"downloading {source}{size} to {dest}")
  try:
    return fetch(source, dest, progress=progress, **sums)
  except DownloadError as e:
    raise DataError(f"{e}; {by_hand}") from None


# ------------------------------------------------- benchmarks on first use --


def _names(prefix: str) -> tuple[str, str]:
  return f"{prefix}-val.npz", f"{prefix}-cl.npz"


def _save(benchmarks: Any, folder: str, log: Callable[[str], None]) -> None:
  from bcl_jax.data.npz import save_npz
  for b in benchmarks:
    path = os.path.join(folder, f"{b.name}.npz")
    save_npz(b, path)
    log(f"wrote {path} ({b.n_tasks} tasks, {b.n_outputs} outputs, input "
        f"{b.input_shape} {b.tasks[0].x_train.dtype}, "
        f"{os.path.getsize(path) / 2**20:.1f} MiB)")


def prepare_missing(path: str, *, seed: int = 0, download: bool = True,
                    url: str = "", md5: str = "", sha256: str = "",
                    progress: bool = True,
                    log: Callable[[str], None] = print) -> bool:
  """Creates a missing split-benchmark file from its official source.

  ``cifar-{val,cl}.npz`` come from ``cifar-100-python.tar.gz`` and
  ``cub-{val,cl}.npz`` (224x224) from ``CUB_200_2011.tgz``, each taken from
  the file's folder or downloaded there (``url``: a mirror); the classes are
  split with ``seed`` as ``prepare_data.py --seed`` does. ``mini-*.npz``
  are made from ``mini-imagenet-cache-*.pkl`` in that folder, which nothing
  downloads.

  Returns:
    True if ``path`` was created, False for a name this does not know (or
    CIFAR / CUB with ``download=False`` and no archive in the folder).

  Raises:
    DataError: a failed download, a bad checksum, missing miniImageNet
      caches, or a malformed archive.
  """
  folder = os.path.dirname(path) or "."
  name = os.path.basename(path)
  # pylint: disable=import-outside-toplevel
  if name in _names("cifar") or name in _names("cub"):
    cifar = name.startswith("cifar")
    resource = CIFAR100 if cifar else CUB
    command = (f"{PREPARE} {'cifar100' if cifar else 'cub'} --source "
               f"PATH/{resource.name} --out-dir {folder}")
    if not download and not os.path.isfile(os.path.join(folder,
                                                        resource.name)):
      return False
    archive = ensure(resource, folder, url=url, md5=md5, sha256=sha256,
                     download=download, progress=progress,
                     manual=f"with a copy elsewhere, run `{command}`")
    log(f"preparing {name} from {archive} (class split seed {seed})")
    if cifar:
      from bcl_jax.data.cifar import build_cifar100
      benchmarks = build_cifar100(archive, seed=seed, progress_bar=progress)
    else:
      from bcl_jax.data.cub import build_cub
      benchmarks = build_cub(archive, seed=seed, progress_bar=progress)
    os.makedirs(folder, exist_ok=True)
    _save(benchmarks, folder, log)
    return True
  if name in _names("mini"):
    missing = [f for f in MINI_FILES
               if not os.path.isfile(os.path.join(folder, f))]
    if missing:
      raise DataError(
          f"{path}: no such file, and {', '.join(missing)} are not in "
          f"{folder} to make it from; {MINI_WHERE}. Put the three caches in "
          f"{folder} and run again, or run `{PREPARE} mini --source "
          f"DIR_WITH_CACHES --out-dir {folder}`")
    log(f"preparing {name} from the caches in {folder} (seed {seed})")
    from bcl_jax.data.mini import build_mini
    _save(build_mini(folder, seed=seed, progress_bar=progress), folder, log)
    return True
  return False


# ------------------------------------------------------ pretrained weights --


def cache_dir() -> str:
  """``$BCL_JAX_CACHE``, else ``~/.cache/bcl_jax``: downloaded weights."""
  return os.environ.get("BCL_JAX_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "bcl_jax")


def _torch_hub_copy(name: str) -> str:
  """A copy torchvision itself already downloaded, or ''."""
  home = os.environ.get("TORCH_HOME") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.join(
          os.path.expanduser("~"), ".cache"), "torch")
  path = os.path.join(home, "hub", "checkpoints", name)
  return path if os.path.isfile(path) else ""


def resolve_pretrained(spec: str, progress: bool = True,
                       log: Callable[[str], None] = print) -> str:
  """``config.pretrained`` -> a local ``.npz`` or ``.pth`` path.

  * ``"torchvision"``: torchvision's ImageNet ResNet-18
    (``resnet18-f37072fd.pth``), taken from torch's hub cache if torchvision
    already downloaded it, else downloaded once into :func:`cache_dir` and
    checked against the sha256 prefix its name carries.
  * an ``http(s)://`` URL (a mirror of that file): downloaded into
    :func:`cache_dir`; checked when the name has torchvision's
    ``<name>-<sha256 prefix>.pth`` form, used with a warning otherwise.
  * anything else: a path, returned as is.

  Raises:
    DataError: a failed download or a bad checksum.
  """
  if spec == "torchvision":
    local = _torch_hub_copy(RESNET18.name)
    if local:
      return local
    return ensure(RESNET18, cache_dir(), progress=progress, log=log,
                  manual="set pretrained to the path of a local copy")
  if re.match(r"https?://", spec):
    name = os.path.basename(spec.split("?")[0]) or "weights.pth"
    match = re.search(r"-([0-9a-f]{8,64})\.pth$", name)
    if not match:
      _warn(f"pretrained URL {spec} carries no checksum in its name "
            "(torchvision's <name>-<sha256 prefix>.pth); used unverified")
    resource = Resource(name, spec,
                        sha256_prefix=match.group(1) if match else "")
    return ensure(resource, cache_dir(), progress=progress, log=log,
                  manual="set pretrained to the path of a local copy")
  return spec
