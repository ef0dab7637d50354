"""A custom metric for the digits example: the error rate, weighted by what a misread costs.

evalrun calls ``cost_weighted_error(samples)`` in its own sandbox (the run's image, no
network, only this file and the per-sample outputs), on all samples and on each bootstrap
resample the runner draws; ``samples`` is a list of the per-sample objects the evaluation
wrote. It must return a finite number. Nothing here runs on the runner host.

Cost of one sample: 0 when read correctly; a misread costs 1 plus how far the digit read
is from the true one (reading a 1 as a 7 is worse than reading it as a 2 when the digits
are amounts), scaled so the worst misread (0 ↔ 9) costs 2.
"""


def sample_cost(label: int, prediction: int) -> float:
    if label == prediction:
        return 0.0
    return 1.0 + abs(label - prediction) / 9


def cost_weighted_error(samples: list[dict]) -> float:
    total = sum(sample_cost(int(s["label"]), int(s["prediction"])) for s in samples)
    return total / len(samples)
