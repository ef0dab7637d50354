"""The in-container agent (``python -m runner.agent``).

Runs inside the evaluation image. Standard library only (plus ``pynvml`` when
present), and it never imports the runner's backends, signing or CLI: nothing
in the container can touch the signing key or the store.
"""
