"""One stop rule everywhere (docs/deployment.md, "Stopping"): whatever stops the server waits
`pause + RERANKER_DRAIN_TIMEOUT_S + 20 s` before it kills, so requests in progress finish. Read from
the settings and checked against every file and page that names a stop timeout."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml

from reranker_server.server import SHUTDOWN_GRACE_S
from reranker_server.settings import Settings
from tests.deploy_files import (
    COMPOSE_FILE,
    DEPLOYMENT_DOC,
    DOCKERFILE,
    KUBERNETES_DIR,
    OVERLAYS,
    ROOT,
    STOP_MARGIN_S,
    kustomize,
    load_yaml_documents,
    option_values,
    readme_section,
    stop_grace_s,
)

DRAIN_S = Settings().drain_timeout_s
GRACE_S = stop_grace_s(DRAIN_S)
ROLLING_RESTART = ROOT / "deploy" / "rolling-restart.sh"
# Every file that may tell someone how to stop the server.
PAGES = [
    DEPLOYMENT_DOC,
    ROOT / "README.md",
    ROOT / "docs" / "reliability.md",
    ROOT / "docs" / "operations.md",
    KUBERNETES_DIR / "README.md",
    DOCKERFILE,
    COMPOSE_FILE,
    ROLLING_RESTART,
]


def test_the_margin_covers_the_servers_own_close() -> None:
    assert STOP_MARGIN_S > SHUTDOWN_GRACE_S
    assert Settings().request_timeout_s <= DRAIN_S  # a full queue finishes
    rule = readme_section("## Stopping")
    assert f"RERANKER_DRAIN_TIMEOUT_S` ({DRAIN_S:g} s)" in rule
    assert f"grace = pause before SIGTERM + RERANKER_DRAIN_TIMEOUT_S + {STOP_MARGIN_S} s" in rule
    rows = re.findall(r"^\| .+ \| (\d+) s?\s*\| (\d+) s \|$", rule, flags=re.M)
    assert rows, "the Stopping table lists no graces"
    for pause, grace in rows:
        assert int(grace) == stop_grace_s(DRAIN_S, int(pause))


def _docker_timeouts(text: str) -> list[int]:
    """Every `docker stop/restart -t N`, `--stop-timeout N` and `-t N` of `docker compose down`."""
    found = []
    for match in re.finditer(r"docker (?:compose )?(?:stop|restart|down|run)\b[^\n`]*", text):
        words = shlex.split(match.group(0).replace('"$id"', "ID"), comments=True)
        found += [int(v) for v in option_values(words, "-t") if v.isdigit()]
        found += [int(v) for v in option_values(words, "--stop-timeout")]
        found += [int(v) for v in option_values(words, "--timeout")]
    return found


def test_every_docker_stop_timeout_is_the_rule() -> None:
    seen = {}
    for page in PAGES:
        timeouts = _docker_timeouts(page.read_text(encoding="utf-8"))
        assert set(timeouts) <= {GRACE_S}, (page, timeouts)
        seen[page.name] = len(timeouts)
    assert seen["deployment.md"] >= 3  # docker run --stop-timeout, docker stop -t, ...
    assert seen["rolling-restart.sh"] >= 1
    assert seen["Dockerfile"] >= 1


def test_compose_grace_is_the_rule() -> None:
    (compose,) = load_yaml_documents(COMPOSE_FILE)
    servers = [s for name, s in compose["services"].items() if name.startswith("reranker-server")]
    assert servers
    for spec in servers:
        assert spec["stop_grace_period"] == f"{GRACE_S}s"


def test_kubernetes_grace_is_the_rule_after_the_pre_stop_pause() -> None:
    for overlay in OVERLAYS:
        for doc in kustomize(KUBERNETES_DIR / "overlays" / overlay):
            if doc["kind"] != "Deployment" or doc["metadata"]["name"] != "reranker-server":
                continue
            pod = doc["spec"]["template"]["spec"]
            (server,) = [c for c in pod["containers"] if c["name"] == "server"]
            pause = int(server["lifecycle"]["preStop"]["exec"]["command"][1])
            env = {e["name"]: e["value"] for e in server["env"]}
            assert float(env["RERANKER_DRAIN_TIMEOUT_S"]) == DRAIN_S
            assert pod["terminationGracePeriodSeconds"] == stop_grace_s(DRAIN_S, pause)


def test_pages_quote_the_graces_of_the_files() -> None:
    """Numbers in prose: the Kubernetes grace and the Compose grace as the files set them."""
    k8s = stop_grace_s(DRAIN_S, 5)
    for page in (ROOT / "docs" / "reliability.md", KUBERNETES_DIR / "README.md"):
        text = page.read_text(encoding="utf-8")
        graces = [
            int(g) for g in re.findall(r"terminationGracePeriodSeconds`? (?:is |\()(\d+)", text)
        ]
        assert graces and set(graces) == {k8s}, (page, graces)
    reliability = (ROOT / "docs" / "reliability.md").read_text(encoding="utf-8")
    assert f"`stop_grace_period` is {GRACE_S} s" in reliability
    # No other stop figure survives in the Compose file's comments or YAML.
    text = Path(COMPOSE_FILE).read_text(encoding="utf-8")
    assert yaml.safe_load(text)["x-server"]["stop_grace_period"] == f"{GRACE_S}s"
