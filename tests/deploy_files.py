"""Read the files that ship the server: the Dockerfile, docker-compose.yml, deploy/haproxy/,
deploy/kubernetes/ (rendered like `kubectl kustomize`) and the commands of docs/deployment.md. No
Docker engine is needed: tests check what they say, and run the commands in them that can run
here."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE_FILE = ROOT / "docker-compose.yml"
KUBERNETES_DIR = ROOT / "deploy" / "kubernetes"
OVERLAYS = ("cpu", "cuda")
HAPROXY_CONFIG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
CONSTRAINTS = ROOT / "deploy" / "docker" / "constraints.txt"
ENTRYPOINT = ROOT / "deploy" / "docker" / "entrypoint.sh"
COMPOSE_SCHEMA = Path(__file__).resolve().parent / "data" / "compose-spec.json"
DEPLOYMENT_DOC = ROOT / "docs" / "deployment.md"  # the README links to it


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction: `RUN`, `ENV`, ... with its arguments on one line."""

    keyword: str
    arguments: str
    line: int


def dockerfile_instructions(path: Path = DOCKERFILE) -> list[Instruction]:
    """Instructions in order, with `\\` continuations joined and comment lines dropped."""
    instructions: list[Instruction] = []
    parts: list[str] = []
    start = 0
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue  # Docker drops comment lines, also inside a continuation
        if not parts:
            start = number
        if stripped.endswith("\\"):
            parts.append(stripped[:-1].strip())
            continue
        parts.append(stripped)
        keyword, _, arguments = " ".join(parts).partition(" ")
        instructions.append(Instruction(keyword.upper(), arguments.strip(), start))
        parts = []
    assert not parts, f"{path}: the last instruction ends with a continuation"
    return instructions


def stages(instructions: list[Instruction]) -> dict[str, list[Instruction]]:
    """Build stages by name (`FROM ... AS name`); instructions before the first FROM under ''."""
    result: dict[str, list[Instruction]] = {"": []}
    current = ""
    for instruction in instructions:
        if instruction.keyword == "FROM":
            words = instruction.arguments.split()
            current = words[2] if len(words) == 3 and words[1].lower() == "as" else words[0]
            result[current] = []
        result[current].append(instruction)
    return result


def exec_form(arguments: str) -> list[str]:
    """The JSON array of an exec-form instruction (`CMD ["a", "b"]`); ValueError for shell form."""
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not exec form (a JSON array of strings): {arguments}") from exc
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError(f"not exec form (a JSON array of strings): {arguments}")
    return value


def key_values(arguments: str) -> dict[str, str]:
    """`ENV`/`ARG`/`LABEL` arguments `A=1 B="x y"` as a dict (`ARG NAME` gives NAME: '')."""
    pairs = {}
    for word in shlex.split(arguments):
        name, _, value = word.partition("=")
        pairs[name] = value
    return pairs


def last_stage_env(instructions: list[Instruction]) -> dict[str, str]:
    """ENV of the final image: the final stage and the stages it is built FROM."""
    by_stage = stages(instructions)
    env: dict[str, str] = {}
    for name in stage_chain(instructions):
        for instruction in by_stage[name]:
            if instruction.keyword == "ENV":
                env.update(key_values(instruction.arguments))
    return env


def build_args(instructions: list[Instruction]) -> dict[str, str]:
    """Every `ARG NAME=default` of the file (a later default wins)."""
    args: dict[str, str] = {}
    for instruction in instructions:
        if instruction.keyword == "ARG":
            for name, value in key_values(instruction.arguments).items():
                if value or name not in args:
                    args[name] = value
    return args


def substitute(text: str, variables: dict[str, str]) -> str:
    """Docker's `${NAME}` / `$NAME` substitution with the given values."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables[m.group(1) or m.group(2)], text)


def stage_chain(instructions: list[Instruction], variant: str | None = None) -> list[str]:
    """Stage names the final image is built from, base first, for a VARIANT (default: the ARG's)."""
    args = build_args(instructions)
    if variant is not None:
        args["VARIANT"] = variant
    by_stage = stages(instructions)
    chain = [list(by_stage)[-1]]
    while True:
        source = substitute(by_stage[chain[0]][0].arguments.split()[0], args)
        if source not in by_stage:
            return chain
        chain.insert(0, source)


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as stream:
        return [doc for doc in yaml.safe_load_all(stream) if doc is not None]


def kubernetes_manifests() -> list[Path]:
    """The base's manifest files (what its kustomization lists)."""
    base = KUBERNETES_DIR / "base"
    (kustomization,) = load_yaml_documents(base / "kustomization.yaml")
    return [base / name for name in kustomization["resources"]]


# --- kustomize, the subset deploy/kubernetes/ uses (tests compare it with `kubectl kustomize`)

KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "resources", "images", "patches"}


def kustomize(directory: Path) -> list[dict[str, Any]]:
    """Render a kustomization like `kubectl kustomize DIR`: its resources (files, or directories
    with their own kustomization), then its JSON 6902 patches, then its image replacements. A field
    outside that subset is an error, so the renderer can't silently skip what kustomize does."""
    (spec,) = load_yaml_documents(directory / "kustomization.yaml")
    unknown = set(spec) - KUSTOMIZATION_FIELDS
    assert not unknown, f"{directory}: kustomization fields this renderer lacks: {unknown}"
    documents: list[dict[str, Any]] = []
    for resource in spec.get("resources", []):
        path = (directory / resource).resolve()
        documents += kustomize(path) if path.is_dir() else load_yaml_documents(path)
    for patch in spec.get("patches", []):
        operations = yaml.safe_load(patch["patch"])
        target = patch["target"]
        matched = [
            doc
            for doc in documents
            if doc["kind"] == target["kind"] and doc["metadata"]["name"] == target["name"]
        ]
        assert matched, f"{directory}: a patch matches nothing: {target}"
        for doc in matched:
            for operation in operations:
                json_patch(doc, operation)
    for image in spec.get("images", []):
        for container in pod_containers(documents):
            name, _, _ = container["image"].partition(":")
            if name == image["name"]:
                container["image"] = f"{image.get('newName', name)}:{image['newTag']}"
    return documents


def json_patch(document: dict[str, Any], operation: dict[str, Any]) -> None:
    """One RFC 6902 operation: add, replace or remove."""
    *parents, last = [
        token.replace("~1", "/").replace("~0", "~") for token in operation["path"].split("/")[1:]
    ]
    node: Any = document
    for token in parents:
        node = node[int(token)] if isinstance(node, list) else node[token]
    op = operation["op"]
    if isinstance(node, list):
        if op == "add":
            node.insert(len(node) if last == "-" else int(last), operation["value"])
        elif op == "replace":
            node[int(last)] = operation["value"]
        else:
            assert op == "remove", op
            del node[int(last)]
    elif op in ("add", "replace"):
        assert op == "add" or last in node, operation
        node[last] = operation["value"]
    else:
        assert op == "remove", op
        del node[last]


def pod_containers(documents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every container and init container of the Deployments."""
    found = []
    for doc in documents:
        if doc["kind"] == "Deployment":
            pod = doc["spec"]["template"]["spec"]
            found += pod["containers"] + pod.get("initContainers", [])
    return found


# --- HAProxy's configuration: sections and their lines


def haproxy_sections(path: Path = HAPROXY_CONFIG) -> dict[str, list[str]]:
    """`section name` (e.g. "backend replicas", "defaults") -> its lines, comments dropped."""
    sections: dict[str, list[str]] = {}
    current = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        if not raw[0].isspace():
            current = line.strip()
            sections[current] = []
        else:
            sections[current].append(" ".join(line.split()))
    return sections


def haproxy_seconds(value: str) -> float:
    """An HAProxy time (`150s`, `2s`, `500ms`, `2m`; a bare number is milliseconds)."""
    match = re.fullmatch(r"(\d+)(us|ms|s|m|h|d)?", value)
    assert match, value
    unit = {"us": 1e-6, "ms": 1e-3, None: 1e-3, "s": 1, "m": 60, "h": 3600, "d": 86400}
    return int(match.group(1)) * unit[match.group(2)]


# --- the stop rule (docs/deployment.md, "Stopping")

# Seconds past RERANKER_DRAIN_TIMEOUT_S that a stop grants: the server's own close
# (server.SHUTDOWN_GRACE_S, 10 s) and 10 s of margin. Kubernetes adds its preStop pause.
STOP_MARGIN_S = 20


def stop_grace_s(drain_timeout_s: float, pause_s: float = 0) -> int:
    """The grace a stop must give: the pause before SIGTERM + the drain + STOP_MARGIN_S."""
    return int(pause_s + drain_timeout_s + STOP_MARGIN_S)


def readme_section(heading: str) -> str:
    """The docs/deployment.md text from `heading` (a `## ` line) to the next `## ` heading."""
    text = DEPLOYMENT_DOC.read_text(encoding="utf-8")
    start = text.index(f"\n{heading}\n")
    end = text.find("\n## ", start + len(heading) + 2)
    return text[start : end if end != -1 else len(text)]


def readme_commands(heading: str = "## Docker") -> list[list[str]]:
    """Indented command lines of a docs/deployment.md section, split like a shell would (comments
    dropped)."""
    commands = []
    for line in readme_section(heading).splitlines():
        if line.startswith("    ") and line.strip():
            commands.append(shlex.split(line.strip(), comments=True))
    return commands


def option_values(argv: list[str], option: str) -> list[str]:
    """Values of `option` in a command line (`-p 1:2` and `-p=1:2`)."""
    values = []
    for i, word in enumerate(argv):
        if word == option and i + 1 < len(argv):
            values.append(argv[i + 1])
        elif word.startswith(option + "="):
            values.append(word[len(option) + 1 :])
    return values
