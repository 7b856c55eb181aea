"""`effnn bench` on tiny shapes, through the console-script entry point."""

import csv
import importlib.util
import runpy
import sys

import pytest
import torch
from torch import nn

from effnn.bench import BASELINE, FORWARD, TRAIN, Case, Layer, Workload, linear_flops, registry
from effnn.bench.report import COLUMNS
from effnn.cli import main

TINY = ["--layers", "monarch", "--shapes", "64x64x4,100x70x3", "--tokens", "16",
        "--repeats", "2", "--warmup", "1"]


def _csv_rows(folder):
    (path,) = folder.glob("*.csv")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_bench_writes_table_csv_markdown_and_plot(tmp_path, capsys):
    assert main(["bench", *TINY, "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()

    columns, rows = _csv_rows(tmp_path)
    assert tuple(columns) == COLUMNS
    assert {"layer", "case", "provider", "backend", "mode", "median_ms", "gflops",
            "speedup_vs_baseline", "peak_memory_mb", "torch_version", "effnn_version",
            "machine", "timestamp"} <= set(columns)
    cases = {r["case"] for r in rows}
    assert cases == {"64x64/nb4", "100x70/nb3"}
    assert {r["mode"] for r in rows} == {FORWARD, TRAIN}
    for case in cases:
        for mode in (FORWARD, TRAIN):
            group = {r["provider"]: r for r in rows if r["case"] == case and r["mode"] == mode}
            assert {"nn.Linear", "effnn"} <= set(group)
            assert float(group["nn.Linear"]["speedup_vs_baseline"]) == 1.0
            assert group["effnn"]["backend"] in ("ref", "ext")
            for r in group.values():
                assert r["tokens"] == "16" and r["dtype"] == "float32" and r["device"] == "cpu"
                assert 0 < float(r["p20_ms"]) <= float(r["median_ms"]) <= float(r["p80_ms"])
                assert float(r["gflops"]) > 0 and float(r["speedup_vs_baseline"]) > 0
                assert r["torch_version"] == torch.__version__
                # peak memory is reported for training steps only
                assert (r["peak_memory_mb"] != "") == (mode == TRAIN)
    # the tiny Monarch layer's training step allocates at least its output and its grads
    train = next(r for r in rows if r["provider"] == "effnn" and r["mode"] == TRAIN)
    assert float(train["peak_memory_mb"]) * 2**20 >= 16 * 64 * 4

    out = captured.out
    header = next(line for line in out.splitlines() if line.startswith("case"))
    for title in ("tokens", "mode", "provider", "backend", "median ms", "GFLOP/s", "vs baseline",
                  "peak MB"):
        assert title in header
    assert "monarch:64x64/nb4" in out and "monarch:100x70/nb3" in out and "1.00x" in out
    assert "[4/4]" in captured.err and "ETA" in captured.err  # progress, one line per measurement
    assert len(list(tmp_path.glob("*.md"))) == 1
    if importlib.util.find_spec("matplotlib") is not None:
        (png,) = tmp_path.glob("*.png")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unusable_backend_is_skipped_with_its_reason(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # Triton cannot serve CPU tensors then
    args = ["bench", "--shapes", "monarch:64x64x4", "--tokens", "8", "--repeats", "1", "--modes",
            "forward", "--backends", "triton,ref", "--no-plot", "--out", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "skipped effnn-triton on monarch:64x64/nb4" in out and "TRITON_INTERPRET" in out
    _, rows = _csv_rows(tmp_path)
    assert {r["provider"] for r in rows} == {"nn.Linear", "effnn-ref"}
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.parametrize(
    "args,message",
    [
        (["--shapes", "monarch:64x64"], "INxOUTxNBLOCKS"),
        (["--shapes", "64x64x4"], "several layers are registered"),
        (["--layers", "nope"], "unknown layer 'nope'"),
        (["--modes", "sideways"], "--modes"),
        (["--backends", "cuda"], "--backends"),
        (["--dtype", "int8"], "--dtype"),
    ],
)
def test_bad_flags_exit_with_a_message(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", *args])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_list_and_help(capsys):
    assert main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    assert "monarch: MonarchLinear vs nn.Linear" in out and "4096x4096/nb64" in out
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    assert "INxOUTxNBLOCKS" in capsys.readouterr().out


def test_python_m_effnn_bench(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["python -m effnn.bench", "--list"])
    with pytest.raises(SystemExit) as e:
        runpy.run_module("effnn.bench", run_name="__main__")
    assert e.value.code == 0
    assert "monarch" in capsys.readouterr().out


def test_a_new_layer_registers_in_a_few_lines(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(registry, "_LAYERS", dict(registry.layers()))

    def toy_case(spec):
        (n,) = registry.parse_ints(spec, 1, "N")

        def build(provider, s):
            x = torch.randn(s.token_count(8), n, device=s.device, dtype=s.dtype)
            layer = nn.Linear(n, n, bias=provider != BASELINE, device=s.device, dtype=s.dtype)
            return Workload(layer, (x,), linear_flops(x.shape[0], n * n), x.shape[0],
                            backend="torch" if provider == BASELINE else "ref")

        return Case("toy", f"n{n}", f"n={n}", build)

    registry.register_layer(Layer("toy", "Linear vs bias-free Linear", "nn.Linear(bias=False)",
                                  "N", toy_case, defaults=("8",), backends=("ref",)))
    assert main(["bench", "--shapes", "toy:8,toy:16", "--repeats", "1", "--no-plot",
                 "--backends", "auto,ext", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "toy:n8" in out and "toy:n16" in out and "monarch" not in out.split("command:")[1]
    assert "backend 'ext' is not implemented for toy" in out
    _, rows = _csv_rows(tmp_path)
    assert len(rows) == 2 * 2 * 2  # cases x modes x providers
