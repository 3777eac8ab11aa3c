"""The `ntkmtl` command end to end on a tiny setting, and its one-line argument errors."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

# The compare runs write plots and use the MultiDigits data (sklearn's digits).
pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")
import matplotlib.image  # noqa: E402

from ntkmtl_jax import cli, loop

TINY = [
  "--option",
  "num_train=256",
  "--option",
  "num_test=64",
  "--option",
  "hidden=[16]",
  "--steps",
  "6",
  "--batch-size",
  "32",
  "--quiet",
]


def _fails_with(capsys, argv):
  """Runs `ntkmtl ARGV` in process, asserts exit status 2; returns what it wrote to stderr."""
  code = cli.main(argv)
  err = capsys.readouterr().err
  assert code == 2, err
  return err


def _fails_with_one_line(capsys, argv, *messages):
  """`ntkmtl ARGV` exits 2 with one line on stderr that says each of `messages`."""
  err = _fails_with(capsys, argv)
  assert all(message in err for message in messages), err
  assert len(err.strip().splitlines()) == 1, err


@pytest.mark.one_seed
def test_compare_end_to_end(tmp_path, capsys, seed):
  data_seed = seed
  out = tmp_path / "run"
  code = cli.main(
    [
      "compare",
      "--methods",
      "stl,ls,ntkmtl",
      "--seeds",
      "0",
      "--workdir",
      str(out),
      "--option",
      f"data_seed={data_seed}",
    ]
    + TINY
  )
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
  assert (
    cli.main(
      [
        "spectrum",
        "--benchmark",
        "sines",
        "--chunks",
        "4",
        "--batch-size",
        "16",
        "--workdir",
        str(out),
        "--quiet",
      ]
    )
    == 0
  )
  printed = capsys.readouterr().out
  assert "lambda_i" in printed and "sine2" in printed
  spectrum = json.loads((out / "spectrum.json").read_text())
  blocks = np.asarray(spectrum["blocks"])  # (k, k, n, n)
  expected = [np.linalg.eigvalsh(blocks[i, i])[-1] for i in range(3)]
  np.testing.assert_allclose(spectrum["eigenvalues"], expected, rtol=1e-4)
  lam = np.asarray(spectrum["eigenvalues"])
  np.testing.assert_allclose(spectrum["weights"], np.sqrt(lam.sum() / lam), rtol=1e-4)

  out = tmp_path / "train"
  assert (
    cli.main(
      [
        "train",
        "--benchmark",
        "sines",
        "--method",
        "ntkmtl-sr",
        "--hp",
        "num_chunks=2",
        "--workdir",
        str(out),
        "--no-plots",
        "--steps",
        "4",
        "--batch-size",
        "16",
        "--quiet",
      ]
    )
    == 0
  )
  document = json.loads((out / "results.json").read_text())
  assert document["runs"][0]["method"] == "ntkmtl_sr"
  assert document["runs"][0]["hparams"] == {"num_chunks": 2}
  assert not any(name.endswith(".png") for name in os.listdir(out))


@pytest.mark.parametrize(
  "argv, message",
  [
    (["compare", "--methods", "ls,no_such_method"], "unknown method 'no_such_method'"),
    (["train", "--method", "bogus"], "unknown method 'bogus'"),
    (["compare", "--benchmark", "no_such_benchmark"], "unknown benchmark 'no_such_benchmark'"),
    (["compare", "--seeds", "-1"], "--seeds must list seeds >= 0"),
    (["compare", "--seeds", "3x"], "--seeds must be comma-separated integers"),
    (["train", "--preset", "huge"], "has no preset 'huge'"),
    (["train", "--protocol", "official"], "'multidigits' has no 'official' protocol"),
    (["compare", "--benchmark", "multimnist", "--protocol", "official"], "no 'official'"),
    (["train", "--benchmark", "mt10", "--protocol", "official"], "--protocol does not apply"),
  ],
)
def test_bad_arguments_give_one_line_and_exit_2(tmp_path, capsys, argv, message):
  _fails_with_one_line(capsys, argv + ["--workdir", str(tmp_path / "x")], message)


SINES = [
  "--benchmark",
  "sines",
  "--option",
  "num_train=64",
  "--option",
  "num_test=32",
  "--batch-size",
  "16",
  "--steps",
  "2",
  "--no-plots",
  "--quiet",
]


@pytest.mark.parametrize(
  "argv, message",
  [
    (["train", "--hp", "nope=1"], "has no hyper-parameter(s) ['nope']"),
    (["train", "--hp", "exponent=abc"], "exponent must be a positive finite number"),
    (["train", "--hp", "exponent=-1"], "exponent must be a positive finite number"),
    (["train", "--method", "ntkmtl_sr", "--hp", "exponent=-1"], "exponent must be a positive"),
    (["train", "--hp", "num_chunks=0"], "num_chunks must be a positive integer"),
    (["train", "--hp", "num_chunks=3"], "does not divide the batch size 16"),
    (["train", "--method", "stl", "--hp", "task=7"], "task must be in [0, 3)"),
    (["train", "--method", "cagrad", "--hp", "c=nan"], "c=nan must be finite"),
    (["train", "--seed", "-1"], "--seed must be >= 0"),
    (["train", "--option", "data_dir=/data"], "--data-dir DIR, not as an --option"),
    (["train", "--option", "no_such_option=1"], "bad option for benchmark 'sines'"),
    (
      ["train", "--option", "hidden=(8,)"],
      "--option hidden takes a JSON list such as hidden=[64, 64]",
    ),
    (["train", "--lr", "nan"], "--lr finite"),
    (["train", "--lr", "inf"], "--lr finite"),
    (["train", "--max-grad-norm", "nan"], "--max-grad-norm must be a finite norm"),
    (["train", "--max-grad-norm", "-1"], "--max-grad-norm must be a finite norm"),
    (["train", "--batch-size", "100000"], "larger than the training split"),
    (["train", "--option", "imbalance=0.5"], "must be >= 1"),
    (["train", "--option", "num_tasks=0"], "num_tasks must be at least 1"),
    (
      ["compare", "--methods", "ls,ntkmtl", "--hp", "famo.gamma=0.1"],
      "--hp names famo, which is not among the methods run",
    ),
    (["compare", "--methods", ","], "no method given"),
    (["compare", "--benchmark", "mt10"], "--batch-size does not apply to mt10"),
  ],
)
def test_every_bad_argument_is_one_line_before_any_training(
  tmp_path, capsys, monkeypatch, argv, message
):
  monkeypatch.setattr(loop, "fit", lambda *a, **k: pytest.fail("training started"))
  out = tmp_path / "out"
  _fails_with_one_line(capsys, argv[:1] + SINES + argv[1:] + ["--workdir", str(out)], message)
  assert not out.exists()  # refused before the output directory was made


def test_a_run_that_skips_most_of_its_steps_exits_3(tmp_path, capsys):
  """NaN in the data: every step is skipped (non-finite losses); the table is still written,
  then one error line per such run, and exit status 3."""
  out = tmp_path / "out"
  code = cli.main(["train"] + SINES + ["--option", "noise=nan", "--workdir", str(out)])
  err = capsys.readouterr().err
  assert code == 3, err
  assert "skipped 2 of its 2 steps (non-finite losses: 2)" in err
  document = json.loads((out / "results.json").read_text())
  assert document["runs"][0]["skipped_by_cause"] == {"losses": 2, "update": 0, "state": 0}


def test_mt10_is_handed_to_its_runner(monkeypatch, tmp_path):
  """`--benchmark mt10` runs MT10's own loop with the same flags: the preset, --steps as
  MT10Config.num_train_steps, --option as its fields, --hp as the method's."""
  from ntkmtl_jax.benchmarks import mt10

  seen = []
  monkeypatch.setattr(mt10, "run", lambda *args, **kwargs: seen.append((args, kwargs)))
  code = cli.main(
    [
      "compare",
      "--benchmark",
      "mt10",
      "--methods",
      "ls,nash-mtl",
      "--seeds",
      "3,4",
      "--preset",
      "tiny",
      "--option",
      "per_task_alpha=true",
      "--steps",
      "5",
      "--hp",
      "nash_mtl.update_weights_every=2",
      "--workdir",
      str(tmp_path),
      "--quiet",
    ]
  )
  assert code == 0
  [((config, names, seeds, workdir), kwargs)] = seen
  expected = mt10.get_config("tiny").replace(num_train_steps=5, per_task_alpha=True)
  assert config.replace(method_hparams=expected.method_hparams) == expected
  assert config.method_hparams["nash_mtl"] == {"update_weights_every": 2}
  assert (names, seeds, workdir, kwargs) == (
    ["ls", "nash_mtl"],
    [3, 4],
    str(tmp_path),
    {"progress": False},
  )
  assert cli.main(["train", "--benchmark", "mt10", "--option", "no_such_field=1"]) == 2


def test_the_command_keeps_compiled_steps_for_the_next_run(tmp_path):
  """Without --no-compilation-cache the command fills the persistent cache directory."""
  cache = tmp_path / "cache"
  env = dict(os.environ, NTKMTL_CACHE_DIR=str(cache))
  env.pop("NTKMTL_NO_COMPILATION_CACHE", None)
  result = subprocess.run(
    [sys.executable, "-m", "ntkmtl_jax.cli", "train"]
    + SINES
    + ["--workdir", str(tmp_path / "out")],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr
  assert cache.is_dir() and any(cache.iterdir())


def test_non_writable_output_directory(tmp_path, capsys):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  argv = ["compare", "--methods", "ls", "--workdir", str(blocker / "sub")] + TINY
  where = f"Could not write to the output directory {blocker / 'sub'}: not a directory"
  _fails_with_one_line(capsys, argv, where)


def test_a_write_that_fails_mid_run_is_one_line_and_exit_1(tmp_path, capsys, monkeypatch):
  """A full disk while writing results.json (or a checkpoint, a plot): one line naming the path,
  the cause and the free space, exit status 1; nothing half-written is left at that path."""
  import errno

  from ntkmtl_jax import io, loop

  write_json = io.write_json

  def full_disk(path, data):  # the disk fills up after training, at results.json
    if os.path.basename(path) != "results.json":
      return write_json(path, data)
    raise io.write_error(path, OSError(errno.ENOSPC, "No space left on device"), size=1234)

  monkeypatch.setattr(loop.io, "write_json", full_disk)
  out = tmp_path / "run"
  code = cli.main(["train", *SINES, "--workdir", str(out)])
  err = capsys.readouterr().err
  assert code == 1, err
  lines = err.strip().splitlines()
  assert len(lines) == 1, err
  assert lines[0].startswith(f"ntkmtl train: error: Could not write {out}"), err
  assert "results.json: no space left on device (" in lines[0], err
  assert "free there now, 1.2 KiB to write)" in lines[0], err
  assert not list(out.rglob("results.json")) and list(out.rglob("config.json"))


@pytest.mark.parametrize(
  "argv",
  [
    ["compare", "--no-such-flag"],
    ["compare", "--seed", "1"],  # --seeds, not abbreviated
    ["train", "--seeds", "0,1"],
  ],
)
def test_argparse_errors_are_one_line(capsys, argv):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(argv)
  err = capsys.readouterr().err
  assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1, err
  assert f"unrecognized arguments: {' '.join(argv[1:])}" in err or "--no-such-flag" in err


def test_help_runs_as_a_program():
  result = subprocess.run(
    [sys.executable, "-m", "ntkmtl_jax.cli", "compare", "--help"],
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 0
  assert "Delta m" in result.stdout and "--methods" in result.stdout


def test_ctrl_c_keeps_finished_runs(tmp_path, monkeypatch, capsys):
  calls = []
  real_fit = loop.fit

  def fit_then_interrupt(bench, config, *args, **kwargs):
    calls.append(config.hparams)
    if len(calls) == 2:
      raise KeyboardInterrupt
    return real_fit(bench, config, *args, **kwargs)

  monkeypatch.setattr(loop, "fit", fit_then_interrupt)
  out = tmp_path / "interrupted"
  code = cli.main(
    ["compare", "--methods", "ls,ntkmtl", "--seeds", "0,1", "--workdir", str(out)] + TINY
  )
  captured = capsys.readouterr()
  assert code == 130 and "Interrupted" in captured.err
  document = json.loads((out / "results.json").read_text())
  assert document["interrupted"] and [r["method"] for r in document["runs"]] == ["ls"]
  assert (out / "results.csv").exists()


def test_missing_paper_dataset_says_what_to_do(tmp_path, capsys):
  argv = ["train", "--benchmark", "celeba", "--data-dir", str(tmp_path), "--quiet"]
  err = _fails_with(capsys, argv + ["--workdir", str(tmp_path / "out")])
  assert "celeb_a" in err and "not found" in err and "--data-dir DIR" in err
  assert "Traceback" not in err


def test_train_resumes_and_refuses_to_overwrite(tmp_path, capsys):
  out = str(tmp_path / "run")
  args = [
    "train",
    "--benchmark",
    "sines",
    "--option",
    "num_train=64",
    "--method",
    "ls",
    "--batch-size",
    "16",
    "--no-plots",
    "--quiet",
    "--workdir",
    out,
  ]
  assert cli.main(args + ["--steps", "3"]) == 0
  capsys.readouterr()
  # A run is there: say what to do.
  _fails_with_one_line(capsys, args + ["--steps", "6"], "--resume", "--overwrite")
  assert cli.main(args + ["--steps", "6", "--resume"]) == 0
  assert "Resuming sines/ls at epoch 0, batch 3 (step 3)" in capsys.readouterr().out
  document = json.loads((tmp_path / "run" / "results.json").read_text())
  assert document["runs"][0]["steps"] == 6
  assert np.asarray(document["runs"][0]["history"]["losses"]).shape == (6, 3)
  # Finished: kept.
  _fails_with_one_line(capsys, args + ["--steps", "6", "--overwrite"], "refusing to overwrite")


def test_no_data_directory_anywhere_is_the_same_clear_message(monkeypatch, capsys):
  """With no data_dir given and nothing prepared under tfds' default one, tfds finds the
  builder but no split (a KeyError "... has not been generated yet"): one message, exit 2."""
  tfds = pytest.importorskip("tensorflow_datasets")

  def not_generated(*args, **kwargs):
    raise KeyError(
      "Trying to access `splits['train']` but `splits` is empty. This likely "
      "indicates the dataset has not been generated yet."
    )

  monkeypatch.setattr(tfds, "data_source", not_generated)
  err = _fails_with(capsys, ["train", "--benchmark", "qm9", "--quiet", "--no-plots"])
  assert "Traceback" not in err
  assert "'qm9'" in err and "was not found in the default tfds data_dir" in err
  assert "tfds build qm9" in err


def test_symlinks_planted_in_the_output_directory_are_replaced_not_followed(tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  victim = tmp_path / "victim.txt"
  victim.write_text("keep me")
  names = ("results.json", "results.csv", "training_curves.png", "results.json.tmp")
  for name in names:
    (out / name).symlink_to(victim)
  code = cli.main(["compare", "--methods", "ls", "--seeds", "0", "--workdir", str(out)] + TINY)
  assert code == 0
  assert victim.read_text() == "keep me"
  for name in names[:3]:
    assert (out / name).is_file() and not (out / name).is_symlink(), name
  json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("command", ["train", "compare", "spectrum"])
def test_every_command_takes_the_protocol(command):
  from ntkmtl_jax.cli import build_parser, flags

  args = build_parser().parse_args([command, "--benchmark", "qm9", "--protocol", "official"])
  config = flags.benchmark_config(args)
  assert (config.protocol, config.data["scale_y"], config.selection) == (
    "official",
    "none",
    "best_or_later",
  )
  args = build_parser().parse_args([command, "--benchmark", "qm9"])
  assert flags.benchmark_config(args).protocol == "ours"
