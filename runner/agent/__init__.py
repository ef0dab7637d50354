"""The in-container agent (``python -m runner.agent``).

Runs inside the evaluation image. Standard library only (plus ``pynvml`` when
present), and it never imports the runner's backends, signing or CLI: nothing
in the container can touch the signing key or the store. What it shares with
the host lives in ``runner.shared``: the protocol (plan, exit codes, results
frame), the tar format and the metrics.
"""
