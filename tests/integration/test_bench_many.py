"""``forkserve bench``'s guarded scenario (persist_c10000, issue 17): run only when named, and
refused in one line, saying what to change, where it cannot run."""

from __future__ import annotations

import resource
import subprocess
import sys

import pytest

from forkserve.tools.bench.many import FD_MARGIN, plan
from forkserve.tools.bench.runner import DEFAULT_SCENARIOS
from forkserve.tools.bench.servers import model_spec, parse_server
from tests.integration.harness import run_cli

MANY = "persist_c10000"


def one_line_refusal(result: subprocess.CompletedProcess[bytes]) -> str:
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    return err


def test_the_guarded_scenario_runs_only_when_named() -> None:
    assert MANY not in DEFAULT_SCENARIOS
    assert "persist_c1000" in DEFAULT_SCENARIOS


@pytest.mark.timeout(60)
def test_a_model_that_cannot_hold_ten_thousand_is_refused_with_what_to_run() -> None:
    err = one_line_refusal(run_cli(["bench", "--models", "hybrid,fork", "--scenarios", MANY]))
    assert "needs a server that holds 10,000 connections: run it with --models hybrid" in err
    assert "not fork" in err


@pytest.mark.timeout(60)
def test_a_hard_file_limit_below_what_it_needs_is_refused_with_how_to_raise_it() -> None:
    def low_limits() -> None:  # (in the child only, before exec)
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 2048))

    result = subprocess.run(
        [sys.executable, "-m", "forkserve", "bench", "--models", "hybrid", "--scenarios",
         f"persist_c10,{MANY}"], capture_output=True, timeout=30, start_new_session=True,
        check=False, preexec_fn=low_limits)
    err = one_line_refusal(result)
    need = 10000 + FD_MARGIN
    assert f"needs RLIMIT_NOFILE of at least {need} and the hard limit here is 2048" in err
    assert f"ulimit -Hn {need}" in err


def test_a_hybrid_model_runs_the_guarded_scenario_on_a_server_of_its_own() -> None:
    hybrid, other = model_spec("hybrid"), parse_server("mine=./server {port}")
    runs = plan([hybrid, other], ["persist_c10", MANY])
    assert [(spec.name, names) for spec, names in runs] == [
        ("hybrid", ["persist_c10"]), ("hybrid", [MANY]), ("mine", ["persist_c10", MANY])]
    many = " ".join(runs[1][0].argv)
    assert "--worker-connections 10000 --backlog 4096" in many
    assert "--max-startups off" in many
    assert runs[0][0] == hybrid  # the ordinary scenarios: the server as it is
