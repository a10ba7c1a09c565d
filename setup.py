"""hyperprompt_t5x: HyperPrompt (He et al., ICML 2022) for T5 1.1 in JAX/Flax, T5X-style."""
import pathlib

import setuptools

_HERE = pathlib.Path(__file__).parent


def _requirements(name):
  lines = (_HERE / name).read_text().splitlines()
  return [l.split('#')[0].strip() for l in lines
          if l.split('#')[0].strip() and not l.startswith('-r')]


setuptools.setup(
    name='hyperprompt_t5x',
    version='0.1.0',
    description='HyperPrompt task conditioning for T5 1.1 in JAX/Flax, T5X-compatible.',
    long_description=(_HERE / 'README.md').read_text(),
    long_description_content_type='text/markdown',
    python_requires='>=3.10',
    # gin/ has no __init__.py (it would shadow gin-config where the folder is on sys.path).
    packages=setuptools.find_packages(include=['hyperprompt_t5x', 'hyperprompt_t5x.*'])
    + ['hyperprompt_t5x.gin'],
    package_data={
        'hyperprompt_t5x.tasks': ['data/*'],
        'hyperprompt_t5x.gin': ['*.gin', '*/*.gin'],
    },
    install_requires=_requirements('requirements.txt'),
    extras_require={'test': _requirements('requirements-test.txt')},
    entry_points={
        'console_scripts': [
            'hyperprompt-t5x = hyperprompt_t5x.cli.commands:main',
            # The user's words are `t5x train --gin_file=...`; the real t5x ships
            # no console script, so this one is an alias.
            't5x = hyperprompt_t5x.cli.commands:main',
        ],
    },
)
