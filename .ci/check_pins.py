"""Installing ntkmtl-jax must not change a pinned environment.

Usage (with the environment's own Python):

    python .ci/check_pins.py PINS_FILE INSTALL_ARG...

installs the exact pins of PINS_FILE (`name==version` lines, `#` comments), records
`pip list --format=freeze`, runs `pip install INSTALL_ARG...` (the project with the extras CI
uses, e.g. `-e ".[data,plots]"`), records the list again, prints what changed and how long each
install took, and exits 1 if any pinned package's version changed: a user who installs the
project into that stack would have had it replaced. The fix is in pyproject.toml: a requirement
(or an extra's) that the pinned version does not meet, or one that pip can only meet by
moving a pinned package.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time


def normalized(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: str) -> dict[str, str]:
  pins = {}
  with open(path) as f:
    for number, raw in enumerate(f, 1):
      line = raw.split("#", 1)[0].strip()
      if not line:
        continue
      match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9_.\-]*)(\[[^\]]*\])?==([^\s;]+)", line)
      if match is None:
        raise SystemExit(
          f"{path}:{number}: {line!r} is not an exact pin; write name==version "
          "(this file lists exact versions only)."
        )
      pins[normalized(match.group(1))] = match.group(3)
  return pins


def freeze() -> dict[str, str]:
  out = subprocess.run(
    [sys.executable, "-m", "pip", "list", "--format=freeze"],
    check=True,
    capture_output=True,
    text=True,
  ).stdout
  versions = {}
  for line in out.splitlines():
    if "==" in line:
      name, version = line.split("==", 1)
      versions[normalized(name)] = version
  return versions


def pip_install(args: list[str]) -> float:
  start = time.monotonic()
  subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", *args], check=True)
  return time.monotonic() - start


def changes(before: dict[str, str], after: dict[str, str]) -> list[str]:
  lines = []
  for name in sorted(before.keys() | after.keys()):
    old, new = before.get(name), after.get(name)
    if old != new:
      lines.append(f"  {name}: {old or '(absent)'} -> {new or '(removed)'}")
  return lines


def main(argv: list[str]) -> int:
  if len(argv) < 2:
    print(__doc__, file=sys.stderr)
    return 2
  try:
    return check(argv[0], argv[1:])
  except subprocess.CalledProcessError as error:
    print(
      f"check_pins: `{' '.join(error.cmd[1:])}` failed (exit {error.returncode}): pip's "
      "message above names the requirement it could not meet on this Python.",
      file=sys.stderr,
    )
    return 1


def check(pins_file: str, install_args: list[str]) -> int:
  pins = read_pins(pins_file)
  seconds = pip_install(["-r", pins_file])
  before = freeze()
  print(
    f"check_pins: {len(pins)} pins of {pins_file} installed in {seconds:.0f} s "
    f"({len(before)} packages)"
  )
  not_as_pinned = [
    f"  {n}=={v} (installed: {before.get(n)})" for n, v in pins.items() if before.get(n) != v
  ]
  if not_as_pinned:
    print("check_pins: the pins did not install as written:\n" + "\n".join(not_as_pinned))
    return 1
  seconds = pip_install(install_args)
  after = freeze()
  diff = changes(before, after)
  print(
    f"check_pins: pip install {' '.join(install_args)}: {seconds:.0f} s, "
    f"{len(diff)} packages added or changed"
  )
  print("\n".join(diff))
  moved = [
    f"  {n}=={v} -> {after.get(n) or '(removed)'}" for n, v in pins.items() if after.get(n) != v
  ]
  if moved:
    print(
      f"check_pins: installing the project changed {len(moved)} pinned package(s):\n"
      + "\n".join(moved)
      + "\nA requirement in pyproject.toml (core or an extra) excludes the pinned version, "
      "or pip could only satisfy it by moving that package: lower the floor that asks for "
      f"more, or raise the pin in {pins_file} if the old version is no longer supported."
    )
    return 1
  print(f"check_pins: every pinned package of {pins_file} kept its version")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
