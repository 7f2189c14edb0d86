import keras
import pytest

from visionops.core.precision import precision_policy, read_cpu_flags, resolve_precision


@pytest.mark.parametrize(("flags", "gpus", "expected"), [
    ({"avx2", "avx512_bf16"}, 0, "mixed_bfloat16"),
    ({"avx2", "amx_bf16"}, 0, "mixed_bfloat16"),
    ({"avx2", "avx512f"}, 0, "float32"),
    (set(), 0, "float32"),
    ({"avx512_bf16"}, 1, "mixed_float16"),
    (set(), 2, "mixed_float16"),
])
def test_auto_picks_float16_on_gpus_bfloat16_on_bf16_cpus(flags, gpus, expected):
    assert resolve_precision("auto", cpu_flags=flags, gpus=gpus) == expected


@pytest.mark.parametrize("name", ["float32", "mixed_bfloat16", "mixed_float16"])
def test_explicit_precisions_are_kept(name):
    assert resolve_precision(name, cpu_flags=set(), gpus=0) == name


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="train.precision 'float16'"):
        resolve_precision("float16")


def test_cpu_flags_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\n"
                       "processor\t: 1\nflags\t\t: fpu avx2 avx512_bf16\n")
    assert read_cpu_flags(cpuinfo) == {"fpu", "avx2", "avx512_bf16"}
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")
    assert read_cpu_flags(arm) == {"fp", "asimd", "bf16"}
    assert read_cpu_flags(tmp_path / "missing") == set()


def test_policy_is_set_for_the_block_and_restored_after():
    assert keras.mixed_precision.global_policy().name == "float32"
    with precision_policy("mixed_bfloat16") as name:
        assert name == "mixed_bfloat16"
        assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
        assert keras.layers.Dense(2).compute_dtype == "bfloat16"
    assert keras.mixed_precision.global_policy().name == "float32"

    with pytest.raises(RuntimeError), precision_policy("mixed_float16"):
        raise RuntimeError("training failed")
    assert keras.mixed_precision.global_policy().name == "float32"


def test_auto_resolves_for_this_machine():
    with precision_policy("auto") as name:
        assert name in ("float32", "mixed_bfloat16", "mixed_float16")
        assert keras.mixed_precision.global_policy().name == name
