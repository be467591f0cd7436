"""schemathesis against the published OpenAPI document on a running stack: generated
requests, valid and not, for every route; none may get a 5xx or an answer the document does
not allow. Bounded (a fixed seed, a few hundred cases) to fit CI's budget."""

import subprocess
import sys
from pathlib import Path

SCHEMATHESIS = str(Path(sys.executable).parent / "schemathesis")


def test_no_generated_request_gets_a_server_error(stack_env, tmp_path):
    url = stack_env["RGRID_API_URL"]
    result = subprocess.run(
        [
            SCHEMATHESIS,
            "run",
            f"{url}/v1/openapi.json",
            "--base-url",
            url,
            "--header",
            f"Authorization: Bearer {stack_env['RGRID_API_KEY']}",
            "--checks",
            "not_a_server_error,status_code_conformance",
            "--hypothesis-seed",
            "20261122",
            "--hypothesis-max-examples",
            "25",
            "--hypothesis-derandomize",
            "--request-timeout",
            "20000",
            "--no-color",
            "--experimental=openapi-3.1",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-6000:]
    assert "passed" in result.stdout
