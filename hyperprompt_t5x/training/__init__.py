"""The train loop and what it needs: data stream, compiled step, saving, signals, locks."""
