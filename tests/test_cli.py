"""The `ntkmtl` command end to end on a tiny setting, and its one-line argument errors."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

# The compare runs write plots and use the MultiDigits data (sklearn's digits).
matplotlib = pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")
import matplotlib.image  # noqa: E402

from ntkmtl_jax import cli, training

TINY = ["--option", "num_train=256", "--option", "num_test=64", "--option", "hidden=[16]",
        "--steps", "6", "--batch-size", "32", "--quiet"]


@pytest.mark.one_seed
def test_compare_end_to_end(tmp_path, capsys, seed):
  data_seed = seed
  out = tmp_path / "run"
  code = cli.main(["compare", "--methods", "stl,ls,ntkmtl", "--seeds", "1", "--out", str(out),
                   "--option", f"data_seed={data_seed}"] + TINY)
  printed = capsys.readouterr().out
  assert code == 0, printed
  assert str(out) in printed and "Δm% ↓" in printed and "ntkmtl" in printed
  document = json.loads((out / "results.json").read_text())
  # STL is one run per task (3) plus LS and NTKMTL.
  assert [r["method"] for r in document["runs"]] == ["stl"] * 3 + ["ls", "ntkmtl"]
  assert all(r["steps"] == 6 and not r["interrupted"] for r in document["runs"])
  history = document["runs"][4]["history"]
  assert np.asarray(history["losses"]).shape == (6, 3)
  assert history["eigen_source"] == "step" and np.asarray(history["eigenvalues"]).shape == (6, 3)
  assert document["runs"][3]["history"]["eigen_source"] == "probe"
  # Delta m % of LS, recomputed from the per-run metrics in results.json.
  names, higher = document["benchmark"]["metric_names"], document["benchmark"]["higher_is_better"]
  baseline = np.array([document["runs"][t]["metrics"][names[t]] for t in range(3)])
  ls = np.array([document["runs"][3]["metrics"][n] for n in names])
  sign = np.where(higher, -1.0, 1.0)
  expected = 100 * np.mean(sign * (ls - baseline) / baseline)
  with open(out / "results.csv") as f:
    rows = {r["method"]: r for r in csv.DictReader(f)}
  assert set(rows) == {"stl", "ls", "ntkmtl"}
  assert float(rows["ls"]["delta_m_mean"]) == pytest.approx(expected, rel=1e-9, abs=1e-9)
  assert float(rows["stl"]["delta_m_mean"]) == 0.0
  for name in ("training_curves.png", "task_weights.png", "eigenvalues.png"):
    image = matplotlib.image.imread(out / name)
    assert image.ndim == 3 and min(image.shape[:2]) > 100


def test_train_and_spectrum(tmp_path, capsys):
  out = tmp_path / "spec"
  assert cli.main(["spectrum", "--benchmark", "sines", "--chunks", "4", "--batch-size", "16",
                   "--out", str(out), "--quiet"]) == 0
  printed = capsys.readouterr().out
  assert "lambda_i" in printed and "sine2" in printed
  spectrum = json.loads((out / "spectrum.json").read_text())
  blocks = np.asarray(spectrum["blocks"])  # (k, k, n, n)
  expected = [np.linalg.eigvalsh(blocks[i, i])[-1] for i in range(3)]
  np.testing.assert_allclose(spectrum["eigenvalues"], expected, rtol=1e-4)
  lam = np.asarray(spectrum["eigenvalues"])
  np.testing.assert_allclose(spectrum["weights"], np.sqrt(lam.sum() / lam), rtol=1e-4)

  out = tmp_path / "train"
  assert cli.main(["train", "--benchmark", "sines", "--method", "ntkmtl-sr", "--hp",
                   "num_chunks=2", "--out", str(out), "--no-plots", "--steps", "4",
                   "--batch-size", "16", "--quiet"]) == 0
  document = json.loads((out / "results.json").read_text())
  assert document["runs"][0]["method"] == "ntkmtl_sr"
  assert document["runs"][0]["hparams"] == {"num_chunks": 2}
  assert not any(name.endswith(".png") for name in os.listdir(out))


@pytest.mark.parametrize("argv, message", [
    (["compare", "--methods", "ls,no_such_method"], "unknown method 'no_such_method'"),
    (["train", "--method", "bogus"], "unknown method 'bogus'"),
    (["compare", "--benchmark", "no_such_benchmark"], "unknown benchmark 'no_such_benchmark'"),
    (["compare", "--seeds", "0"], "--seeds"),
])
def test_bad_arguments_give_one_line_and_exit_2(tmp_path, capsys, argv, message):
  code = cli.main(argv + ["--out", str(tmp_path / "x")])
  err = capsys.readouterr().err
  assert code == 2
  assert message in err and len(err.strip().splitlines()) == 1, err


def test_non_writable_output_directory(tmp_path, capsys):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  code = cli.main(["compare", "--methods", "ls", "--out", str(blocker / "sub")] + TINY)
  err = capsys.readouterr().err
  assert code == 2 and "not writable" in err and len(err.strip().splitlines()) == 1, err


def test_argparse_errors_are_one_line(capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["compare", "--no-such-flag"])
  err = capsys.readouterr().err
  assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1, err


def test_help_runs_as_a_program():
  result = subprocess.run([sys.executable, "-m", "ntkmtl_jax.cli", "compare", "--help"],
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0
  assert "Delta m" in result.stdout and "--methods" in result.stdout


def test_ctrl_c_keeps_finished_runs(tmp_path, monkeypatch, capsys):
  calls = []
  real_fit = training.fit

  def fit_then_interrupt(bench, config, *args, **kwargs):
    calls.append(config.hparams)
    if len(calls) == 2:
      raise KeyboardInterrupt
    return real_fit(bench, config, *args, **kwargs)

  monkeypatch.setattr(training, "fit", fit_then_interrupt)
  out = tmp_path / "interrupted"
  code = cli.main(["compare", "--methods", "ls,ntkmtl", "--seeds", "2", "--out", str(out)]
                  + TINY)
  captured = capsys.readouterr()
  assert code == 130 and "Interrupted" in captured.err
  document = json.loads((out / "results.json").read_text())
  assert document["interrupted"] and [r["method"] for r in document["runs"]] == ["ls"]
  assert (out / "results.csv").exists()


def test_fit_stops_cleanly_on_keyboard_interrupt():
  import dataclasses
  from ntkmtl_jax import benchmarks
  from ntkmtl_jax.data import Split
  bench = benchmarks.get_benchmark("sines", num_train=64)
  taken = []

  def take(indices, rng):
    if rng is not None:  # a training batch (the parameter initialisation reads one without)
      taken.append(len(indices))
      if len(taken) == 6:
        raise KeyboardInterrupt
    return bench.train.take(indices, rng)

  interrupted = dataclasses.replace(bench, train=Split(len(bench.train), take))
  result = training.fit(interrupted, bench.config.replace(batch_size=16, max_steps=50),
                        progress=False)
  # Five batches, five steps; the sixth batch was interrupted while being read.
  assert result.interrupted and result.steps == 5
  assert result.history.losses.shape == (5, 3) and set(result.metrics) == set(bench.metric_names)


def test_fit_calls_the_callback_after_every_step():
  from ntkmtl_jax import benchmarks
  bench = benchmarks.get_benchmark("sines", num_train=64)
  seen = []

  def callback(t, state, metrics):
    seen.append((t, int(state.step), np.asarray(metrics["losses"])))

  result = training.fit(bench, bench.config.replace(method="ntkmtl", batch_size=16,
                                                    max_steps=4), progress=False,
                        callback=callback)
  assert [t for t, _, _ in seen] == [1, 2, 3, 4]
  assert [s for _, s, _ in seen] == [1, 2, 3, 4]  # called after the step, with its state
  np.testing.assert_allclose(np.stack([l for _, _, l in seen]), result.history.losses,
                             rtol=1e-6)


def test_missing_paper_dataset_says_what_to_do(tmp_path, capsys):
  code = cli.main(["train", "--benchmark", "celeba", "--option", f"data_dir={tmp_path}",
                   "--quiet", "--out", str(tmp_path / "out")])
  err = capsys.readouterr().err
  assert code == 2
  assert "celeb_a" in err and "not found" in err and "--option data_dir=DIR" in err
  assert "Traceback" not in err


def test_train_resumes_and_refuses_to_overwrite(tmp_path, capsys):
  out = str(tmp_path / "run")
  args = ["train", "--benchmark", "sines", "--option", "num_train=64", "--method", "ls",
          "--batch-size", "16", "--no-plots", "--quiet", "--out", out]
  assert cli.main(args + ["--steps", "3"]) == 0
  capsys.readouterr()
  assert cli.main(args + ["--steps", "6"]) == 2  # a run is there: say what to do
  err = capsys.readouterr().err
  assert "--resume" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
  assert cli.main(args + ["--steps", "6", "--resume"]) == 0
  assert "Resuming sines/ls at epoch 0, batch 3 (step 3)" in capsys.readouterr().out
  document = json.loads((tmp_path / "run" / "results.json").read_text())
  assert document["runs"][0]["steps"] == 6
  assert np.asarray(document["runs"][0]["history"]["losses"]).shape == (6, 3)
  assert cli.main(args + ["--steps", "6", "--overwrite"]) == 2  # finished: kept
  err = capsys.readouterr().err
  assert "refusing to overwrite" in err and len(err.strip().splitlines()) == 1
