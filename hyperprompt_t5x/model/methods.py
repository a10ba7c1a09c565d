"""The task-conditioning methods, by name (T5Config.method, the METHOD gin macro).

Imports nothing, so the CLI can check a METHOD without loading the model.
"""

HYPERPROMPT_METHODS = ('share', 'sep', 'global')   # HyperPrompt-Share / -Sep / -Global
PROMPT_METHODS = HYPERPROMPT_METHODS + ('prompt_tuning',)  # methods that learn prompts
METHODS = ('none',) + HYPERPROMPT_METHODS + ('prompt_tuning', 'hyperformer')
