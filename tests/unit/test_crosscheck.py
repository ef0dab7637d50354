import pytest

from runner.backends.crosscheck import crosscheck_node_labels

pytestmark = pytest.mark.unit

H100 = {
    "visible": True,
    "driver_version": "550.54.15",
    "count": 1,
    "gpus": [{"name": "NVIDIA H100 80GB HBM3"}],
}
LABELS = {
    "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
    "nvidia.com/cuda.driver.major": "550",
    "nvidia.com/cuda.driver.minor": "54",
    "kubernetes.io/os": "linux",
}


def test_agreeing_node_and_capture():
    assert crosscheck_node_labels(LABELS, H100) == []


def test_product_disagreement_is_named():
    labels = {**LABELS, "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    [problem] = crosscheck_node_labels(labels, H100)
    assert "NVIDIA-A100-SXM4-80GB" in problem and "H100" in problem


def test_driver_disagreement_is_named():
    problems = crosscheck_node_labels({**LABELS, "nvidia.com/cuda.driver.major": "535"}, H100)
    assert problems == [
        "node label nvidia.com/cuda.driver.major=535, container sees driver 550.54.15"
    ]


def test_node_claims_a_gpu_the_container_cannot_see():
    [problem] = crosscheck_node_labels(LABELS, {"visible": False, "reason": "no NVML"})
    assert "sees no GPU" in problem


def test_cpu_node_without_gpu_labels_is_not_checked():
    assert crosscheck_node_labels({"kubernetes.io/os": "linux"}, {"visible": False}) == []
