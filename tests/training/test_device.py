"""Matmul precision and the peak MFU is measured against: fp32 on CUDA uses TF32, and MFU says so."""

import pytest
import torch

from codex_ml.training.device import configure_matmul_precision, fp32_matmul_precision, peak_flops, peak_flops_of


@pytest.fixture
def restore_matmul_precision():
    before = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize(
    "device, precision, wanted",
    [
        ("cuda", "fp32", "high"),
        ("cuda", "bf16", None),
        ("cuda", "fp16", None),
        ("cpu", "fp32", None),
        ("cpu", "bf16", None),
    ],
)
def test_fp32_training_on_cuda_asks_for_tf32(device, precision, wanted):
    assert fp32_matmul_precision(torch.device(device), precision) == wanted


def test_configure_sets_tf32_for_cuda_fp32_and_leaves_cpu_alone(restore_matmul_precision):
    torch.set_float32_matmul_precision("highest")
    assert configure_matmul_precision(torch.device("cpu"), "fp32") == "highest"
    assert configure_matmul_precision(torch.device("cuda"), "bf16") == "highest"
    # a flag of the process: setting it needs no GPU, so the CUDA case is checked here too
    assert configure_matmul_precision(torch.device("cuda"), "fp32") == "high"
    assert torch.get_float32_matmul_precision() == "high"


def test_the_peak_follows_the_matmul_precision_in_effect():
    h100 = "NVIDIA H100 80GB HBM3"
    assert peak_flops_of(h100, "bf16", "highest") == peak_flops_of(h100, "bf16", "high") == 989e12
    assert peak_flops_of(h100, "fp32", "high") == peak_flops_of(h100, "fp32", "medium") == 494.5e12  # TF32
    assert peak_flops_of(h100, "fp32", "highest") == 67e12  # plain fp32: no tensor cores
    assert peak_flops_of("NVIDIA A100-SXM4-40GB", "fp32", "high") == 156e12
    assert peak_flops_of("Some Unlisted GPU", "bf16", "high") == 0.0


def test_cpu_has_no_listed_peak():
    assert peak_flops(torch.device("cpu"), "fp32") == 0.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_fp32_training_runs_tf32_and_reports_against_it(restore_matmul_precision):
    device = torch.device("cuda")
    configure_matmul_precision(device, "fp32")
    assert torch.backends.cuda.matmul.allow_tf32
    name = torch.cuda.get_device_name(device)
    assert peak_flops(device, "fp32") == peak_flops_of(name, "fp32", "high")


def test_gpus_without_tf32_are_measured_at_their_fp32_rate():
    assert (
        peak_flops_of("Tesla V100-SXM2-16GB", "fp32", "high")
        == peak_flops_of("Tesla V100-SXM2-16GB", "fp32", "highest")
        == 15.7e12
    )
    assert peak_flops_of("Tesla V100-SXM2-16GB", "fp16", "high") == 125e12
