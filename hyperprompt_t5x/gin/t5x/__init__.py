"""Gin files for google-research/t5x's own entry points (`python -m t5x.train` etc.).

A package so gin finds `hyperprompt_t5x/gin/t5x/<file>.gin` through Python's import
system from any folder, for normal and editable installs alike.
"""
