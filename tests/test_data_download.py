"""``gem data download | verify | list`` against a loopback server (tests/data_server.py).

The server serves miniature copies of the published files with their own checksums; the table of
data sets is swapped for one that points at it, so nothing reaches beyond 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import shutil
import socket
import sys
import time
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from data_server import DataServer, fixture_sources
from gem import data_download as dd
from gem.cli import main, run_main
from gem.data import MissingDataError
from gem.interfaces import BuildContext

ROOT = Path(__file__).resolve().parents[1]
NPZ = dd.SOURCES["dsprites"].files[0].name
CHUNK = 256  # bytes per read and write in these tests, so that the small fixtures take many


@pytest.fixture
def server():
    s = DataServer()
    yield s
    s.close()


@pytest.fixture
def table(tmp_path, server, monkeypatch):
    """dsprites, celeba and lsun_horse served by ``server``; fast retries; small chunks."""
    made = fixture_sources(tmp_path / "published", server, ("dsprites", "celeba", "lsun_horse"))
    monkeypatch.setattr(dd, "SOURCES", {**dd.SOURCES, **made})
    monkeypatch.setattr(dd, "RETRY_DELAYS", (0.0, 0.0, 0.0))
    monkeypatch.setattr(dd, "_CHUNK", CHUNK)
    monkeypatch.delenv(dd.MIRROR_ENV, raising=False)
    return made


def gem(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(list(argv))
    return status, out.getvalue(), err.getvalue()


def served(server: DataServer, name: str = "dsprites", file: str = NPZ) -> bytes:
    return server.files[f"/{name}/{file}"]


def test_download_lands_a_file_the_dsprites_recipe_loads(table, server, tmp_path):
    root = tmp_path / "data" / "dsprites"
    status, out, err = gem("data", "download", "dsprites", "--root", str(root))
    assert status == 0, err
    assert (root / NPZ).read_bytes() == served(server)
    assert "downloaded and verified (md5)" in out
    assert not list(root.glob("*.part")) and not list(root.glob("*.bad-*"))

    # The recipe loads it: gem-run's dry run builds the data set through the plugin.
    out_buf, err_buf = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out_buf), contextlib.redirect_stderr(err_buf):
        code = run_main([str(ROOT / "recipes/dsprites.yaml"), "--dry-run", "--set", f"dataset.root={root}",
                         "--set", f"cache_dir={tmp_path / 'cache'}", "--set", "scoring.n_images=16"])
    assert code == 0, err_buf.getvalue()[-2000:]
    assert "nothing was sent or trained" in out_buf.getvalue()

    from gem_plugins import dsprites
    ds = dsprites.build_dsprites(dsprites.DSpritesOptions(root=str(root)),
                                 BuildContext(seed=0, run_dir=tmp_path / "run", cache_dir=tmp_path / "cache2"))
    with np.load(root / NPZ) as npz:
        assert len(ds) == len(npz["imgs"]) == 64
        assert ds.images.reshape(64, -1).sum() == npz["imgs"].astype(np.int64).sum() * 255 * 3


def test_a_second_call_verifies_and_fetches_nothing(table, server, tmp_path):
    root = tmp_path / "d"
    assert gem("data", "download", "dsprites", "--root", str(root))[0] == 0
    before = len(server.requests)
    status, out, _ = gem("data", "download", "dsprites", "--root", str(root))
    assert status == 0 and "present and verified (md5)" in out
    assert len(server.requests) == before


def test_a_dropped_connection_resumes_with_a_range_request(table, server, tmp_path):
    path = f"/dsprites/{NPZ}"
    server.modes[path] = ("flaky", 2)
    root = tmp_path / "d"
    status, _, err = gem("data", "download", "dsprites", "--root", str(root))
    assert status == 0, err
    body = server.body_requests(path)
    assert len(body) == 3 and body[0].range is None
    assert all(r.range and r.range.startswith("bytes=") for r in body[1:])
    assert all(r.status == 206 for r in body[1:])
    size = len(served(server))
    assert sum(r.sent for r in body) < 2 * size
    assert (root / NPZ).read_bytes() == served(server)


def test_a_server_that_ignores_ranges_restarts_from_zero(table, server, tmp_path):
    path = f"/dsprites/{NPZ}"
    server.modes[path] = ("ignore_range", 0)
    root = tmp_path / "d"
    root.mkdir()
    (root / f"{NPZ}.part").write_bytes(b"x" * 500)  # a stale partial file
    status, _, err = gem("data", "download", "dsprites", "--root", str(root))
    assert status == 0, err
    assert server.body_requests(path)[0].range == "bytes=500-"
    assert (root / NPZ).read_bytes() == served(server)


def test_a_quota_page_is_a_clear_error_and_leaves_nothing(table, server, tmp_path):
    server.modes[f"/dsprites/{NPZ}"] = ("quota", 0)
    root = tmp_path / "d"
    status, _, err = gem("data", "download", "dsprites", "--root", str(root))
    assert status == 2
    assert "quota" in err and "Nothing was saved" in err and "gem data verify dsprites" in err
    assert not (root / NPZ).exists()
    assert not [p for p in root.iterdir() if p.name != dd.RECORD_FILE]


def test_google_drive_confirm_page_leads_to_the_file_and_celeba_loads(table, server, tmp_path, monkeypatch):
    ids = {}
    for remote in table["celeba"].files:
        ids[remote.name] = f"id-{remote.name}"
        server.drive[ids[remote.name]] = f"/celeba/{remote.name}"
    drive = replace(table["celeba"], files=tuple(replace(r, drive_id=ids[r.name]) for r in table["celeba"].files))
    monkeypatch.setitem(dd.SOURCES, "celeba", drive)
    monkeypatch.setattr(dd, "_DRIVE_URL", server.url + "/uc?export=download&id={id}")
    root = tmp_path / "celeba"
    status, out, err = gem("data", "download", "celeba", "--root", str(root))
    assert status == 0, err
    paths = [r.path for r in server.requests]
    assert paths.count("/uc") == 4 and paths.count("/download") == 4
    assert "unpacked 20 files from img_align_celeba.zip" in out
    assert not (root / "img_align_celeba.zip").exists() and not list(root.glob(".*unpack*"))

    from gem_plugins import celeba
    ds = celeba.build_celeba(celeba.CelebAOptions(root=str(root), image_size=32, workers=1),
                             BuildContext(seed=0, run_dir=tmp_path / "run", cache_dir=tmp_path / "cache"))
    assert len(ds) == 20

    status, out, _ = gem("data", "verify", "celeba", "--root", str(root))
    assert status == 0 and "20 files, as published" in out


def test_a_drive_page_without_a_confirm_form_is_the_quota_error(table, server, tmp_path, monkeypatch):
    monkeypatch.setattr(dd, "_DRIVE_URL", server.url + "/download?id={id}")  # no confirm: the quota page
    server.drive["q"] = "/celeba/list_attr_celeba.txt"
    only = replace(table["celeba"], files=(replace(table["celeba"].files[1], drive_id="q"),))
    monkeypatch.setitem(dd.SOURCES, "celeba", only)
    status, _, err = gem("data", "download", "celeba", "--root", str(tmp_path / "c"))
    assert status == 2 and "download quota" in err and "hf:OWNER/REPO" in err
    assert not (tmp_path / "c" / "list_attr_celeba.txt").exists()


def test_a_checksum_mismatch_keeps_the_file_aside(table, server, tmp_path, monkeypatch):
    wrong = replace(table["dsprites"], files=(replace(table["dsprites"].files[0], md5="0" * 32),))
    monkeypatch.setitem(dd.SOURCES, "dsprites", wrong)
    root = tmp_path / "d"
    status, _, err = gem("data", "download", "dsprites", "--root", str(root))
    assert status == 2
    sha8 = hashlib.sha256(served(server)).hexdigest()[:8]
    bad = root / f"{NPZ}.bad-{sha8}"
    assert bad.read_bytes() == served(server)
    assert str(bad) in err and "not the published file" in err and "md5" in err
    assert not (root / NPZ).exists() and not (root / f"{NPZ}.part").exists()


def _fail_on_write(monkeypatch, n: int, exc: BaseException) -> list[int]:
    calls = [0]
    real = dd._write

    def write(fh, chunk):
        calls[0] += 1
        if calls[0] == n:
            raise exc
        real(fh, chunk)

    monkeypatch.setattr(dd, "_write", write)
    return calls


def test_a_full_disk_says_what_is_needed_and_keeps_the_part(table, server, tmp_path, monkeypatch):
    _fail_on_write(monkeypatch, 3, OSError(errno.ENOSPC, "No space left on device"))
    root = tmp_path / "d"
    size = len(served(server))
    assert size > 6 * CHUNK
    status, _, err = gem("data", "download", "dsprites", "--root", str(root))
    assert status == 2
    assert "no space left" in err and f"{size} bytes in all" in err and "resume" in err
    assert (root / f"{NPZ}.part").stat().st_size == 2 * CHUNK
    assert not (root / NPZ).exists()

    monkeypatch.setattr(dd, "_write", lambda fh, chunk: fh.write(chunk))
    assert gem("data", "download", "dsprites", "--root", str(root))[0] == 0
    assert server.body_requests(f"/dsprites/{NPZ}")[-1].range == f"bytes={2 * CHUNK}-"
    assert (root / NPZ).read_bytes() == served(server)


def test_ctrl_c_keeps_the_part_and_the_next_call_resumes(table, server, tmp_path, monkeypatch):
    _fail_on_write(monkeypatch, 4, KeyboardInterrupt())
    root = tmp_path / "d"
    status, _, err = gem("data", "download", "dsprites", "--root", str(root))
    assert status == 130
    assert "interrupted" in err and "resumes" in err and f"{NPZ}.part" in err
    assert (root / f"{NPZ}.part").stat().st_size == 3 * CHUNK and not (root / NPZ).exists()

    monkeypatch.setattr(dd, "_write", lambda fh, chunk: fh.write(chunk))
    assert gem("data", "download", "dsprites", "--root", str(root))[0] == 0
    body = server.body_requests(f"/dsprites/{NPZ}")
    assert body[-1].range == f"bytes={3 * CHUNK}-" and body[-1].status == 206
    assert sum(r.sent for r in body) < 2 * len(served(server))
    assert (root / NPZ).read_bytes() == served(server)


def test_a_server_that_always_truncates_ends_with_the_part_kept(table, server, tmp_path):
    server.modes[f"/dsprites/{NPZ}"] = ("truncate", 0)
    root = tmp_path / "d"
    status, _, err = gem("data", "download", "dsprites", "--root", str(root))
    assert status == 2 and "keeps failing" in err and "resume" in err
    assert (root / f"{NPZ}.part").stat().st_size == len(served(server)) * 3 // 4
    assert not (root / NPZ).exists()


def test_no_network_names_the_url_and_fails_fast(table, tmp_path, monkeypatch):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/dsprites/{NPZ}"
    monkeypatch.setitem(dd.SOURCES, "dsprites",
                        replace(table["dsprites"], files=(replace(table["dsprites"].files[0], url=url),)))
    started = time.perf_counter()
    status, _, err = gem("data", "download", "dsprites", "--root", str(tmp_path / "d"))
    assert time.perf_counter() - started < 5
    assert status == 2
    assert url in err and f"cannot reach 127.0.0.1:{port}" in err
    assert "by hand" in err and "gem data verify dsprites" in err


def test_the_mirror_variable_replaces_the_official_url(table, server, tmp_path, monkeypatch):
    monkeypatch.setitem(dd.SOURCES, "dsprites",
                        replace(table["dsprites"], files=(replace(table["dsprites"].files[0], url="http://127.0.0.1:9/x"),)))
    monkeypatch.setenv(dd.MIRROR_ENV, server.url + "/")
    assert gem("data", "download", "dsprites", "--root", str(tmp_path / "d"))[0] == 0
    assert server.body_requests(f"/dsprites/{NPZ}")


def test_the_hugging_face_mirror(table, server, tmp_path, monkeypatch):
    asked = []

    def hf_hub_download(repo_id, filename, repo_type, local_dir):
        asked.append((repo_id, filename, repo_type))
        path = Path(local_dir) / filename
        path.write_bytes(served(server))
        return str(path)

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(hf_hub_download=hf_hub_download))
    root = tmp_path / "d"
    status, _, err = gem("data", "download", "dsprites", "--root", str(root), "--mirror", "hf:someone/dsprites")
    assert status == 0, err
    assert asked == [("someone/dsprites", NPZ, "dataset")]
    assert (root / NPZ).read_bytes() == served(server) and not server.requests

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    status, _, err = gem("data", "download", "dsprites", "--root", str(tmp_path / "e"), "--mirror", "hf:someone/x")
    assert status == 2 and "pip install huggingface_hub" in err


def test_lsun_unpacks_the_lmdb_where_the_recipe_reads_it(table, server, tmp_path):
    root = tmp_path / "lsun"
    status, out, err = gem("data", "download", "lsun_horse", "--root", str(root))
    assert status == 0, err
    assert (root / "horse" / "data.mdb").is_file() and not (root / "horse.zip").exists()
    from gem_plugins import lsun
    ds = lsun.build_lsun(lsun.LSUNOptions(root=str(root), category="horse", image_size=32, workers=1),
                         BuildContext(seed=0, run_dir=tmp_path / "run", cache_dir=tmp_path / "cache"))
    assert len(ds) == 3
    status, out, _ = gem("data", "list", "--root", str(tmp_path))
    line = next(x for x in out.splitlines() if x.startswith("lsun_horse"))
    assert line.endswith("present, zip CRCs checked (no published checksum)")
    status, out, _ = gem("data", "verify", "lsun_horse", "--root", str(root))
    assert status == 0 and "as when unpacked; no published checksum" in out


def _status_of(out: str, name: str) -> str:
    line = next(x for x in out.splitlines() if x.split()[:1] == [name])
    return line.split("  ")[-1].strip()


def test_list_and_verify_report_what_is_there(table, server, tmp_path):
    parent = tmp_path / "data"
    status, out, _ = gem("data", "list", "--root", str(parent))
    assert status == 0
    assert _status_of(out, "dsprites") == "missing" and _status_of(out, "celeba") == "missing"
    assert "Apache 2.0" in out and "non-commercial" in out and str(parent / "dsprites") in out

    assert gem("data", "download", "dsprites", "--root", str(parent / "dsprites"))[0] == 0
    (parent / "celeba").mkdir()
    (parent / "celeba" / "list_attr_celeba.txt.part").write_bytes(b"x" * 3_000_000)
    out = gem("data", "list", "--root", str(parent))[1]
    assert _status_of(out, "dsprites") == "present, verified"
    assert _status_of(out, "celeba") == "partial download 3.0 MB"

    # A folder filled by hand: present, unverified until `gem data verify` checks it.
    hand = tmp_path / "hand" / "dsprites"
    hand.mkdir(parents=True)
    shutil.copy(parent / "dsprites" / NPZ, hand / NPZ)
    out = gem("data", "list", "--root", str(hand.parent))[1]
    assert _status_of(out, "dsprites") == "present, unverified (gem data verify dsprites)"
    status, out, _ = gem("data", "verify", "dsprites", "--root", str(hand))
    assert status == 0 and f"OK      {hand / NPZ} (md5)" in out
    assert _status_of(gem("data", "list", "--root", str(hand.parent))[1], "dsprites") == "present, verified"

    data = bytearray((hand / NPZ).read_bytes())
    data[100] ^= 0xFF
    (hand / NPZ).write_bytes(bytes(data))
    status, out, err = gem("data", "verify", "dsprites", "--root", str(hand))
    assert status == 2 and f"BAD     {hand / NPZ}: md5 is" in out and str(hand / NPZ) in err
    assert out.rstrip().endswith(f"fix: gem data download dsprites --root {hand}")
    assert _status_of(gem("data", "list", "--root", str(hand.parent))[1], "dsprites").startswith("present, unverified")

    status, out, _ = gem("data", "verify", "celeba", "--root", str(tmp_path / "nothing"))
    assert status == 2 and "MISSING" in out


def test_a_hand_placed_file_that_does_not_match_is_set_aside_and_replaced(table, server, tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    (root / NPZ).write_bytes(b"not the npz")
    status, out, err = gem("data", "download", "dsprites", "--root", str(root))
    assert status == 0, err
    assert (root / NPZ).read_bytes() == served(server)
    assert [p.read_bytes() for p in root.glob(f"{NPZ}.bad-*")] == [b"not the npz"]


@pytest.mark.parametrize("recipe, name, sub", [("dsprites", "dsprites", "dsprites"), ("shapes3d", "shapes3d", "s3d"),
                                               ("celeba", "celeba", "faces"), ("lsun_horse", "lsun_horse", "lsun"),
                                               ("lsun_bedroom", "lsun_bedroom", "lsun")])
def test_a_missing_data_set_ends_with_the_command_that_fixes_it(recipe, name, sub, tmp_path):
    from gem.plugins import Registry, make_plugin_manager
    from gem.recipe import load_recipe_file, override_recipe, validate_recipe

    registry = Registry(make_plugin_manager())
    root = tmp_path / "my data" / sub
    data, _ = override_recipe(load_recipe_file(str(ROOT / f"recipes/{recipe}.yaml")), [f"dataset.root={root}"], registry)
    spec = validate_recipe(data, registry)
    reg = registry.get("dataset", spec.plugin_name("dataset"))
    fields = {k: v for k, v in spec.to_dict()["dataset"].items() if k != "plugin"}
    options = reg.options(**fields)
    with pytest.raises(MissingDataError) as err:
        reg.build(options, BuildContext(seed=0, run_dir=tmp_path / "run", cache_dir=tmp_path / "cache"))
    assert str(err.value).splitlines()[-1] == f"fix: gem data download {name} --root '{root}'"


def test_gem_run_of_a_recipe_without_its_data_ends_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = run_main([str(ROOT / "recipes/dsprites.yaml"), "--dry-run"])
    assert code == 2
    lines = err.getvalue().splitlines()
    assert lines[-2] == "fix: gem data download dsprites --root data/dsprites"


def test_a_celeba_folder_filled_by_hand_is_checked_not_overwritten(table, server, tmp_path):
    from data_fixtures import write_celeba

    root = tmp_path / "celeba"
    write_celeba(root, n=20)
    status, out, err = gem("data", "download", "celeba", "--root", str(root))
    assert status == 0, err
    assert "20 files, as published" in out and "already there, not downloaded" in out
    assert not server.requests  # the hand-written text files are the served ones: verified, not fetched

    other = tmp_path / "other"
    write_celeba(other, n=20)
    (other / "img_align_celeba" / "000007.jpg").unlink()
    status, _, err = gem("data", "download", "celeba", "--root", str(other))
    assert status == 2 and "19 files, expected 20" in err and "move it away" in err
