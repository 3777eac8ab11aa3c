"""The examples people read first run: every python block of README.md and of the docs site's
getting-started page, in order, in one fresh interpreter per page; and the optional imports
of a base install stop with one line naming the extra."""

import os
import pathlib
import re

import pytest

from ntkmtl_jax import _optional

from conftest import run_python

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = ["README.md", "docs/getting-started.md"]
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(page: str) -> list[str]:
  return PYTHON_BLOCK.findall((ROOT / page).read_text(encoding="utf-8"))


@pytest.mark.parametrize("page", PAGES)
def test_page_examples_run(page, tmp_path):
  blocks = python_blocks(page)
  assert blocks, f"{page} has no python block"
  jax_platforms = os.environ.get("JAX_PLATFORMS", "cpu")
  out = run_python(["-c", "\n".join(blocks)], cwd=tmp_path, JAX_PLATFORMS=jax_platforms)
  assert out.returncode == 0, f"{page}\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"


def test_require_names_the_extra():
  with pytest.raises(_optional.MissingExtraError) as error:
    _optional.require("no_such_module_ntkmtl.sub", "data", "the demo")
  assert isinstance(error.value, ImportError)
  assert str(error.value) == (
    "no_such_module_ntkmtl is needed for the demo: install the 'data' extra "
    "(pip install -e '.[data]' in the ntkmtl-jax checkout)"
  )
  assert _optional.require("json", "data").dumps([1]) == "[1]"


def test_require_reraises_a_broken_dependency(tmp_path, monkeypatch):
  # An installed package whose own import fails is a real error, not a missing extra.
  (tmp_path / "pkg_with_broken_dep.py").write_text("import no_such_dependency_ntkmtl\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  with pytest.raises(ModuleNotFoundError) as error:
    _optional.require("pkg_with_broken_dep", "data")
  assert not isinstance(error.value, _optional.MissingExtraError)


# Documented signatures and Args sections against the code.

DOC_PAGES = sorted(
  str(p.relative_to(ROOT)) for p in [ROOT / "README.md", *(ROOT / "docs").rglob("*.md")]
)
CODE_SPAN = re.compile(r"`([A-Za-z_][\w.]*)\(([^`()]*)\)(?: -> [^`]*)?`")
IDENTIFIER = re.compile(r"\*{0,2}[A-Za-z_]\w*")


def documented_modules() -> list[str]:
  """The modules the API pages render (`::: module` lines)."""
  names = set()
  for page in DOC_PAGES:
    names.update(re.findall(r"^::: ([\w.]+)", (ROOT / page).read_text(encoding="utf-8"), re.M))
  return sorted(names)


def _public_callables():
  """{name: [objects]} of the public functions and classes of the documented modules; a
  dotted key per module path and attribute (`methods.get`) and one per bare name."""
  import importlib
  import inspect

  found: dict[str, list] = {}
  for module_name in documented_modules():
    module = importlib.import_module(module_name)
    short = module_name.removeprefix("ntkmtl_jax").lstrip(".")
    for attr, obj in vars(module).items():
      if attr.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)):
        continue
      if not getattr(obj, "__module__", "").startswith("ntkmtl_jax"):
        continue
      keys = [attr, f"ntkmtl_jax.{attr}" if not short else f"ntkmtl_jax.{short}.{attr}"]
      if short:
        keys += [f"{short}.{attr}", f"{short.rsplit('.', 1)[-1]}.{attr}"]
      for key in keys:
        if obj not in found.setdefault(key, []):
          found[key].append(obj)
  return found


def _parse_documented(params: str):
  """The parts of a documented parameter list, or None when it is a call (values, not
  names): [(kind, name, default)], kind "name", "star", "varargs", "varkw" or "ellipsis"."""
  import ast

  parts = []
  for part in (p.strip() for p in params.split(",")):
    if not part:
      continue
    if part == "...":
      parts.append(("ellipsis", None, None))
    elif part == "*":
      parts.append(("star", None, None))
    elif "=" in part:
      name, default = (s.strip() for s in part.split("=", 1))
      if not IDENTIFIER.fullmatch(name):
        return None
      try:
        value = ast.literal_eval(default)
      except (ValueError, SyntaxError):
        value = ...  # a default shown by name (an enum member) or "...": not compared
      parts.append(("name", name, value))
    elif IDENTIFIER.fullmatch(part):
      kind = "varkw" if part.startswith("**") else "varargs" if part.startswith("*") else "name"
      parts.append((kind, part.lstrip("*"), None))
    else:
      return None
  return parts


def signature_problem(obj, parts) -> str | None:
  """What in a documented parameter list is not `obj`'s signature (None: nothing).

  Every documented name is a parameter, in the signature's order; a documented default is the
  signature's; a list with a bare `*` claims the whole signature, so without `...` it must name
  every parameter."""
  import inspect

  signature = inspect.signature(obj)
  params = [p for p in signature.parameters.values() if p.name not in ("self", "cls")]
  by_name = {p.name: p for p in params}
  order = [p.name for p in params]
  seen = []
  for kind, name, default in parts:
    if kind not in ("name", "varargs", "varkw"):
      continue
    if name not in by_name:
      positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
      is_placeholder = kind == "name" and default is None and len(seen) < len(positional)
      if not is_placeholder:  # `ntkmtl(k)` names the first argument in the paper's letter
        return f"{name!r} is not a parameter (the signature is {signature})"
      seen.append(positional[len(seen)].name)
      continue
    if default is not None and default is not ... and by_name[name].default != default:
      return f"{name}={default!r}, but the default is {by_name[name].default!r}"
    seen.append(name)
  if seen != sorted(seen, key=order.index):
    return f"the parameters are not in the signature's order {order}"
  kinds = {k for k, _, _ in parts}
  if "star" in kinds and "ellipsis" not in kinds and set(seen) != set(order):
    missing = [n for n in order if n not in seen]
    return f"it leaves out {missing} (write `...` where the list is not the whole signature)"
  return None


def documented_signatures():
  callables = _public_callables()
  for page in DOC_PAGES:
    for match in CODE_SPAN.finditer((ROOT / page).read_text(encoding="utf-8")):
      name, params = match.groups()
      objects = callables.get(name) or callables.get(name.removeprefix("ntkmtl_jax."))
      parts = _parse_documented(params)
      if objects and parts is not None:
        yield page, match.group(0), objects, parts


def test_documented_signatures_are_the_code():
  checked, problems = 0, []
  for page, span, objects, parts in documented_signatures():
    checked += 1
    found = [signature_problem(obj, parts) for obj in objects]
    if all(found):  # a bare name may stand for several objects: one must match
      problems.append(f"{page}: {span}: {found[0]}")
  assert checked >= 25, f"only {checked} documented signatures were found to check"
  assert not problems, "documented signatures that are not the code's:\n" + "\n".join(problems)


def test_signature_check_catches_drift():
  def factory(num_tasks, *, exponent=0.5, shared=None):
    pass

  assert signature_problem(factory, _parse_documented("k, *, exponent=0.5, shared")) is None
  assert signature_problem(factory, _parse_documented("k, *, exponent=0.5, ...")) is None
  assert "leaves out ['shared']" in signature_problem(factory, _parse_documented("k, *, exponent"))
  assert "default is 0.5" in signature_problem(factory, _parse_documented("k, exponent=0.75"))
  assert "'exponant' is not" in signature_problem(factory, _parse_documented("k, *, exponant"))
  assert "order" in signature_problem(factory, _parse_documented("k, shared, exponent"))


def test_registry_names_in_the_docs_are_registered():
  from ntkmtl_jax import methods

  names = set(methods.names())
  unknown = []
  for page in DOC_PAGES:
    text = (ROOT / page).read_text(encoding="utf-8")
    for name in re.findall(r"methods\.get\(\s*[\"'](\w+)[\"']", text):
      if name not in names:
        unknown.append(f"{page}: methods.get({name!r}, ...)")
    for line in re.findall(r"[Rr]egistry names?: ([^\n]*(?:\n[^\n]+)*)", text):
      first = line.split(".")[0]  # the sentence that lists them
      unknown += [f"{page}: {n}" for n in re.findall(r"`(\w+)`", first) if n not in names]
  assert not unknown, f"documented as registry names but not in methods.names(): {unknown}"


def _args_names(docstring: str) -> list[str] | None:
  """The names of a Google-style docstring's Args items (None: no Args section)."""
  import inspect

  lines = inspect.cleandoc(docstring or "").splitlines()
  if "Args:" not in [line.strip() for line in lines]:
    return None
  start = [line.strip() for line in lines].index("Args:")
  indent = len(lines[start]) - len(lines[start].lstrip())
  names = []
  for line in lines[start + 1 :]:
    if line.strip() and len(line) - len(line.lstrip()) <= indent:
      break  # the next section
    item = re.match(" " * (indent + 2) + r"(\*{0,2}\w+)(?: \([^)]*\))?:", line)
    if item:
      names.append(item.group(1).lstrip("*"))
  return names


def documented_functions():
  """(qualified name, function) of every public function and method of the API pages."""
  import importlib
  import inspect

  for module_name in documented_modules():
    module = importlib.import_module(module_name)
    for attr, obj in vars(module).items():
      if attr.startswith("_") or getattr(obj, "__module__", None) != module_name:
        continue
      if inspect.isfunction(obj):
        yield f"{module_name}.{attr}", obj
      elif inspect.isclass(obj):
        for member, value in vars(obj).items():
          if inspect.isfunction(value) and (not member.startswith("_") or member == "__init__"):
            yield f"{module_name}.{attr}.{member}", value


def test_every_args_section_is_the_signature():
  # mkdocstrings warns (and the strict build fails) on a documented parameter the signature
  # lacks; this is the other half: a parameter the Args section leaves out.
  import inspect

  problems, checked = [], 0
  for name, function in documented_functions():
    documented = _args_names(function.__doc__)
    if documented is None:
      continue
    checked += 1
    params = [p for p in inspect.signature(function).parameters if p not in ("self", "cls")]
    missing = [p for p in params if p not in documented]
    unknown = [p for p in documented if p not in params]
    if missing or unknown:
      problems.append(f"{name}: not documented {missing}, not parameters {unknown}")
  assert checked >= 50, f"only {checked} Args sections found"
  assert not problems, "Args sections that are not the signature:\n" + "\n".join(problems)


def test_the_default_strategy_is_stated_once_and_as_the_code():
  from ntkmtl_jax import strategy

  text = (ROOT / "README.md").read_text(encoding="utf-8")
  statements = re.findall(
    r"\*\*The default\*\*, `strategy=\"auto\"`, is `strategy\.default_strategy\(\)`: on CPU\s+"
    r"`Passes\.(\w+)`.*?on GPU and TPU\s+`Passes\.(\w+)`",
    text,
    re.S,
  )
  assert len(statements) == 1, "README.md must state the default strategy once"
  cpu, accelerators = statements[0]
  assert strategy.default_strategy("cpu").passes.name == cpu
  for backend in ("gpu", "tpu"):
    assert strategy.default_strategy(backend).passes.name == accelerators
  # The table of passes marks the same rows.
  rows = dict(re.findall(r"^\| `Passes\.(\w+)` \| ([^|]*)\|", text, re.M))
  marked = {p: r for p, r in rows.items() if "default" in r}
  assert set(marked) == {cpu, accelerators}, marked
  assert "default on CPU" in marked[cpu] and "default on GPU/TPU" in marked[accelerators]


def test_the_strict_build_fails_on_an_unknown_parameter():
  # mkdocs --strict turns mkdocstrings' warnings into a failed build; these options make a
  # documented parameter that the signature lacks one.
  text = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
  assert re.search(r"^strict: true$", text, re.M)
  for option in ("warn_unknown_params", "warnings"):
    assert re.search(rf"^\s+{option}: true$", text, re.M), f"mkdocs.yml: {option} is not true"


def test_args_names_reads_google_sections():
  doc = """One line.

  Args:
    num_tasks: k.
    exponent (float): the power,
      on two lines.
    **options: more.

  Returns:
    A thing.
  """
  assert _args_names(doc) == ["num_tasks", "exponent", "options"]
  assert _args_names("No sections.") is None
