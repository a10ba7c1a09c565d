"""hyperprompt_t5x: HyperPrompt (He et al., ICML 2022) for T5 1.1 in JAX/Flax, T5X-style.

`tasks/` and `gin/` live at the top of the repository and install as
`hyperprompt_t5x.tasks` and `hyperprompt_t5x/gin/*.gin`.
"""
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
    packages=['hyperprompt_t5x', 'hyperprompt_t5x.tasks', 'hyperprompt_t5x.gin',
              'hyperprompt_t5x.gin.t5x'],
    package_dir={
        'hyperprompt_t5x': 'hyperprompt_t5x',
        'hyperprompt_t5x.tasks': 'tasks',
        'hyperprompt_t5x.gin': 'gin',
        'hyperprompt_t5x.gin.t5x': 'gin/t5x',
    },
    package_data={
        'hyperprompt_t5x.tasks': ['data/*'],
        'hyperprompt_t5x.gin': ['*.gin', '*/*.gin'],
        'hyperprompt_t5x.gin.t5x': ['*.gin'],
    },
    install_requires=_requirements('requirements.txt'),
    extras_require={'test': _requirements('requirements-test.txt')},
    entry_points={
        'console_scripts': [
            'hyperprompt-t5x = hyperprompt_t5x.cli:main',
            # The user's words are `t5x train --gin_file=...`; the real t5x ships
            # no console script, so this one is an alias.
            't5x = hyperprompt_t5x.cli:main',
        ],
    },
)
