"""One run, as every command sees it: its plan from the config, the train state and its
jitted steps, MODEL_DIR's records and the console/metrics log."""
