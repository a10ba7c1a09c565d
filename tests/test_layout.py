"""The package's layout rules (docs/ARCHITECTURE.md): imports between the folders run one
way, nothing imports in a cycle (bench/ included), functions import the project's own
modules only across the TensorFlow/seqio/gin boundary, and no private name crosses a
module."""
import ast
import pathlib

ROOT = next(p for p in pathlib.Path(__file__).resolve().parents if (p / 'setup.py').is_file())
# Lower groups first: a module may import its own group and the groups before it.
GROUPS = ('model', 'checkpoints', 'optim partitioning gin_config synthetic_tasks '
          'quiet_tensorflow tasks', 'run', 'evaluation', 'training', 't5x_adapter', 'cli')
# Imported inside functions on purpose: TensorFlow / seqio (tasks, quiet_tensorflow) and
# gin (gin_config) load only when a command needs them.
BOUNDARY = ('hyperprompt_t5x.tasks', 'hyperprompt_t5x.quiet_tensorflow',
            'hyperprompt_t5x.gin_config')
# Modules that may import the project lazily: the package root (`import hyperprompt_t5x`
# loads no JAX) and the CLI (usage errors and --help answer before JAX starts).
LAZY_IMPORTERS = ('hyperprompt_t5x', 'hyperprompt_t5x.cli.commands')


def _modules() -> dict:
  found = {}
  for path in sorted(ROOT.glob('hyperprompt_t5x/**/*.py')) + sorted(ROOT.glob('bench/*.py')):
    name = '.'.join(path.relative_to(ROOT).with_suffix('').parts)
    found[name[:-len('.__init__')] if name.endswith('.__init__') else name] = path
  return found


MODULES = _modules()


def _imports(path: pathlib.Path, top_level: bool) -> set:
  tree = ast.parse(path.read_text())
  nodes = tree.body if top_level else list(ast.walk(tree))
  out = set()
  for node in nodes:
    if isinstance(node, ast.ImportFrom) and node.module:
      for alias in node.names:
        full = f'{node.module}.{alias.name}'
        out.add(full if full in MODULES else node.module)
    elif isinstance(node, ast.Import):
      out.update(alias.name for alias in node.names)
  return {m for m in out if m in MODULES}


def _group(module: str):
  parts = module.split('.')
  if parts[0] != 'hyperprompt_t5x' or len(parts) == 1:
    return None
  return next((i for i, names in enumerate(GROUPS) if parts[1] in names.split()), None)


def test_no_import_cycle_anywhere():
  graph = {m: _imports(p, top_level=False) - {m} for m, p in MODULES.items()}
  state, cycles = {}, []

  def visit(node, stack):
    state[node] = 'open'
    stack.append(node)
    for nxt in graph[node]:
      if state.get(nxt) == 'open':
        cycles.append(stack[stack.index(nxt):] + [nxt])
      elif nxt not in state:
        visit(nxt, stack)
    stack.pop()
    state[node] = 'done'

  for module in graph:
    if module not in state:
      visit(module, [])
  assert not cycles, cycles


def test_imports_between_folders_run_one_way():
  upward = [(a, b) for a, p in MODULES.items() for b in _imports(p, top_level=False)
            if _group(a) is not None and _group(b) is not None and _group(b) > _group(a)]
  assert not upward, upward


def test_function_level_imports_only_across_the_boundary():
  lazy = []
  for module, path in MODULES.items():
    if module in LAZY_IMPORTERS:
      continue
    for name in _imports(path, top_level=False) - _imports(path, top_level=True):
      if not name.startswith(BOUNDARY):
        lazy.append(f'{module} imports {name} inside a function')
  assert not lazy, lazy


def test_no_private_name_used_across_modules():
  crossing = []
  for module, path in MODULES.items():
    tree = ast.parse(path.read_text())
    aliases = {}
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.module:
        for alias in node.names:
          if alias.name.startswith('_') and not alias.name.startswith('__'):
            crossing.append(f'{module} imports {node.module}.{alias.name}')
          if f'{node.module}.{alias.name}' in MODULES:
            aliases[alias.asname or alias.name] = f'{node.module}.{alias.name}'
      elif isinstance(node, ast.Import):
        for alias in node.names:
          if alias.name in MODULES and alias.asname:
            aliases[alias.asname] = alias.name
    for node in ast.walk(tree):
      if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
          and node.value.id in aliases and node.attr.startswith('_')
          and not node.attr.startswith('__')):
        crossing.append(f'{module} uses {aliases[node.value.id]}.{node.attr}')
  assert not crossing, crossing


def test_at_most_ten_modules_at_the_top_of_the_package():
  top = [p.name for p in (ROOT / 'hyperprompt_t5x').glob('*.py') if p.name != '__init__.py']
  assert len(top) <= 10, top
