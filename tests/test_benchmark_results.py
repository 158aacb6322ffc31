"""benchmarks/results/: every file follows the one schema of benchmarks/results.py and is named by a doc page; and
the writer itself (atomic writes, the schema, file names, the -2 of a second run the same day) in a temporary
directory."""
import json
import os
import re
import subprocess
from datetime import date, datetime
from pathlib import Path

import pytest
import torch

from benchmarks import results as writer

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
FILES = sorted(p for p in RESULTS.rglob("*") if p.is_file())
SHA = re.compile(r"[0-9a-f]{40}")


def test_results_hold_only_json_files_in_area_folders():
    assert FILES, "no results kept"
    for path in FILES:
        rel = path.relative_to(RESULTS)
        assert path.suffix == ".json" and len(rel.parts) == 2, f"{rel}: <area>/<name>.json only (figures: docs/img)"
        assert (REPO / "benchmarks" / rel.parts[0] / "__init__.py").is_file(), f"{rel}: no benchmarks/{rel.parts[0]}/"


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(RESULTS)) for p in FILES])
def test_results_file_follows_the_schema(path):
    m = writer.FILE_NAME.fullmatch(path.name)
    assert m, f"{path.name}: not <name>_<device>_<YYYY-MM-DD>[-N].json"
    d = json.loads(path.read_text())
    assert isinstance(d, dict) and set(d) - {"notes"} == set(writer.KEYS), sorted(d)
    assert d["schema"] == "dsv3-bench/1"
    assert isinstance(d["script"], str) and (REPO / d["script"]).is_file(), d["script"]
    assert Path(d["script"]).parent.name == path.parent.name  # written by a script of its area
    assert m["name"].split("-")[0] == Path(d["script"]).stem  # and named after it
    saved = datetime.fromisoformat(d["date"])
    assert saved.date().isoformat() == m["date"]
    assert isinstance(d["device"], str) and writer.device_slug(d["device"]) == m["device"]
    assert isinstance(d["torch"], str) and d["torch"]
    assert d["git_sha"] == "unknown" or SHA.fullmatch(d["git_sha"]), d["git_sha"]
    assert isinstance(d["args"], dict)
    assert d["results"] not in (None, {}, [])
    assert isinstance(d.get("notes", ""), str)


def test_every_results_file_is_named_by_a_doc_page():
    pages = "".join(p.read_text() for p in [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))])
    unnamed = [str(p.relative_to(RESULTS)) for p in FILES if p.name not in pages]
    assert not unnamed, f"results no page of docs/ or README.md names: {unnamed}"


def test_device_slug_names_the_card():
    assert writer.device_slug("NVIDIA H100 80GB HBM3") == "h100"
    assert writer.device_slug("NVIDIA H200") == "h200"
    assert writer.device_slug("NVIDIA A100-SXM4-80GB") == "a100"
    assert writer.device_slug("8 x NVIDIA H100 80GB HBM3") == "8xh100"
    assert writer.device_slug("cpu: AMD EPYC, 2 cores") == "cpu"
    assert writer.device_slug("cpu: 2 cores") == "cpu"


@pytest.fixture
def out(tmp_path, monkeypatch):
    """The writer pointed at a temporary directory, as a smoke run does, and a script of area "demo"."""
    monkeypatch.setenv("DSV3_BENCH_OUT", str(tmp_path / "out"))
    script = tmp_path / "benchmarks" / "demo" / "thing.py"
    script.parent.mkdir(parents=True)
    script.write_text("")
    return tmp_path / "out", script


def test_save_writes_the_schema_under_a_dated_device_name(out):
    root, script = out
    path = writer.save(str(script), {"steps": 3, "out": Path("/x")}, {"tokens_per_s": 1.5}, tag="Tiny 1")
    today = date.today().isoformat()
    slug = writer.device_slug(writer.device_name())
    assert path == root / "demo" / f"thing-tiny-1_{slug}_{today}.json"
    d = json.loads(path.read_text())
    assert list(d) == list(writer.KEYS)  # no notes given: none written
    assert d["schema"] == "dsv3-bench/1" and d["results"] == {"tokens_per_s": 1.5}
    assert d["args"] == {"steps": 3, "out": "/x"} and d["date"].startswith(today)
    assert d["torch"] == torch.__version__ and d["device"] == writer.device_name()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    if head.returncode == 0 and not os.environ.get("DSV3_GIT_SHA"):
        assert d["git_sha"] == head.stdout.strip()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_a_second_run_the_same_day_gets_2_then_3(out):
    _, script = out
    paths = [writer.save(str(script), {}, {"run": i}, device="NVIDIA H100 80GB HBM3", notes="n") for i in range(3)]
    stem = f"thing_h100_{date.today().isoformat()}"
    assert [p.name for p in paths] == [f"{stem}.json", f"{stem}-2.json", f"{stem}-3.json"]
    assert [json.loads(p.read_text())["results"]["run"] for p in paths] == [0, 1, 2]  # none overwritten
    assert all(writer.FILE_NAME.fullmatch(p.name) for p in paths)
    assert json.loads(paths[0].read_text())["notes"] == "n"


def test_update_rewrites_the_same_file_keeping_the_runs_date(out):
    _, script = out
    path = writer.save(str(script), {}, {"models": 1})
    first = json.loads(path.read_text())
    first["date"] = "2026-01-31T23:59:59+00:00"  # as if the run had started before midnight
    path.write_text(json.dumps(first))
    assert writer.save(str(script), {}, {"models": 2}, update=path) == path
    d = json.loads(path.read_text())
    assert d["results"] == {"models": 2} and d["date"] == first["date"] and len(list(path.parent.iterdir())) == 1


def test_a_failed_write_leaves_the_old_file_and_no_temporary(out, monkeypatch):
    _, script = out
    path = writer.save(str(script), {}, {"v": "old"})

    def no_space(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(writer.os, "fsync", no_space)
    with pytest.raises(OSError):
        writer.save(str(script), {}, {"v": "new"}, update=path)
    with pytest.raises(OSError):
        writer.save(str(script), {}, {"v": "another run"})
    assert json.loads(path.read_text())["results"] == {"v": "old"}
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_figure_goes_to_images_under_the_same_stem(out, tmp_path):
    root, script = out
    png = tmp_path / "plot.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n-a-figure")
    path = writer.save(str(script), {}, {"a": 1}, figure=png)
    assert (root / "img" / "demo" / f"{path.stem}.png").read_bytes() == png.read_bytes()


def test_git_sha_from_the_environment_or_unknown_without_git(monkeypatch, tmp_path):
    monkeypatch.setenv("DSV3_GIT_SHA", "0123456789abcdef0123456789abcdef01234567")
    assert writer.git_sha() == "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.delenv("DSV3_GIT_SHA")
    monkeypatch.setattr(writer, "REPO", tmp_path)  # a copy of the tree without .git, as on the GPU machine
    assert writer.git_sha() == "unknown"
