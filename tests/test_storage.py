"""Storage faults as a user meets them: a real full disk (a small tmpfs, real ENOSPC, not a file-size limit),
files that must agree replaced one after the other, and two writers of one output at the same time.

Each full-disk case runs the command in a child process, so that a crash of the HDF5 library (a segmentation
fault, as before issue 37) fails the test instead of the test run. Mounting needs root (as in CI); elsewhere the
cases skip with the reason.
"""

import hashlib
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from ldm_fixtures import small_filesystem

from mindvis.config import dump_config, validate
from mindvis.errors import MindvisError

SUBJECT = "sub-01"


def matrix_file(path, n_train, n_test, n_voxels, seed=0):
    rng = np.random.default_rng(seed)
    np.savez(path, train_fmri=rng.normal(size=(n_train, n_voxels)), test_fmri=rng.normal(size=(n_test, n_voxels)),
             train_images=rng.integers(0, 256, (n_train, 8, 8), dtype=np.uint8),
             test_images=np.repeat(rng.integers(0, 256, (n_test // 2, 8, 8), dtype=np.uint8), 2, axis=0),
             train_labels=np.arange(n_train) % 3, test_labels=np.repeat(np.arange(n_test // 2) % 3, 2))
    return path


def matrix_config(path):
    return validate({"seed": 3, "stimuli": {"image_size": 8, "channels": 1}, "preprocess": {"val_fraction": 0.25},
                     "data": {"source": "matrix", "trials_per_block": 10,
                              "matrix": {"path": str(path), "keys": {"train_labels": "train_labels",
                                                                     "test_labels": "test_labels"}}}})


def snapshot(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file() and p.name != "filler"}


def hidden(folder):
    return sorted(str(p) for p in Path(folder).rglob(".*"))


def run_python(code, cwd):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=cwd, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})


def one_error_line(result):
    assert result.returncode == 2, f"rc {result.returncode}: {result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr and "Segmentation" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("mindvis: error: ")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


@pytest.fixture
def previous_pair(tmp_path):
    """A small earlier conversion (the outputs a failed one must leave whole), written outside the small disk."""
    from mindvis.data.sources import convert_subject

    config = matrix_config(matrix_file(tmp_path / "small.npz", 20, 4, 6))
    out = tmp_path / "previous"
    convert_subject(config, SUBJECT, out / "responses.h5", out / "stimuli.h5")
    return out


@pytest.mark.parametrize("where", ["before-writing", "inside-the-hdf5-write"])
def test_convert_on_a_real_full_disk_is_one_line_and_keeps_the_previous_pair(tmp_path, previous_pair, where):
    """``before-writing``: the command line, whose space check refuses before either file is begun;
    ``inside-the-hdf5-write``: the check switched off, so ENOSPC strikes inside responses.h5's write."""
    big = matrix_file(tmp_path / "big.npz", 200, 20, 2000)
    config = tmp_path / "config.yaml"
    dump_config(matrix_config(big), config)
    with small_filesystem(tmp_path / "disk", "512k") as disk:
        out = disk / "results" / SUBJECT
        out.mkdir(parents=True)
        for name in ("responses.h5", "stimuli.h5"):
            (out / name).write_bytes((previous_pair / name).read_bytes())
        before = snapshot(disk)
        if where == "before-writing":
            result = subprocess.run([sys.executable, "-m", "mindvis.cli", "convert", "--config", str(config),
                                     "--subject", SUBJECT, "--out", str(out / "responses.h5"), "--stimuli-out",
                                     str(out / "stimuli.h5")], capture_output=True, text=True, check=False)
        else:
            result = run_python(f"""
                import sys
                from mindvis.config import load_config
                from mindvis.data.sources import common, convert_subject
                from mindvis.errors import MindvisError
                common.check_free_space = lambda *args, **kwargs: None
                try:
                    convert_subject(load_config({str(config)!r}), {SUBJECT!r}, {str(out / 'responses.h5')!r},
                                    {str(out / 'stimuli.h5')!r})
                except MindvisError as error:
                    print(f"mindvis: error: {{error}}", file=sys.stderr)
                    sys.exit(2)
                """, tmp_path)
        line = one_error_line(result)
        assert "disk is full" in line and "Fix: free space" in line and str(out / "responses.h5") in line, line
        assert snapshot(disk) == before, "a failed convert changed the previous responses.h5 / stimuli.h5"
        assert not hidden(disk), "temporaries left on the full disk"


def test_a_pair_split_between_two_convert_runs_is_refused_where_they_are_read_together(tmp_path, previous_pair):
    """convert renames responses.h5 and stimuli.h5 one after the other; a kill between leaves one of each run."""
    from mindvis.data.responses import check_stimuli_pair, load_responses
    from mindvis.data.sources import convert_subject

    other = tmp_path / "other"
    convert_subject(matrix_config(matrix_file(tmp_path / "other.npz", 20, 4, 6, seed=1)), SUBJECT,
                    other / "responses.h5", other / "stimuli.h5")
    data = load_responses(previous_pair / "responses.h5")
    check_stimuli_pair(data, previous_pair / "responses.h5", previous_pair / "stimuli.h5")  # its own pair
    with pytest.raises(MindvisError) as caught:
        check_stimuli_pair(data, previous_pair / "responses.h5", other / "stimuli.h5")
    text = str(caught.value)
    assert "\n" not in text and caught.value.path == other / "stimuli.h5" and "rerun convert" in caught.value.fix
    assert str(previous_pair / "responses.h5") in text


def test_hdf5_writers_meet_a_real_full_disk_with_one_line_and_no_crash(tmp_path):
    """samples.h5 and edits.h5 writers (HDF5 in memory, one write at close) on a disk with 16 KB free."""
    with small_filesystem(tmp_path / "disk", "256k") as disk:
        (disk / "samples.h5").write_bytes(b"the previous run's samples")
        result = run_python(f"""
            import sys
            import numpy as np
            from mindvis.errors import MindvisError
            from mindvis.generate.writing import write_samples_h5
            from ldm_fixtures import fill_filesystem
            fill_filesystem({str(disk)!r}, 16 << 10)
            rng = np.random.default_rng(0)
            try:
                write_samples_h5({str(disk / 'samples.h5')!r}, samples=rng.integers(0, 256, (20, 4, 32, 32, 3)),
                                 true_images=rng.integers(0, 256, (20, 32, 32, 3)), stimulus_id=[str(i) for i in
                                 range(20)], label=np.zeros(20), seeds=np.zeros((20, 4)), attrs={{"subject": "sub-01"}})
            except MindvisError as error:
                print(f"mindvis: error: {{error}}", file=sys.stderr)
                sys.exit(2)
            """, Path(__file__).parent)
        line = one_error_line(result)
        assert "disk is full" in line and str(disk / "samples.h5") in line, line
        assert (disk / "samples.h5").read_bytes() == b"the previous run's samples"
        assert not hidden(disk)


def test_two_summary_writers_of_one_csv_do_not_delete_each_others_temporary(tmp_path):
    """A writer removes only temporaries of writers that are gone: a live one's stays (its pid is in its name)."""
    from mindvis.utils.io import atomic_path

    target = tmp_path / "summary.csv"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".summary.csv.{sleeper.pid}-abcdefgh.tmp.csv"
        live.write_text("another writer's table, being written")
        dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                                  text=True, check=False).stdout.strip()
        stale = tmp_path / f".summary.csv.{dead_pid}-ijklmnop.tmp.csv"
        stale.write_text("a killed writer's table")
        legacy = tmp_path / ".summary.csv.qrstuvwx.tmp.csv"  # written before writers named themselves
        legacy.write_text("an older version's leftover")
        with atomic_path(target) as tmp:
            Path(tmp).write_text("subject,dcldm/ssim\nmean,0.5\n")
        assert target.read_text().startswith("subject") and live.exists()
        assert not stale.exists() and not legacy.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


# -- the other HDF5 writers: resting-state runs, the merged image corpus ------------------------------------

def _write_rest_call(path, tmp_path):
    return f"""
        rng = np.random.default_rng(0)
        write_rest({str(path)!r}, fmri=rng.normal(size=(400, 600)).astype(np.float32), run=np.repeat([1, 2], 200),
                   voxel_ijk=np.stack(np.unravel_index(np.arange(600), (10, 12, 5)), axis=1), affine=np.eye(4),
                   volume_shape=(10, 12, 5), voxel_roi=["V1"] * 600, tr=2.0, subject="sub-01", preprocess_config={{}},
                   config={{}}, input_hashes={{}})
        """


def _merge_call(path, tmp_path):
    """Two subjects' stimulus files (written outside the small disk: 106 KB merged, 1.7 MB expected uncompressed)."""
    from ldm_fixtures import write_synthetic_stimuli

    stimuli = [tmp_path / f"sub-0{seed}-stimuli.h5" for seed in (1, 2)]
    for seed, path_in in enumerate(stimuli, start=1):
        write_synthetic_stimuli(path_in, size=64, seed=seed)
    return f"merge_stimulus_files({[str(p) for p in stimuli]!r}, {str(path)!r})"


@pytest.mark.parametrize("writer, name", [(_write_rest_call, "rest.h5"), (_merge_call, "image_corpus.h5")],
                         ids=["rest", "corpus"])
@pytest.mark.parametrize("where", ["before-writing", "inside-the-hdf5-write"])
def test_rest_and_corpus_writers_meet_a_real_full_disk_with_one_line_and_no_crash(tmp_path, writer, name, where):
    """``rest.h5`` (write_rest) and the merged image corpus (merge_stimulus_files), built in memory through
    hdf5_for_writing, on a disk with 64 KB free. ``before-writing``: the size check refuses before anything is
    built; ``inside-the-hdf5-write``: the check switched off, so ENOSPC strikes in HDF5's one write at close."""
    with small_filesystem(tmp_path / "disk", "512k") as disk:
        target = disk / name
        target.write_bytes(b"the previous run's file")
        call = textwrap.dedent(writer(target, tmp_path))
        switch_off = "io._free_space_shortfall = lambda *args: None\n" if where == "inside-the-hdf5-write" else ""
        result = run_python("import sys\nimport numpy as np\nfrom ldm_fixtures import fill_filesystem\n"
                            "from mindvis.data.responses import write_rest\n"
                            "from mindvis.data.sources.corpus import merge_stimulus_files\n"
                            "from mindvis.errors import MindvisError\nfrom mindvis.utils import io\n"
                            f"{switch_off}fill_filesystem({str(disk)!r}, 64 << 10)\n"
                            f"try:\n{textwrap.indent(call, '    ')}\n"
                            "except MindvisError as error:\n"
                            "    print(f'mindvis: error: {error}', file=sys.stderr)\n"
                            "    sys.exit(2)\n", Path(__file__).parent)
        line = one_error_line(result)
        assert "disk is full" in line and f"{target}:" in line and "Fix: free space" in line, line
        assert ("MB needed" in line) == (where == "before-writing"), line
        assert target.read_bytes() == b"the previous run's file"
        assert not hidden(disk), "temporaries left on the full disk"


def test_hdf5_for_writing_streams_a_file_too_large_for_memory_after_the_size_check(tmp_path, monkeypatch):
    """Above HDF5_IN_MEMORY_BYTES the file is written as it is filled (no core driver), still refused up front when
    the disk lacks the room."""
    import h5py

    from mindvis.utils import io

    monkeypatch.setattr(io, "HDF5_IN_MEMORY_BYTES", 1000)
    with io.atomic_path(tmp_path / "big.h5") as tmp, io.hdf5_for_writing(tmp, expected_bytes=io.hdf5_bytes(
            np.zeros(4000, np.uint8))) as handle:
        assert handle.driver != "core"
        handle.create_dataset("x", data=np.arange(4000, dtype=np.uint8))
    with h5py.File(tmp_path / "big.h5", "r") as handle:
        assert np.array_equal(handle["x"][()], np.arange(4000, dtype=np.uint8))
    monkeypatch.setattr(io.shutil, "disk_usage", lambda folder: type("Usage", (), {"free": 10})())
    with pytest.raises(MindvisError) as caught, io.atomic_path(tmp_path / "big.h5") as tmp, \
            io.hdf5_for_writing(tmp, expected_bytes=5000):
        raise AssertionError("built although it cannot fit")
    assert "disk is full" in str(caught.value) and caught.value.path == tmp_path / "big.h5"
    assert "\n" not in str(caught.value) and sorted(p.name for p in tmp_path.iterdir()) == ["big.h5"]


# -- folders replaced as a unit: the report's figures, evaluate's folder ---------------------------------------

@pytest.fixture
def previous_report(tmp_path):
    """A report built from the contract fixtures of tests/test_report.py (outside the small disk), its inputs, and
    the call that builds it into a given results folder."""
    from test_report import make_report_inputs

    from mindvis.report.html import build_report

    inputs = make_report_inputs(tmp_path / "inputs", np.random.default_rng(0))

    def build(results):
        return build_report(inputs["metrics_path"], results / "report.html",
                            config={"experiment": "x", "generate": {"attention_stimuli": 2}},
                            samples=inputs["samples"], responses=inputs["responses"], curves=inputs["curves"],
                            figures_dir=results / "report")
    info = build(tmp_path / "earlier")
    return {"build": build, "bytes": info["bytes"], "earlier": tmp_path / "earlier"}


@pytest.mark.parametrize("room", ["none", "the-html-only"])
def test_a_report_on_a_real_full_disk_keeps_the_previous_report_and_figures(tmp_path, previous_report, room):
    """``none``: report.html itself cannot be written; ``the-html-only``: it can, the figures folder cannot (the
    html is renamed only after the folder is swapped in, so neither changes)."""
    from ldm_fixtures import fill_filesystem

    with small_filesystem(tmp_path / "disk", "4m") as disk:
        results = disk / "results" / SUBJECT
        results.mkdir(parents=True)
        (results / "report.html").write_bytes((previous_report["earlier"] / "report.html").read_bytes())
        (results / "report").mkdir()
        for png in (previous_report["earlier"] / "report").iterdir():
            (results / "report" / png.name).write_bytes(png.read_bytes())
        before = snapshot(disk)
        fill_filesystem(disk, 16 << 10 if room == "none" else previous_report["bytes"] + (48 << 10))
        with pytest.raises(MindvisError) as caught:
            previous_report["build"](results)
        text = str(caught.value)
        assert "\n" not in text and "disk is full" in text and "Fix: free space" in text, text
        named = results / "report.html" if room == "none" else results / "report"
        assert caught.value.path == named or caught.value.path.parent == named, text
        assert snapshot(disk) == before, "a failed report changed the previous report.html or figures"
        assert not hidden(disk), "temporaries left on the full disk"
        (disk / "filler").unlink()
        stamps = [(results / name).stat().st_mtime_ns for name in ("report.html", "report/grid.png")]
        previous_report["build"](results)  # with room again, the rerun replaces both
        assert all(stamp != (results / name).stat().st_mtime_ns
                   for stamp, name in zip(stamps, ("report.html", "report/grid.png")))
        assert not hidden(disk) and snapshot(disk).keys() == before.keys()


def test_a_report_figures_folder_is_replaced_as_a_unit(tmp_path, previous_report):
    """A figure that no longer exists in the previous folder's place, and no figure of the previous run left."""
    results = tmp_path / "results"
    previous_report["build"](results)
    (results / "report" / "grid.png").write_bytes(b"the previous run's grid")
    (results / "report" / ".grid.png.1-abcdefgh.tmp.png").write_bytes(b"a hidden temporary is no user file")
    previous_report["build"](results)
    assert (results / "report" / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not hidden(results)


# -- two writers of one output folder at the same time -----------------------------------------------------

def _write_whole(folder, text="writer B"):
    from mindvis.utils.io import atomic_folder

    with atomic_folder(folder) as staging:
        (staging / "summary.json").write_text(text)


def _race(monkeypatch, folder, cut_in, writer_b=_write_whole):
    """Writer A writes ``folder`` through atomic_folder in a thread; just before A's rename number ``cut_in`` (0: its
    first) it waits while ``writer_b(folder)`` runs in this thread. Returns A's exception (or None) and A's renames."""
    import threading

    from mindvis.utils import io

    original, calls, b_may_start, b_done, outcome = os.replace, [], threading.Event(), threading.Event(), {}

    def replace(src, dst):
        if threading.current_thread().name == "writer-a":
            calls.append((src, dst))
            if len(calls) == cut_in + 1:
                b_may_start.set()
                b_done.wait(30)
        return original(src, dst)

    def writer_a():
        try:
            _write_whole(folder, "writer A")
        except Exception as error:  # noqa: BLE001 (handed to the test)
            outcome["error"] = error

    monkeypatch.setattr(io.os, "replace", replace)
    thread = threading.Thread(target=writer_a, name="writer-a")
    thread.start()
    try:
        if b_may_start.wait(30):
            writer_b(folder)
    finally:
        b_done.set()
        thread.join(30)
    return outcome.get("error"), calls


def _b_holds_it_aside(holding):
    """Writer B half-way through its swap: the previous folder moved aside, its own not yet renamed in."""
    def writer_b(folder):
        holding.mkdir()
        os.rename(folder, holding / "previous")
    return writer_b


@pytest.mark.parametrize("previous, cut_in, b_finishes_later", [(False, 0, False), (True, 1, False), (True, 0, True)],
                         ids=["b-creates-it-first", "b-swaps-in-while-a-holds-the-previous-aside",
                              "b-holds-the-previous-aside-when-a-moves-it"])
def test_two_writers_swapping_one_folder_at_once_the_loser_fails_in_one_line(tmp_path, monkeypatch, previous, cut_in,
                                                                              b_finishes_later):
    """The writer whose rename the other's swap overtook gets the one-line conflict error naming the folder, never a
    raw OSError (ENOTEMPTY, ENOENT); the other's folder stays whole, and the loser leaves no temporary folder."""
    folder, holding = tmp_path / "samples", tmp_path / "b-holding"
    if previous:
        folder.mkdir()
        (folder / "summary.json").write_text("the previous run")
    error, calls = _race(monkeypatch, folder, cut_in, _b_holds_it_aside(holding) if b_finishes_later else _write_whole)
    assert len(calls) > cut_in, "writer A did not reach the rename the test cuts in at"
    assert isinstance(error, MindvisError), repr(error)
    text = str(error)
    assert "\n" not in text and error.path == folder and "another writer replaced this folder" in text, text
    assert text.endswith(f"Fix: {error.fix}") and "one writer of a folder at a time" in error.fix
    if b_finishes_later:  # B's own rename, after A gave up
        shutil.rmtree(holding)
        _write_whole(folder)
    assert (folder / "summary.json").read_text() == "writer B"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples"]


def test_a_writer_that_follows_another_whole_replaces_its_folder_without_error(tmp_path, monkeypatch):
    """B writes the folder whole while A waits to move the previous one aside: one after the other, no conflict, and
    A's folder, the last, is the one in place."""
    folder = tmp_path / "samples"
    folder.mkdir()
    (folder / "summary.json").write_text("the previous run")
    error, calls = _race(monkeypatch, folder, 0)
    assert error is None and len(calls) == 2
    assert (folder / "summary.json").read_text() == "writer A"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples"]
