"""Storage faults as a user meets them: a real full disk (a small tmpfs, real ENOSPC, not a file-size limit),
files that must agree replaced one after the other, and two writers of one output at the same time.

Each full-disk case runs the command in a child process, so that a crash of the HDF5 library (a segmentation
fault, as before issue 37) fails the test instead of the test run. Mounting needs root (as in CI); elsewhere the
cases skip with the reason.
"""

import hashlib
import os
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
