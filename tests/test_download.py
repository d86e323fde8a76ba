"""Downloads on first use, against a loopback HTTP server (never the internet).

The server (``http.server`` on 127.0.0.1, an ephemeral port, in a thread,
shut down at the end of the module) serves tiny files in the official
formats: a CIFAR-100 python tarball (Python 2 style pickles), a
``CUB_200_2011.tgz`` of JPEGs and a torchvision-style ``.pth`` zip written
by the project's torch-pickle writer. It can also cut a file short.
"""

from __future__ import annotations

import hashlib
import http.server
import importlib.util
import io
import os
import socket
import tarfile
import threading

import numpy as np
import pytest

from bcl_jax import experiment
from bcl_jax.data import cifar, cub, download, load_benchmark, npz
from bcl_jax.data.errors import DataError
from data_helpers import _py2_style_pickle

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- server --


class _Server:
  """Serves ``files`` by name; a name in ``cut`` gets half its bytes."""

  def __init__(self):
    self.files: dict[str, bytes] = {}
    self.cut: set[str] = set()
    self.requests: list[str] = []
    outer = self

    class Handler(http.server.BaseHTTPRequestHandler):

      def do_GET(self):  # noqa: N802 (the http.server API)
        name = self.path.lstrip("/")
        outer.requests.append(name)
        if name not in outer.files:
          self.send_error(404)
          return
        body = outer.files[name]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if name in outer.cut:  # the connection drops mid-file
          self.wfile.write(body[:len(body) // 2])
          self.wfile.flush()
          self.close_connection = True
          return
        self.wfile.write(body)

      def log_message(self, *args):
        pass

    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.httpd.timeout = 5
    self.thread = threading.Thread(target=self.httpd.serve_forever,
                                   kwargs={"poll_interval": 0.1}, daemon=True)
    self.thread.start()

  def url(self, name: str) -> str:
    return f"http://127.0.0.1:{self.httpd.server_port}/{name}"

  def close(self):
    self.httpd.shutdown()
    self.httpd.server_close()
    self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def server():
  s = _Server()
  yield s
  s.close()


def _closed_port() -> int:
  """A port on 127.0.0.1 nothing listens on (bound, then released)."""
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


# ------------------------------------------------------ official formats --


def cifar_tarball(n_train: int = 3, n_test: int = 1) -> tuple[bytes, tuple]:
  """``cifar-100-python.tar.gz`` with ``n_*`` images per class."""
  rng = np.random.default_rng(0)
  arrays = []
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode="w:gz") as tar:
    for split, n in (("train", n_train), ("test", n_test)):
      y = rng.permutation(np.repeat(np.arange(100), n))
      x = rng.integers(0, 256, (len(y), 3072), np.uint8)
      x[:, :1024] = (2 * y)[:, None]  # a learnable red plane
      arrays += [x, y]
      blob = _py2_style_pickle({
          b"filenames": [b"x.png"] * len(y), b"batch_label": split.encode(),
          b"fine_labels": [int(v) for v in y],
          b"coarse_labels": [int(v) // 5 for v in y], b"data": x})
      info = tarfile.TarInfo(f"cifar-100-python/{split}")
      info.size = len(blob)
      tar.addfile(info, io.BytesIO(blob))
  return buf.getvalue(), tuple(arrays)


def cub_tarball(tmp_path) -> bytes:
  """``CUB_200_2011.tgz``: one train and one test JPEG per class."""
  from data_helpers import write_cub_folder
  folder = write_cub_folder(tmp_path / "cub_src", n_per_split=1)
  (tmp_path / "cub_src" / "attributes.txt").write_text("1 has_bill\n")
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode="w:gz") as tar:
    tar.add(folder, arcname="CUB_200_2011")
    tar.add(tmp_path / "cub_src" / "attributes.txt", arcname="attributes.txt")
  return buf.getvalue()


def _md5(data: bytes) -> str:
  return hashlib.md5(data).hexdigest()


def _config(name: str, variant: str = "quick", **overrides):
  spec = importlib.util.spec_from_file_location(
      f"cfg_{name}", os.path.join(REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(variant)
  c.update(dict(progress=False, heatmap=False, checkpoint=False))
  c.update(overrides)
  return c


@pytest.fixture(scope="module")
def cifar_served(server):
  data, arrays = cifar_tarball()
  server.files["cifar-100-python.tar.gz"] = data
  return data, arrays


# ----------------------------------------------------------------- fetch --


def test_fetch_checks_and_never_leaves_half_files(server, tmp_path):
  body = bytes(range(256)) * 999
  server.files["blob.bin"] = body
  dest = str(tmp_path / "sub" / "blob.bin")
  # Wrong checksum: refused, deleted, said so.
  with pytest.raises(DataError, match=r"checksum mismatch \(md5 "
                     rf"{_md5(body)}, expected 0{{32}}\); the download was "
                     "deleted"):
    download.fetch(server.url("blob.bin"), dest, md5="0" * 32)
  assert os.listdir(tmp_path / "sub") == []
  # Cut mid-file: nothing under either name; the next try succeeds.
  server.cut.add("blob.bin")
  with pytest.raises(download.DownloadError,
                     match=r"cannot download .*blob.bin \(connection closed"):
    download.fetch(server.url("blob.bin"), dest, md5=_md5(body))
  assert os.listdir(tmp_path / "sub") == []
  server.cut.discard("blob.bin")
  # A part file a killed run left behind is overwritten, not appended to.
  (tmp_path / "sub" / "blob.bin.part").write_bytes(b"stale" * 100)
  assert download.fetch(server.url("blob.bin"), dest, md5=_md5(body),
                        sha256=hashlib.sha256(body).hexdigest()) == dest
  assert (tmp_path / "sub" / "blob.bin").read_bytes() == body
  assert os.listdir(tmp_path / "sub") == ["blob.bin"]
  with pytest.raises(download.DownloadError, match="HTTP 404"):
    download.fetch(server.url("nope.bin"), str(tmp_path / "nope.bin"))
  assert not (tmp_path / "nope.bin").exists()


def test_mirror_without_checksum_warns(server, tmp_path, capsys):
  server.files["plain.bin"] = b"abc"
  res = download.Resource("plain.bin", "https://example.invalid/plain.bin",
                          md5="f" * 32)
  path = download.ensure(res, str(tmp_path), url=server.url("plain.bin"),
                         log=lambda *_: None)
  assert open(path, "rb").read() == b"abc"
  assert "has no checksum (set data_md5 or data_sha256)" in \
      capsys.readouterr().err


# ------------------------------------------------------------- CIFAR-100 --


def test_cifar_downloads_prepares_then_reuses(server, cifar_served, tmp_path):
  data, (_, y_tr, _, _) = cifar_served
  folder = tmp_path / "data"
  config = _config("cifar", data_path=str(folder),
                   data_url=server.url("cifar-100-python.tar.gz"),
                   data_md5=_md5(data))
  before = len(server.requests)
  bench = load_benchmark(config)
  assert server.requests[before:] == ["cifar-100-python.tar.gz"]
  assert sorted(os.listdir(folder)) == [
      "cifar-100-python.tar.gz", "cifar-cl.npz", "cifar-val.npz"]
  assert (folder / "cifar-100-python.tar.gz").read_bytes() == data
  assert (bench.name, bench.n_tasks, bench.n_outputs) == ("cifar-cl", 2, 85)
  # The files equal what prepare_data.py makes from the same tarball.
  val, cl = cifar.build_cifar100(folder / "cifar-100-python.tar.gz",
                                 progress_bar=False)
  for exp in (val, cl):
    got = npz.load_npz(folder / f"{exp.name}.npz")
    assert got.n_outputs == exp.n_outputs and got.n_tasks == exp.n_tasks
    for tg, te in zip(got.tasks, exp.tasks):
      assert tg.x_train.dtype == np.uint8
      np.testing.assert_array_equal(tg.x_train, te.x_train)
      np.testing.assert_array_equal(tg.y_test, te.y_test)
  # Every image of the tarball is in exactly one task.
  n_train = sum(len(t.y_train) for b in (val, cl) for t in b.tasks)
  assert n_train == len(y_tr) == 300
  # Second use: nothing downloaded or rewritten.
  stamps = {f: os.stat(folder / f).st_mtime_ns for f in os.listdir(folder)}
  again = load_benchmark(_config("cifar", "val,quick", data_path=str(folder),
                                 data_url=config.data_url))
  assert again.name == "cifar-val"
  assert len(server.requests) == before + 1
  assert stamps == {f: os.stat(folder / f).st_mtime_ns
                    for f in os.listdir(folder)}


@pytest.mark.slow
def test_cifar_download_then_train_twice(server, cifar_served, tmp_path):
  """experiment.run end to end; the second run reuses the prepared files."""
  data, _ = cifar_served
  config = _config("cifar", data_path=str(tmp_path / "data"), use=20,
                   eval_batch_size=10,
                   data_url=server.url("cifar-100-python.tar.gz"),
                   data_md5=_md5(data))
  before = len(server.requests)
  res = experiment.run(config, str(tmp_path / "wd1"), log=lambda *_: None)
  res2 = experiment.run(config, str(tmp_path / "wd2"), log=lambda *_: None)
  assert len(server.requests) == before + 1
  assert np.asarray(res["accuracy_matrix"]).shape == (2, 2)
  assert res["benchmark"]["n_outputs"] == 85
  np.testing.assert_array_equal(res2["accuracy_matrix"],
                                res["accuracy_matrix"])


def test_cifar_wrong_checksum_refused(server, cifar_served, tmp_path):
  folder = tmp_path / "data"
  config = _config("cifar", "val,quick", data_path=str(folder),
                   data_url=server.url("cifar-100-python.tar.gz"),
                   data_md5="1" * 32)
  with pytest.raises(DataError, match="checksum mismatch.*deleted"):
    load_benchmark(config)
  assert os.listdir(folder) == []


def test_cifar_dropped_connection_then_success(server, cifar_served, tmp_path):
  data, _ = cifar_served
  folder = tmp_path / "data"
  config = _config("cifar", "val,quick", data_path=str(folder),
                   data_url=server.url("cifar-100-python.tar.gz"),
                   data_md5=_md5(data))
  server.cut.add("cifar-100-python.tar.gz")
  try:
    with pytest.raises(DataError, match="connection closed") as err:
      load_benchmark(config)
  finally:
    server.cut.discard("cifar-100-python.tar.gz")
  assert "\n" not in str(err.value)
  assert os.listdir(folder) == []
  bench = load_benchmark(config)
  assert (bench.name, bench.n_tasks, bench.n_outputs) == ("cifar-val", 2, 15)


def test_no_server_one_line_error(tmp_path):
  url = f"http://127.0.0.1:{_closed_port()}/cifar-100-python.tar.gz"
  folder = tmp_path / "data"
  config = _config("cifar", data_path=str(folder), data_url=url,
                   data_md5="0" * 32)
  with pytest.raises(DataError) as err:
    load_benchmark(config)
  msg = str(err.value)
  assert "\n" not in msg
  assert msg.startswith(f"cannot download {url} (")
  assert f"by hand to {folder}/cifar-100-python.tar.gz" in msg
  assert (f"python scripts/prepare_data.py cifar100 --source "
          f"PATH/cifar-100-python.tar.gz --out-dir {folder}") in msg
  assert not folder.exists() or os.listdir(folder) == []


def test_download_false_never_connects(server, cifar_served, tmp_path):
  before = len(server.requests)
  config = _config("cifar", data_path=str(tmp_path), download=False,
                   data_url=server.url("cifar-100-python.tar.gz"))
  with pytest.raises(DataError, match=r"no such file.*prepare_data\.py "
                     "cifar100"):
    load_benchmark(config)
  assert len(server.requests) == before
  # An archive already in data_path is prepared without any download.
  (tmp_path / "cifar-100-python.tar.gz").write_bytes(cifar_served[0])
  assert load_benchmark(config).name == "cifar-cl"
  assert len(server.requests) == before


def test_cli_run_reports_download_error(tmp_path):
  import subprocess
  import sys
  url = f"http://127.0.0.1:{_closed_port()}/cifar-100-python.tar.gz"
  env = dict(os.environ, PYTHONPATH=REPO)
  proc = subprocess.run(
      [sys.executable, "-m", "bcl_jax.run", "--config",
       os.path.join(REPO, "configs", "cifar.py:quick"),
       f"--config.data_path={tmp_path}", f"--config.data_url={url}",
       "--workdir", str(tmp_path / "wd")],
      env=env, capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 2
  lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
  assert len(lines) == 1 and f"cannot download {url}" in lines[0]
  assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------- CUB --


def test_cub_downloads_and_prepares_224(server, tmp_path):
  data = cub_tarball(tmp_path)
  server.files["CUB_200_2011.tgz"] = data
  folder = tmp_path / "data"
  config = _config("cub", data_path=str(folder),
                   data_url=server.url("CUB_200_2011.tgz"),
                   data_md5=_md5(data))
  bench = load_benchmark(config)
  assert (bench.name, bench.n_tasks, bench.n_outputs) == ("cub-cl", 2, 170)
  assert bench.input_shape == (3, 224, 224)
  assert bench.tasks[0].x_train.dtype == np.uint8
  # The temporary extraction is gone; only the archive and the files stay.
  assert sorted(os.listdir(folder)) == [
      "CUB_200_2011.tgz", "cub-cl.npz", "cub-val.npz"]
  exp_val, exp_cl = cub.build_cub(tmp_path / "cub_src" / "CUB_200_2011",
                                  progress_bar=False)
  got = npz.load_npz(folder / "cub-cl.npz")
  for tg, te in zip(got.tasks, exp_cl.tasks):
    np.testing.assert_array_equal(tg.x_train, te.x_train)
    np.testing.assert_array_equal(tg.y_train, te.y_train)
  assert npz.load_npz(folder / "cub-val.npz").n_outputs == exp_val.n_outputs


@pytest.mark.slow
def test_cub_download_and_train_224(server, tmp_path):
  data = cub_tarball(tmp_path)
  server.files["CUB_200_2011.tgz"] = data
  config = _config("cub", data_path=str(tmp_path / "data"), use=10,
                   eval_batch_size=10, data_url=server.url("CUB_200_2011.tgz"),
                   data_md5=_md5(data))
  res = experiment.run(config, str(tmp_path / "wd"), log=lambda *_: None)
  assert np.asarray(res["accuracy_matrix"]).shape == (2, 2)
  assert res["benchmark"]["input_shape"] == [3, 224, 224]


# ------------------------------------------------------------ mini, .pth --


def test_mini_names_the_files_and_where_to_get_them(tmp_path):
  config = _config("mini", data_path=str(tmp_path))
  with pytest.raises(DataError, match=r"mini-cl\.npz: no such file, and "
                     r"mini-imagenet-cache-train\.pkl, .*-val\.pkl, "
                     r".*-test\.pkl are not in .*no official download.*"
                     "learn2learn"):
    load_benchmark(config)


def test_pretrained_torchvision_pth(server, tmp_path, monkeypatch):
  from bcl_jax.data import torch_pickle
  from bcl_jax.models import build_model, resnet
  import jax
  key = jax.random.PRNGKey(0)
  # Shapes only: a real ResNet-18 init costs ~10-30 s on this CPU.
  template = jax.eval_shape(build_model("resnet18", (3, 32, 32), 7).init, key)
  rng = np.random.default_rng(0)
  state = {}
  for name_, (coll, path) in resnet.torchvision_names(template).items():
    leaf = template[coll]
    for p in path:
      leaf = leaf[p]
    shape = resnet._torch_shape(  # pylint: disable=protected-access
        tuple(leaf.shape))
    state[name_] = rng.standard_normal(shape).astype(np.float32)
    if name_.endswith("running_var"):
      state[name_.replace("running_var", "num_batches_tracked")] = np.array(
          5, np.int64)
  state["fc.weight"] = np.zeros((1000, 512), np.float32)
  state["fc.bias"] = np.zeros((1000,), np.float32)
  pth = tmp_path / "w.pth"
  torch_pickle.save_torch_zip(state, pth)
  blob = pth.read_bytes()
  name = f"resnet18-{hashlib.sha256(blob).hexdigest()[:8]}.pth"
  server.files[name] = blob
  monkeypatch.setenv("BCL_JAX_CACHE", str(tmp_path / "cache"))
  monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no_torch"))
  monkeypatch.setattr(download, "RESNET18",
                      download.Resource(name, server.url(name),
                                        sha256_prefix=name[9:17]))
  before = len(server.requests)
  for spec in ("torchvision", server.url(name)):
    model = build_model("resnet18", (3, 32, 32), 7, pretrained=spec)
    shapes = jax.eval_shape(model.init, key)  # init wires the weights in
    assert jax.tree_util.tree_structure(shapes) == \
        jax.tree_util.tree_structure(template)
  assert server.requests[before:] == [name]  # downloaded once, then cached
  assert os.listdir(tmp_path / "cache") == [name]
  cached = str(tmp_path / "cache" / name)
  assert download.resolve_pretrained("torchvision") == cached
  got = resnet.load_pretrained(template, cached)
  np.testing.assert_array_equal(np.asarray(got["params"]["conv1"]["kernel"]),
                                state["conv1.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(
      np.asarray(got["batch_stats"]["layer4"]["1"]["bn2"]["var"]),
      state["layer4.1.bn2.running_var"])
  # A file whose sha256 does not start with its name's prefix is refused.
  bad = "resnet18-00000000.pth"
  server.files[bad] = blob
  with pytest.raises(DataError, match="checksum mismatch"):
    build_model("resnet18", (3, 32, 32), 7, pretrained=server.url(bad))
  assert os.listdir(tmp_path / "cache") == [name]


def test_convert_script_reads_pth_without_torch(tmp_path, capsys):
  import sys
  from bcl_jax.data import torch_pickle
  spec = importlib.util.spec_from_file_location(
      "convert_torchvision_resnet18",
      os.path.join(REPO, "scripts", "convert_torchvision_resnet18.py"))
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  state = {"conv1.weight": np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2),
           "bn1.running_mean": np.array([0.5, -1.0], np.float64),
           "bn1.num_batches_tracked": np.array(7, np.int64)}
  pth, out = tmp_path / "w.pth", tmp_path / "w.npz"
  torch_pickle.save_torch_zip(state, pth)
  assert script.main(["convert", str(pth), str(out)]) == 0
  with np.load(out) as got:
    assert sorted(got.files) == ["bn1.running_mean", "conv1.weight"]
    np.testing.assert_array_equal(got["conv1.weight"], state["conv1.weight"])
    assert got["bn1.running_mean"].dtype == np.float32
  (tmp_path / "junk.pth").write_bytes(b"not a torch file")
  assert script.main(["convert", str(tmp_path / "junk.pth"), str(out)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: cannot read pretrained")
  assert "torch" not in sys.modules
