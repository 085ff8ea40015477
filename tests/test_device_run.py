"""scripts/device_run.sh, the one-call GPU verdict, simulated on this CPU machine.

DEVICE_RUN_SIMULATE=1 runs every phase with stand-ins (a fake nvidia-smi and compute-sanitizer on
PATH, a simulated build log, the smoke and the sanitizer case on the C++ CPU kernels, the GPU tests'
logic through scripts/gpu_tests_dry_run.py, a CPU benchmark) under the same budget logic, so the
script's control flow, its phase timing and its output files are checked before device time is
spent on them. The plan check takes the figures the device call runs with.
"""

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "device_run.sh"
PHASES = ["facts", "build", "smoke", "tests", "bench", "sanitizer"]


def _simulate(tmp_path, **env):
    out = tmp_path / "out"
    out.mkdir()
    full_env = {
        **os.environ,
        "OUT": str(out),
        "TMPDIR": str(tmp_path),
        "DEVICE_RUN_SIMULATE": "1",
        "PATH": f"{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}",
        **env,
    }
    full_env.pop("FASTCM_TEST_DEVICE", None)
    run = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=300)
    return run, out


def _phase_table(summary):
    rows = {}
    for line in summary.splitlines():
        m = re.match(r"^(\w+)\s+(-?\d+)\s+(\d+)\s+(.*)$", line)
        if m and m.group(1) in PHASES:
            rows[m.group(1)] = (int(m.group(2)), int(m.group(3)), m.group(4))
    return rows


def test_plan_fits_the_device_call_with_the_measured_build_time():
    header = SCRIPT.read_text()
    measured = int(re.search(r"^MEASURED_BUILD_S=(\d+)", header, re.M).group(1))
    device_env = {k: v for k, v in os.environ.items() if k not in ("DEVICE_RUN_SIMULATE", "DEVICE_BUDGET")}
    plan = subprocess.run(
        ["bash", str(SCRIPT), "--plan"], cwd=ROOT, capture_output=True, text=True, check=True, env=device_env
    )
    rows = {line.split()[0]: [int(x) for x in line.split()[1:]] for line in plan.stdout.splitlines()[1:-1]}
    assert list(rows) == PHASES + ["summary"]
    assert rows["build"][2] == measured  # the build is planned at its measured time
    total = sum(planned for _, _, planned in rows.values())
    assert total <= 540, plan.stdout
    assert f"total planned: {total} s" in plan.stdout
    assert rows["tests"][2] >= 60 and rows["bench"][2] >= 45, plan.stdout  # every phase keeps a useful share
    # A longer build shrinks the later phases instead of overrunning the call.
    slow = subprocess.run(
        ["bash", str(SCRIPT), "--plan"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env={**device_env, "PLAN_BUILD_S": str(measured + 120)},
    )
    assert int(re.search(r"total planned: (\d+)", slow.stdout).group(1)) <= 540


@pytest.mark.slow
def test_the_headers_two_calls_fit_one_session():
    """Each call of the header plans within its DEVICE_BUDGET and leaves its tool limit room over it; the
    two budgets with one machine start (~60 s) and each call's transfers (~15 s) fit a session's 900 s."""
    calls = re.findall(r"^#\s+run\(command='(.*?)'.*timeout_s=(\d+)\)", SCRIPT.read_text(), re.M)
    assert len(calls) == 2, calls
    budgets = []
    for command, timeout in calls:
        env = dict(re.findall(r'(\w+)="?([^"]*?)"?(?= [A-Z]| bash)', command))
        device_env = {k: v for k, v in os.environ.items() if k != "DEVICE_RUN_SIMULATE"} | env
        plan = subprocess.run(
            ["bash", str(SCRIPT), "--plan"], cwd=ROOT, capture_output=True, text=True, check=True, env=device_env
        ).stdout
        budget = int(env["DEVICE_BUDGET"])
        assert f"of DEVICE_BUDGET {budget} s" in plan, plan
        assert int(re.search(r"total planned: (\d+) s", plan).group(1)) <= budget, plan
        skipped = env.get("DEVICE_RUN_SKIP", "").split()
        assert not any(line.split()[0] in skipped for line in plan.splitlines()[1:-1]), plan
        assert int(timeout) >= budget + 30
        budgets.append(budget)
    assert sum(budgets) + 60 + 2 * 15 <= 900


def test_simulated_run_every_phase_and_its_files(tmp_path):
    run, out = _simulate(tmp_path)
    log = run.stdout
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8, files
    assert (
        {
            "run.log",
            "summary.txt",
            "build.log",
            "smoke.log",
            "pytest.log",
            "bench.log",
            "sanitizer.log",
            "results.tar.gz",
        }
        >= set(files)
        and "summary.txt" in files
        and "results.tar.gz" in files
    )
    for phase in PHASES:  # each phase announced with its budget and closed with its time
        assert re.search(rf"^=== {phase}: budget \d+ s", log, re.M), phase
        assert re.search(rf"^=== {phase}: \d+ s \(budget \d+ s\)", log, re.M), phase
    summary = (out / "summary.txt").read_text()
    table = _phase_table(summary)
    assert list(table) == PHASES
    for phase in ["facts", "build", "smoke", "tests"]:
        assert table[phase][2] == "ok", summary
    # The benchmarks ran both steps (on a loaded machine a CPU case may pass its share: then it is
    # cut, and the phase says so).
    bench_log = (out / "bench.log").read_text()
    assert re.search(r"^bench precondition: exit \d+", bench_log, re.M) and "bench attention: exit" in bench_log
    assert table["bench"][2] == "ok" or re.search(r"exit 124: cut at \d+ s", bench_log), summary
    budget = int(re.search(r"DEVICE_BUDGET (\d+) s", summary).group(1))  # the simulation's
    assert sum(used for _, used, _ in table.values()) <= budget
    # The build log check finds the C75xx diagnostic and the spill of the (simulated) ptxas report.
    assert "1 C75xx diagnostics" in summary and "1 reports with spills" in summary
    # Every smoke choice ran on the CPU kernels and passed.
    assert "smoke failed: none" in summary
    assert log.count(": ok\n") >= 7
    # The tests: the dry run's slice passed; the hanging test was ended by the watchdog, named, and
    # the shard resumed after it (test_after ran).
    pytest_log = (out / "pytest.log").read_text()
    assert "HUNG or CRASHED" in pytest_log and "test_sim_hang.py::test_hangs" in pytest_log
    assert re.search(r"test_sim_hang.py::test_after PASSED", pytest_log)
    assert "hung / crashed: 1" in summary
    assert re.search(r"tests: .*\d+ passed", summary)
    # compute-sanitizer refused the device: skipped cleanly.
    assert "refused the device" in log and table["sanitizer"][2] == "ok"


@pytest.mark.slow
def test_simulated_phase_over_budget_is_cut_and_reported(tmp_path):
    run, out = _simulate(tmp_path, DEVICE_RUN_SIM_BUILD_S="30", DEVICE_RUN_CAPS="build=3")
    table = _phase_table((out / "summary.txt").read_text())
    assert table["build"][0] == 3 and table["build"][1] <= 10 and table["build"][2].startswith("CUT"), table
    assert all(table[p][2] == "not run: build failed" for p in ["smoke", "tests", "bench", "sanitizer"])
    assert run.returncode != 0


@pytest.mark.slow
def test_simulated_smoke_hang_costs_one_slot(tmp_path):
    """The default kernel (TMA) hangs after cp_async passed: its slot ends at the smoke limit, the
    TMA-only choices are not run, bwd_sm80 runs with the TMA kernel off, the later phases run with
    FASTCM_ATTN_SM90_TMA=0; phases whose budget falls below their minimum are skipped and reported."""
    run, out = _simulate(
        tmp_path, DEVICE_RUN_SIM_HANG="default", SMOKE_TIMEOUT="4", DEVICE_RUN_CAPS="tests=1 bench=1 sanitizer=1"
    )
    log = run.stdout
    assert "default: FAILED (exit 124: hung, cut at 4 s)" in log
    assert "tma_serial: not run (a TMA kernel hung)" in log and "tma_smem_q: not run (a TMA kernel hung)" in log
    assert "--- bwd_sm80 (FASTCM_ATTN_SM90_BWD=0 FASTCM_ATTN_SM90_TMA=0), limit" in (out / "smoke.log").read_text()
    assert re.search(r"^bwd_sm80: ok$", log, re.M) and re.search(r"^cp_async: ok$", log, re.M)
    assert "switched off for the rest: default tma_serial tma_smem_q (FASTCM_ATTN_SM90_TMA=0 )" in log
    table = _phase_table((out / "summary.txt").read_text())
    assert table["smoke"][2] == "ok" and table["smoke"][1] < 30
    assert all(table[p][2] == "skipped: no time left" for p in ["tests", "bench", "sanitizer"]), table


def test_simulated_run_skips_the_phases_asked(tmp_path):
    run, out = _simulate(tmp_path, DEVICE_RUN_SKIP="smoke tests sanitizer")
    summary = (out / "summary.txt").read_text()
    assert list(_phase_table(summary)) == ["facts", "build", "bench"], summary
    log = (out / "run.log").read_text()
    for phase in ["smoke", "tests", "sanitizer"]:
        assert f"=== {phase}: skipped (DEVICE_RUN_SKIP)" in log, log
